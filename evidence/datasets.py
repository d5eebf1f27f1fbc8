"""The example sets an evaluation needs, and where each comes from.

- **members**: the holders' training examples (the run's ``holders/holder-*/data.jsonl``,
  or files the auditor names);
- **non-members**, **reference pool** and **selection**: disjoint slices of examples from the
  same distribution that no holder ever had. Non-members are the attack's negatives; LiRA's
  reference models train on halves of the pool; the selection set picks the baseline's
  epoch (the test split is never used to choose anything);
- **held-out**: the run's own test split, for utility before/after;
- **out-of-domain** sets the user names (a bundled set such as ``amazon`` product reviews,
  or a file), for utility under a domain shift.

For a run of the bundled sentiment demo all of these are carved from the bundled data with
the run config's split, and the members are checked to be exactly the training examples the
split gave out.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sottovoce.common.config import RunConfig
from sottovoce.common.data import (
    SENTIMENT_SOURCES,
    Record,
    canonical_line,
    load_records,
    records_hash,
    sentiment_records,
)
from sottovoce.common.errors import ConfigError, DataError
from sottovoce.common.protocol.messages import FitnessSpec
from sottovoce.common.quality import cap_records
from sottovoce.federation import bundled_split

DEFAULT_SELECTION = 500
DEFAULT_OOD_CAP = 1000


@dataclass(frozen=True)
class EvaluationData:
    """Every example set of an evaluation (see the module docstring)."""

    members: list[Record]
    nonmembers: list[Record]
    reference_pool: list[Record]
    selection: list[Record]
    heldout: list[Record]
    heldout_name: str
    ood: dict[str, list[Record]] = field(default_factory=dict)
    source: str = ""

    def summary(self) -> dict[str, object]:
        """Sizes and hashes, so a report says exactly what it measured on."""
        sets = {
            "members": self.members,
            "nonmembers": self.nonmembers,
            "reference_pool": self.reference_pool,
            "selection": self.selection,
            self.heldout_name: self.heldout,
            **{f"ood:{name}": records for name, records in self.ood.items()},
        }
        return {
            "source": self.source,
            "sets": {
                name: {"examples": len(records), "sha256": records_hash(records)}
                for name, records in sets.items()
            },
        }


def read_members(files: Sequence[Path], fitness: FitnessSpec) -> list[Record]:
    """The members: every record of the holders' data files, in file order."""
    if not files:
        raise ConfigError("no member files: give --members, or a run with holders/*/data.jsonl")
    fields = fitness.record_fields
    return [record for path in files for record in load_records(path, fields)]


def bundled_sentiment_data(
    config: RunConfig,
    members: list[Record],
    *,
    ood: Sequence[str] = (),
    selection_size: int = DEFAULT_SELECTION,
    ood_cap: int = DEFAULT_OOD_CAP,
    seed: int = 0,
) -> EvaluationData:
    """The sets of a run on the bundled sentiment data, from the run config's own split."""
    sim = config.simulate
    splits, given_out = bundled_split(config)
    if {canonical_line(r) for r in members} != {canonical_line(r) for r in given_out}:
        raise DataError(
            "the members are not the bundled split's training examples (simulate.train_size = "
            f"{sim.train_size}); for other data give --nonmembers and --heldout files"
        )
    unused = splits.train[len(given_out) :]
    heldout = splits.test if sim.eval_split == "test" else splits.dev
    return carve(
        members,
        unused,
        heldout,
        heldout_name=sim.eval_split,
        ood=read_ood(ood, config.fitness, ood_cap, seed),
        selection_size=selection_size,
        seed=seed,
        source=f"bundled sentiment data, split of the run config (seed {seed} for the carving)",
    )


def carve(
    members: list[Record],
    unused: Sequence[Record],
    heldout: list[Record],
    *,
    heldout_name: str,
    ood: dict[str, list[Record]],
    selection_size: int = DEFAULT_SELECTION,
    seed: int = 0,
    source: str = "",
) -> EvaluationData:
    """Non-members (as many as members), a selection set, and the rest as reference pool.

    The pool gets up to twice as many examples as there are members, so each reference model
    trains on a random half of it: as many examples as the target saw.
    """
    n = len(members)
    member_lines = {canonical_line(r) for r in members}
    candidates = [r for r in unused if canonical_line(r) not in member_lines]
    random.Random(seed).shuffle(candidates)
    selection_size = min(selection_size, len(candidates) // 5)
    if len(candidates) - selection_size < n + 2:
        raise DataError(
            f"{len(candidates)} unused examples are too few for {n} non-members, a selection "
            "set and a reference pool; give more non-member data"
        )
    nonmembers = candidates[:n]
    selection = candidates[n : n + selection_size]
    pool = candidates[n + selection_size : n + selection_size + 2 * n]
    return EvaluationData(
        members=members,
        nonmembers=nonmembers,
        reference_pool=pool,
        selection=selection,
        heldout=heldout,
        heldout_name=heldout_name,
        ood=ood,
        source=source,
    )


def read_ood(
    names: Sequence[str], fitness: FitnessSpec, cap: int, seed: int
) -> dict[str, list[Record]]:
    """Out-of-domain sets by bundled name (``amazon``) or file path, at most ``cap`` each."""
    sets: dict[str, list[Record]] = {}
    for name in names:
        if name in SENTIMENT_SOURCES:
            sets[name] = cap_records(sentiment_records(name), cap, seed)
            continue
        path = Path(name)
        if not path.exists():
            raise ConfigError(
                f"--ood {name}: neither a bundled set ({', '.join(SENTIMENT_SOURCES)}) "
                "nor an existing file"
            )
        sets[path.stem] = cap_records(load_records(path, fitness.record_fields), cap, seed)
    return sets
