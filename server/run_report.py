"""What the coordinator can say about a run from its own state alone (no holder data).

Written to ``report.json`` in the run directory when a served run finishes. For DP runs
it states the ε each holder spent *as the coordinator computes it*: that holder's number
of answers, each a Poisson-subsampled Gaussian at the sampling rate the run was
calibrated for. A holder whose data set is larger spent less, one whose data set is
smaller more; the authoritative figure is in each holder's own ledger and local report.

It also says whether the run's model is still a language model, on bundled public sets only
(a coordinator has no data): perplexity on the general-text set and accuracy on the
out-of-domain sets, against the base model (:mod:`sottovoce.common.quality`). In-domain
figures and the KL on the task's prompts need the holders' data: they are in the holders'
local reports and in ``sottovoce simulate`` / ``sottovoce evaluate``.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from typing import Any

import torch

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
from sottovoce.common.data import Record
from sottovoce.common.errors import SottovoceError
from sottovoce.common.fitness import build_fitness
from sottovoce.common.models import load_model
from sottovoce.common.protocol.answers import AnswerKind, encode_choice, ranking_bits
from sottovoce.common.protocol.messages import RunSpec
from sottovoce.common.quality import (
    OOD_DEFAULT,
    QualityFigures,
    TextWindows,
    forward_margins,
    forward_perplexity,
    ood_records,
    quality_section,
    text_windows,
)
from sottovoce.server.export import replay
from sottovoce.server.run_state import RunState


def coordinator_report(
    config: RunConfig,
    state: RunState,
    spec: RunSpec,
    *,
    public_quality: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Rounds, steps, bits per holder, (for DP runs) ε per holder and the estimates, and the
    model's quality on public sets.

    ``public_quality``: that section, measured by the caller (:func:`measure_public_quality`
    loads the base model and replays the log; ``simulate`` measures the same sets from a
    cached prefix); without it the report has none, so writing a report stays cheap.
    """
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
    if public_quality is not None:
        report["quality_on_public_sets"] = dict(public_quality)
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


def measure_public_quality(config: RunConfig, state: RunState) -> dict[str, Any]:
    """Perplexity ratio and out-of-domain accuracy of the run's model against the base.

    Plain forward passes on the bundled general-text set and the bundled out-of-domain sets.
    A failure (a model or set that cannot be loaded) is reported in the section as a one-line
    ``error``, so a finished run's report is still written.
    """
    try:
        loaded = load_model(config.model.name, dtype="float32")
        fitness = build_fitness(config.fitness, loaded.tokenizer)
        positions = getattr(loaded.model.config, "max_position_embeddings", None)
        windows = text_windows(loaded.tokenizer, max_positions=positions)
        sets = ood_records(OOD_DEFAULT)
        figures = []
        with torch.no_grad():
            for moved in (False, True):
                if moved:
                    loaded.model.load_state_dict(replay(loaded, config, state.log))
                measured = {
                    name: forward_margins(loaded.model, fitness, records)
                    for name, records in sets.items()
                }
                correct = {name: flags for name, (flags, _) in measured.items()}
                margins = {name: m for name, (_, m) in measured.items() if m is not None}
                perplexity = forward_perplexity(loaded.model, windows)
                figures.append(QualityFigures(perplexity, correct, {}, margins))
    except SottovoceError as exc:
        return {"error": str(exc)}
    return public_quality_section(figures[0], figures[1], windows, sets)


def public_quality_section(
    base: QualityFigures,
    tuned: QualityFigures,
    windows: TextWindows,
    ood: Mapping[str, list[Record]],
) -> dict[str, Any]:
    """The coordinator's view of the quality: perplexity and the public out-of-domain sets,
    no in-domain figure and no KL on the task's prompts (those need the holders' data)."""

    def public(figures: QualityFigures) -> QualityFigures:
        correct = {name: figures.correct[name] for name in ood}
        margins = {name: figures.margins[name] for name in ood if name in figures.margins}
        return QualityFigures(figures.perplexity, correct, {}, margins)

    return {
        "what": "public sets only: the coordinator has no data (in-domain figures and the "
        "KL on the task's prompts are in the holders' local reports and sottovoce evaluate)",
        **quality_section(
            public(base),
            public(tuned),
            windows=windows,
            sets=ood,
            roles=dict.fromkeys(ood, "out-of-domain"),
        ),
    }
