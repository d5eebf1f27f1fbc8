"""The (mu/mu_w, lambda)-ES over seeded directions, told only the aggregated ranking.

Each round asks lambda candidates ``sigma * z(seed_i)`` on the public seed schedule (or
mirrored pairs ``+-sigma z``), the holders rank them, and the mean moves to the weighted
recombination of the mu best:

    x <- x + sum_{p < mu} w_p * sigma * z(seed of the p-th best)

with pycma's recombination weights (``cma.recombination_weights.RecombinationWeights``:
positive, decreasing, summing to 1; mu = the ranking's depth, at most lambda // 2). The
update is logged as one ``(seed, w_p * sigma)`` step per selected seed (a mirrored pair
that is selected twice is one step with the summed coefficient), so the log, its chain, the
holders' seed checks and export stay those of every seeded run, and any dimension works:
this is the rank-based ES for ``lowrank`` and ``full`` spaces, where CMA's explicit
coordinates cannot go. sigma is fixed (``optimizer.initial_step``), as in the ES-at-scale
work (Qiu et al. 2025, EGGROLL): step-size adaptation by path length needs the directions
themselves, which this strategy never materializes.

What it uses from the answers is the Copeland aggregate (:mod:`.ranks`) alone, and only
its top mu: it needs no worst ranks.
"""

from __future__ import annotations

from cma.recombination_weights import RecombinationWeights

from sottovoce.common.config import RunConfig
from sottovoce.common.protocol.answers import AnswerKind, ranked_count
from sottovoce.common.protocol.messages import Candidate
from sottovoce.common.protocol.seeds import candidate_seed
from sottovoce.common.steplog import Step, float32_toward_zero
from sottovoce.server.strategies.base import RoundAnswers, RoundOutcome, Strategy, register
from sottovoce.server.strategies.ranks import aggregate_choices


def recombination_weights(candidates: int, mu: int) -> list[float]:
    """pycma's positive recombination weights for the mu best of lambda (sum 1)."""
    weights = RecombinationWeights(2 * mu)
    positive = [float(w) for w in weights[:mu]]
    return [w / sum(positive) for w in positive]


class WeightedES(Strategy):
    """(mu/mu_w, lambda)-ES with seeded directions and a fixed sigma (module doc)."""

    answer_kind = AnswerKind.RANKING

    def __init__(
        self,
        *,
        run_seed: int,
        candidates: int,
        sigma: float,
        rank_depth: int,
        mirrored: bool = False,
        weights: dict[str, float] | None = None,
    ):
        if candidates < 2:
            raise ValueError("a ranking needs at least two candidates")
        self.run_seed = run_seed
        self.candidates = candidates
        self.sigma = float32_toward_zero(sigma)
        self.rank_depth = rank_depth
        self.mirrored = mirrored
        self.weights = dict(weights or {})
        self.mu = min(ranked_count(candidates, rank_depth), candidates // 2)
        self.recombination = recombination_weights(candidates, self.mu)

    @property
    def step_size(self) -> float:
        return self.sigma

    def ask(self, round_index: int) -> tuple[Candidate, ...]:
        if not self.mirrored:
            return tuple(
                Candidate(seed=candidate_seed(self.run_seed, round_index, i), scale=self.sigma)
                for i in range(self.candidates)
            )
        pairs = []
        for i in range(self.candidates // 2):
            seed = candidate_seed(self.run_seed, round_index, i)
            pairs += [
                Candidate(seed=seed, scale=self.sigma),
                Candidate(seed=seed, scale=-self.sigma),
            ]
        return tuple(pairs)

    def tell(self, answers: RoundAnswers) -> RoundOutcome:
        ranking = aggregate_choices(answers.choices, self.candidates, self.rank_depth, self.weights)
        coefficients: dict[int, float] = {}
        for index, weight in zip(ranking[: self.mu], self.recombination, strict=False):
            chosen = answers.candidates[index]
            coefficients[chosen.seed] = coefficients.get(chosen.seed, 0.0) + weight * chosen.scale
        steps = tuple(
            Step(seed=seed, coefficient=float32_toward_zero(value))
            for seed, value in coefficients.items()
            if float32_toward_zero(value) != 0.0
        )
        return RoundOutcome(steps=steps, ranking=ranking)


@register("es-mu-lambda")
def weighted_es(config: RunConfig, step_size: float | None) -> WeightedES:
    opt = config.optimizer
    return WeightedES(
        run_seed=config.run.seed,
        candidates=opt.candidates,
        sigma=opt.initial_step,
        rank_depth=opt.rank_depth,
        mirrored=opt.mirrored,
        weights=config.server.holder_weights,
    )
