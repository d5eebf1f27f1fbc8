"""The public seed schedule: which direction seeds a run may use, round by round.

Every candidate a coordinator offers and every step it logs moves the model along
``z(seed)``. If the coordinator could pick seeds freely it could grind them (try millions
offline) until one direction does what it wants, for example touches mostly what one
record uses. So seeds are not chosen: candidate ``i`` of round ``r`` of a run uses
``candidate_seed(direction_seed, r, i)``, a hash of the run's ``direction_seed`` (sent in
the run spec before any question) and its position. A holder recomputes the schedule
itself and refuses any candidate or step whose seed is not on it (``client/policy.py``).

What remains to the coordinator: the run's ``direction_seed`` (grinding it buys k bits of
control over the whole run's directions for 2^k work, never a chosen direction per round),
which of a round's candidates it accepts, and the coefficients, which the policy's
per-step and total-drift caps bound.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterator

_DOMAIN = b"sottovoce-candidate"


def candidate_seed(direction_seed: int, round_index: int, candidate_index: int) -> int:
    """The uint64 seed of candidate ``candidate_index`` of round ``round_index``."""
    material = struct.pack("<QQQ", direction_seed, round_index, candidate_index)
    return int.from_bytes(hashlib.sha256(_DOMAIN + material).digest()[:8], "little")


class SeedSchedule:
    """The seeds of rounds ``0, 1, ...`` with up to ``lanes`` candidates each, looked up by seed.

    Built lazily: a lookup computes only the rounds it needs, and remembers them, so a run
    of R rounds costs R x lanes hashes in total however many tasks check it.
    """

    def __init__(self, direction_seed: int, lanes: int):
        if lanes < 1:
            raise ValueError(f"a seed schedule needs >= 1 lane, got {lanes}")
        self.direction_seed = direction_seed
        self.lanes = lanes
        self._rounds_known = 0
        self._where: dict[int, list[tuple[int, int]]] = {}

    def seeds_of(self, round_index: int) -> Iterator[int]:
        """The seeds of one round, lane by lane."""
        for lane in range(self.lanes):
            yield candidate_seed(self.direction_seed, round_index, lane)

    def lane_of(self, seed: int, round_index: int) -> int | None:
        """The lane of ``seed`` in round ``round_index``, or None if it is not that round's."""
        self._extend(round_index + 1)
        for where_round, lane in self._where.get(seed, ()):
            if where_round == round_index:
                return lane
        return None

    def first_round_of(self, seed: int, after: int, before: int) -> int | None:
        """The first round ``r`` with ``after < r < before`` whose lanes hold ``seed``."""
        self._extend(before)
        rounds = [r for r, _ in self._where.get(seed, ()) if after < r < before]
        return min(rounds) if rounds else None

    def _extend(self, rounds: int) -> None:
        for round_index in range(self._rounds_known, rounds):
            for lane, seed in enumerate(self.seeds_of(round_index)):
                self._where.setdefault(seed, []).append((round_index, lane))
        self._rounds_known = max(self._rounds_known, rounds)
