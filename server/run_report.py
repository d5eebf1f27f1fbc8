"""What the coordinator can say about a run from its own state alone (no holder data).

Written to ``report.json`` in the run directory when a served run finishes. For DP runs
it states the ε each holder spent *as the coordinator computes it*: that holder's number
of answers, each a Poisson-subsampled Gaussian at the sampling rate the run was
calibrated for. A holder whose data set is larger spent less, one whose data set is
smaller more; the authoritative figure is in each holder's own ledger and local report.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

from sottovoce.common.accounting import (
    ACCOUNTANT_NAME,
    NEIGHBOURING_RELATION,
    PrivacyAccountant,
    answer_event,
)
from sottovoce.common.bounds import (
    Complexity,
    choice_transcript_bits,
    fixed_rate_transcript_bits,
)
from sottovoce.common.config import RunConfig
from sottovoce.common.protocol.answers import AnswerKind, encode_choice, ranking_bits
from sottovoce.common.protocol.messages import RunSpec
from sottovoce.server.run_state import RunState


def coordinator_report(config: RunConfig, state: RunState, spec: RunSpec) -> dict[str, Any]:
    """Rounds, steps, bits per holder, evictions, and (for DP runs) ε per holder and the
    estimates."""
    report: dict[str, Any] = {
        "run_id": state.run_id,
        "algorithm": config.run.algorithm,
        "rounds": len(state.rounds),
        "accepted_steps": state.log.version,
        "log_head": state.log.head,
        "finished_reason": state.finished_reason,
        "bits_spent_total": state.bits_total,
        "bits_spent_per_holder": dict(sorted(state.bits_per_holder.items())),
        # The bound's data-free term: the holders and `sottovoce evaluate` put the train risk
        # beside it (docs/bound.md); the coordinator has no data, so no bound of its own.
        "generalization_complexity": run_complexity(config, spec, state).to_json(),
        "evictions": [  # holders dropped for missing rounds in a row (they may have rejoined)
            {
                "holder": e.holder_id,
                "round": e.round_index,
                "missed_rounds": e.missed_rounds,
                "time": e.time,
            }
            for e in state.evictions
        ],
    }
    candidates = 1 if spec.answer_kind is AnswerKind.DP_SCALAR else config.optimizer.candidates
    event = answer_event(spec.dp, spec.answer_kind, candidates, config.sampling_rate)
    if event is None:
        return report
    answers: Counter[str] = Counter()  # refusals cost nothing and are not counted
    for closed in state.rounds:
        answers.update([*closed.values, *closed.choices])
    delta = spec.dp.delta
    report["privacy_as_computed_by_the_coordinator"] = {
        "accountant": ACCOUNTANT_NAME,
        "neighbouring_relation": NEIGHBOURING_RELATION,
        "event": event.to_json(),
        "delta": delta,
        "target_epsilon": spec.dp.epsilon or None,
        "epsilon_per_holder": {
            holder: PrivacyAccountant([event] * count).epsilon(delta)
            for holder, count in sorted(answers.items())
        },
        "answers_per_holder": dict(sorted(answers.items())),
        "note": "assumes each holder has privacy.examples_per_holder examples; each "
        "holder's own ledger has the authoritative figure",
    }
    if config.run.algorithm == "dpzero":
        report["estimates"] = [closed.estimate for closed in state.rounds]
    return report


def run_complexity(config: RunConfig, spec: RunSpec, state: RunState) -> Complexity:
    """The code length of the run's aggregated transcript (docs/bound.md).

    Comparison runs: each closed round's outcome is the accepted candidate (1 + its index)
    or none (0: no winner, no quorum). Rank runs: each round's aggregated top-mu ranking, one
    of lambda!/(lambda-mu)! values, log2 of that a round (no compression). DPZero: each round
    is its step's float32 coefficient, 32 bits, whatever was heard; a quantized run's
    aggregate of H holders' k-bit levels takes at most H (2^k - 1) + 1 values, counted with H
    the holders heard.
    """
    rounds = len(state.rounds)
    if spec.answer_kind is AnswerKind.DP_SCALAR:
        per_round = 32.0
        if spec.dp.quantization_bits:
            holders = max(1, len(state.bits_per_holder))
            levels = holders * (2**spec.dp.quantization_bits - 1) + 1
            per_round = min(per_round, math.log2(levels) + math.log2(holders + 1))
        bits = fixed_rate_transcript_bits(rounds, per_round)
        code = f"fixed rate, {per_round:.3g} bits a round"
    elif spec.answer_kind is AnswerKind.RANKING:
        per_round = ranking_bits(config.optimizer.candidates, spec.rank_depth)
        bits = fixed_rate_transcript_bits(rounds, per_round)
        code = f"fixed rate, log2(lambda!/(lambda-mu)!) = {per_round:.3g} bits a round"
    else:
        outcomes = [
            encode_choice(closed.winner) if closed.step is not None else 0
            for closed in state.rounds
        ]
        bits = choice_transcript_bits(outcomes, config.optimizer.candidates)
        code = "choice transcript (Elias delta + the better of two KT codes)"
    return Complexity(
        transcript_bits=bits,
        grid_bits=0.0,
        heard_bits=state.bits_total,
        rounds=rounds,
        code=code,
    )
