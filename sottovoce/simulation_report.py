"""The simulation's report: held-out accuracy before and after, the bound, and DP figures.

What ``sottovoce simulate`` prints and writes to ``report.json`` (the fields the README
documents). It reads the holders' local reports and status files as their operator
would; none of it is sent to the coordinator.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from sottovoce.common.accounting import ACCOUNTANT_NAME, NEIGHBOURING_RELATION
from sottovoce.common.bounds import bound_report, generalization_slack
from sottovoce.common.config import RunConfig
from sottovoce.common.protocol.messages import DpSpec, RunSpec
from sottovoce.common.stats import accuracy_interval, mcnemar_pvalue
from sottovoce.common.storage import read_json_object
from sottovoce.federation import Federation
from sottovoce.server.run_report import run_complexity
from sottovoce.server.run_state import RunState


def build_report(
    config: RunConfig,
    spec: RunSpec,
    state: RunState,
    federation: Federation,
    before: np.ndarray,
    after: np.ndarray,
    train_errors: int,
) -> dict[str, Any]:
    """The final report (the fields the README documents)."""
    acc_before, lo_before, hi_before = accuracy_interval(before.tolist())
    acc_after, lo_after, hi_after = accuracy_interval(after.tolist())
    mcnemar = mcnemar_pvalue(before.tolist(), after.tolist())
    n_train = len(federation.train)
    delta = config.run.bound_delta
    slack = generalization_slack(state.bits_total, n_train, delta)
    train_risk = train_errors / n_train
    how = (
        "each comparison used the holder's whole training split"
        if config.evaluation.mode == "full"
        else "the answers were computed from secret minibatches of them"
    )
    return {
        "algorithm": config.run.algorithm,
        "parametrization": json.loads(config.parametrization.canonical_id()),
        "model": config.model.name,
        "compute_dtype": config.model.dtype,
        "rounds": len(state.rounds),
        "accepted_steps": state.log.version,
        "finished_reason": state.finished_reason,
        "bit_budget": config.run.bit_budget,
        "bits_spent_total": state.bits_total,
        "bits_spent_per_holder": dict(sorted(state.bits_per_holder.items())),
        "heldout_split": config.simulate.eval_split,
        "heldout_examples": len(federation.test),
        "heldout_sha256": federation.test_hash,
        "heldout_metric": "accuracy",
        "heldout_metric_before": acc_before,
        "heldout_metric_before_ci95": [lo_before, hi_before],
        "heldout_metric_after": acc_after,
        "heldout_metric_after_ci95": [lo_after, hi_after],
        "mcnemar": {
            "improved": mcnemar.improved,
            "worsened": mcnemar.worsened,
            "p_value": mcnemar.p_value,
        },
        "generalization_bound": {
            **bound_report(
                run_complexity(config, spec, state),
                train_risk,
                n_train,
                delta,
                measured_test_risk=1.0 - acc_after,
                extra_assumptions=(
                    f"n is all training examples of all holders ({how}); the train risk is "
                    "pooled from the holders' local reports",
                ),
            ),
            "slack": slack,
            "test_risk_bound": train_risk + slack,
        },
        "run_id": state.run_id,
        "log_head": state.log.head,
        **_dp_report(config, spec.dp, state, federation),
    }


def _dp_report(
    config: RunConfig, spec: DpSpec, state: RunState, federation: Federation
) -> dict[str, Any]:
    """ε per holder from the holders' own ledgers (read as their operator), and the curve
    of the holders' local training fitness, for DP runs."""
    if config.run.algorithm != "dpzero" and not spec.private:
        return {}
    holders: dict[str, Any] = {}
    curves = []
    for index, holder_dir in enumerate(federation.holder_dirs):
        report = read_json_object(holder_dir / "report.json") or {}
        status = read_json_object(holder_dir / "status.json") or {}
        holders[f"holder-{index}"] = {
            key: report.get(key)
            for key in (
                "dp_answers_this_run",
                "epsilon_this_run",
                "lifetime_epsilon_spent",
                "lifetime_epsilon_max",
                "epsilon_delta",
            )
        }
        curves.append(status.get("history") or [])
    length = min((len(c) for c in curves), default=0)
    curve = [float(np.mean([c[i] for c in curves])) for i in range(length)]
    return {
        "privacy": {
            "accountant": ACCOUNTANT_NAME,
            "neighbouring_relation": NEIGHBOURING_RELATION,
            "target_epsilon": spec.epsilon or None,
            "delta": config.privacy.delta,
            "noise_multiplier": spec.noise_multiplier,
            "randomized_response_epsilon": spec.randomized_response_epsilon or None,
            "chunks": spec.chunks or None,
            "vote_noise": spec.vote_noise or None,
            "sampling_rate": config.sampling_rate,
            "clip": spec.clip if config.run.algorithm == "dpzero" else None,
            "quantization_bits": spec.quantization_bits,
            "steps": len(state.rounds),
            "per_holder": holders,
        },
        "training_fitness_curve": {
            "what": "mean over holders of each holder's local score on its own answer batch "
            "(mean log-probability of the right label), one point per answered task; "
            "read from the holders' status files, never sent to the coordinator",
            "points": curve,
        },
    }


def mean_holder_score(federation: Federation) -> float | None:
    """Mean of the holders' latest incumbent minibatch score (from their local status files)."""
    scores = []
    for holder_dir in federation.holder_dirs:
        status = read_json_object(holder_dir / "status.json")
        if status is not None and status.get("last_incumbent_score") is not None:
            scores.append(float(status["last_incumbent_score"]))
    return float(np.mean(scores)) if scores else None


def pooled_train_errors(federation: Federation, log_head: str) -> int | None:
    """Training errors of the final model, summed over the holders' local reports.

    The simulation plays every holder's operator, so it may read their local reports; a
    report made on another log head (a holder that did not reach the final model) does not
    count, and then the caller scores the training data itself.
    """
    errors = 0
    for holder_dir in federation.holder_dirs:
        report = read_json_object(holder_dir / "report.json")
        if report is None or report.get("log_head") != log_head:
            return None
        errors += int(report["train_errors"])
    return errors


def holder_costs(federation: Federation) -> dict[str, dict[str, float]]:
    """Each simulated holder's own cost figures (its local report's ``cost``): forward
    passes, compute seconds, bytes on the wire. A holder without a report is left out."""
    costs: dict[str, dict[str, float]] = {}
    for holder_dir in federation.holder_dirs:
        report = read_json_object(holder_dir / "report.json")
        if report is not None and isinstance(report.get("cost"), dict):
            costs[str(report.get("holder_id", holder_dir.name))] = report["cost"]
    return costs
