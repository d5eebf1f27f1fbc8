"""CMA-ES and diagonal (separable) CMA-ES over explicit coordinates, told only ranks.

pycma (``cma``, Hansen's reference implementation) does the optimizing through its
ask/tell interface; this module only turns its samples into explicit candidates and the
holders' aggregated ranking into what ``tell`` takes. Why pycma and not nevergrad: both
install here, but nevergrad's ``tell`` takes one candidate's loss at a time and keeps an
archive of losses across rounds (for its recommendation), which per-round ranks do not
support; pycma's ``tell`` takes a whole population and uses only the order of its values
within it (its termination checks read the values, and are never consulted here).

* **What the library is told.** The Copeland aggregate of the holders' rankings
  (:mod:`.ranks`), as :func:`~.ranks.derived_losses`: the place of each named candidate
  and ``mu`` for every unnamed one. Nothing else reaches pycma: no fitness value exists
  on the coordinator.
* **Top-mu feedback.** With a ranking of depth ``mu < lambda`` the unnamed candidates tie;
  pycma's active update (negative weights for the worst) is turned off and at most ``mu``
  parents get a recombination weight (``CMA_mu``), so the tie is never read: neither the
  mean, the covariance nor the step size depends on the order among the unnamed (tested).
  A full ranking keeps pycma's defaults (active CMA included). Tied losses cannot inflate
  the step size either: pycma 4.5's step-size rule (CSA) reads only the weighted selected
  steps (CSA is set at every dimension: pycma's default from 300 coordinates on, TPA,
  injects mirrored samples across ask and tell), and its "flat fitness" check only stops a
  loop, which this strategy never runs. A round no holder answered is never told, so its
  samples are asked again in the next round (pycma's one ask per tell; replayed alike).
* **Explicit candidates and steps.** A sample ``x_k`` becomes the candidate
  ``delta_k = float32(x_k - x)``, clipped to ``optimizer.max_step`` per coordinate (the
  holders' ``max_perturbation_scale``), where x is the log's float32 position; a clipped
  sample is told as the point actually evaluated. After ``tell`` the new mean becomes the
  explicit step ``float32(m - x)``, x moves by it in float32 (the canonical replay), and
  pycma's mean is set to that x, so the library and the log never drift apart.
* **Determinism and restarts.** Samples come from a private ``numpy`` generator seeded by
  the run seed (pycma's ``randn`` option; its global-RNG seeding is off), so a restarted
  coordinator replays every journaled round, ask and tell, and gets pycma back exactly;
  the replayed candidates are checked against the journal.
"""

from __future__ import annotations

from collections.abc import Sequence

import cma
import numpy as np

from sottovoce.common.config import RunConfig
from sottovoce.common.errors import ConfigError, LogIntegrityError
from sottovoce.common.protocol.answers import AnswerKind, ranked_count
from sottovoce.common.protocol.messages import Candidate
from sottovoce.common.steplog import Step, float32_toward_zero
from sottovoce.server.strategies.base import RoundAnswers, RoundOutcome, Strategy, register
from sottovoce.server.strategies.ranks import aggregate_choices, derived_losses


class CMAStrategy(Strategy):
    """pycma's CMA-ES (``diagonal``: separable CMA) on explicit coordinates (module doc)."""

    answer_kind = AnswerKind.RANKING

    def __init__(
        self,
        *,
        dimension: int,
        candidates: int,
        sigma: float,
        rank_depth: int,
        max_scale: float,
        diagonal: bool,
        seed: int,
        weights: dict[str, float] | None = None,
    ):
        mu = ranked_count(candidates, rank_depth)
        self.candidates = candidates
        self.rank_depth = rank_depth
        # the largest float32 within the cap: a holder compares float32 deltas with it
        self.max_scale = float32_toward_zero(max_scale)
        self.weights = dict(weights or {})
        self._rng = np.random.default_rng(seed)
        options: dict[str, object] = {
            "popsize": candidates,
            "seed": float("nan"),  # no global np.random.seed: samples come from _randn
            "randn": self._randn,
            "verbose": -9,
            "verb_log": 0,
            "verb_disp": 0,
            "CMA_diagonal": diagonal,
            "tolflatfitness": float("inf"),
            # CSA at every dimension: from 300 coordinates on pycma would pick TPA, whose
            # two mirrored samples are injected by one ask for the next tell, so a round no
            # holder answered breaks its next ask; and TPA reads the mirrors' losses.
            "AdaptSigma": cma.sigma_adaptation.CMAAdaptSigmaCSA,
        }
        if mu < candidates:  # top-mu: never read the tie among the unnamed
            options["CMA_active"] = False
            options["CMA_mu"] = min(mu, candidates // 2)
        self.es = cma.CMAEvolutionStrategy(np.zeros(dimension), sigma, options)
        self._x = np.zeros(dimension, dtype=np.float32)  # the log's position
        self._asked: dict[int, tuple[tuple[Candidate, ...], list[np.ndarray]]] = {}

    def _randn(self, rows: int, columns: int) -> np.ndarray:
        return self._rng.standard_normal((rows, columns))

    @property
    def step_size(self) -> float:
        return float(self.es.sigma)

    @property
    def position(self) -> np.ndarray:
        """The log's float32 position x (a copy)."""
        return self._x.copy()

    def ask(self, round_index: int) -> tuple[Candidate, ...]:
        if round_index not in self._asked:
            if self._asked and round_index < max(self._asked):
                raise ConfigError(f"CMA cannot ask round {round_index} again after a later one")
            # pycma wants one tell per ask: a round nobody answered (all refused, or
            # timed out) is never told, so its samples are asked again in the next round.
            untold = list(self._asked.values())
            self._asked = {round_index: untold[-1] if untold else self._sample()}
        return self._asked[round_index][0]

    def _sample(self) -> tuple[tuple[Candidate, ...], list[np.ndarray]]:
        candidates, told = [], []
        base = self._x.astype(np.float64)
        for sample in self.es.ask():
            raw = np.asarray(sample, dtype=np.float64) - base
            delta = np.clip(raw, -self.max_scale, self.max_scale).astype(np.float32)
            delta = np.clip(delta, -self.max_scale, self.max_scale)  # float32 rounding
            clipped = bool(np.any(np.abs(raw) > self.max_scale))
            told.append(base + delta.astype(np.float64) if clipped else np.asarray(sample))
            candidates.append(Candidate.explicit(tuple(float(v) for v in delta)))
        return tuple(candidates), told

    def tell(self, answers: RoundAnswers) -> RoundOutcome:
        told = self._told_for(answers.candidates)
        ranking = aggregate_choices(answers.choices, self.candidates, self.rank_depth, self.weights)
        self.es.tell(told, derived_losses(ranking, self.candidates))
        self._asked = {}
        raw = np.asarray(self.es.mean, dtype=np.float64) - self._x.astype(np.float64)
        delta = np.clip(raw, -self.max_scale, self.max_scale).astype(np.float32)
        delta = np.clip(delta, -self.max_scale, self.max_scale)
        self._x = (self._x + delta).astype(np.float32)
        self.es.mean[:] = self._x.astype(np.float64)
        if not np.any(delta):
            return RoundOutcome(ranking=ranking)
        step = Step.explicit(tuple(float(v) for v in delta))
        return RoundOutcome(steps=(step,), ranking=ranking)

    def _told_for(self, candidates: Sequence[Candidate]) -> list[np.ndarray]:
        for asked, told in self._asked.values():
            if tuple(candidates) == asked:
                return told
        raise ConfigError("CMA was told answers to candidates it did not ask last")

    def resume(self, history: Sequence[tuple[int, RoundAnswers | None]]) -> None:
        for round_index, answers in history:
            asked = self.ask(round_index)
            if answers is None:
                continue
            if asked != tuple(answers.candidates):
                raise LogIntegrityError(
                    f"round {round_index}: replaying CMA does not give the journaled candidates"
                )
            self.tell(answers)


def _cma(config: RunConfig, diagonal: bool) -> CMAStrategy:
    opt, spec = config.optimizer, config.parametrization
    if spec.dimension < 1:
        raise ConfigError(
            "parametrization.dimension: CMA searches explicit coordinates, so the run must "
            "state how many (e.g. 576 for SmolLM2's final-norm scales)"
        )
    return CMAStrategy(
        dimension=spec.dimension,
        candidates=opt.candidates,
        sigma=opt.initial_step,
        rank_depth=opt.rank_depth,
        max_scale=opt.max_step,
        diagonal=diagonal,
        seed=config.run.seed,
        weights=config.server.holder_weights,
    )


@register("cma-es")
def cma_es(config: RunConfig, step_size: float | None) -> CMAStrategy:
    """Full-covariance CMA-ES (its state is replayed on resume; ``step_size`` is not used)."""
    return _cma(config, diagonal=False)


@register("cma-diagonal")
def cma_diagonal(config: RunConfig, step_size: float | None) -> CMAStrategy:
    """Separable CMA-ES: a diagonal covariance, O(d) a sample instead of O(d^2)."""
    return _cma(config, diagonal=True)
