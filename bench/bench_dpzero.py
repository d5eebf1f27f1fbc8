"""DPZero on the sentiment task with SmolLM2-135M: private vs non-private vs zero-shot.

Runs the coordinator and 3 data holders in one process (`sottovoce.local`: the real
Coordinator, DataHolder, policies and ledgers, no transport) for each privacy level, with
the same steps, seeds and data, and prints held-out accuracy with a 95% Wilson interval,
the paired McNemar p-value against the zero-shot model, the ε each holder's own ledger
computed, and seconds, all from one run. Each holder's policy allows exactly the run's ε
(written by `sottovoce simulate`'s policy writer), so every answer is checked and charged.

The CPU setting (stated in the output): the final norm's 576 per-channel log-scales
(`scale`), Poisson batches of 64 expected examples from each holder's 500, a few
hundred steps. The holder caches each example's input to the final norm once, so a
step costs a norm and two output rows per example, for two perturbed models.

    python bench/bench_dpzero.py --split dev --epsilons inf --learning-rates 0.5 0.2 --steps 1000
    python bench/bench_dpzero.py --split test --epsilons 2 6 inf --learning-rates 0.5 --steps 1000
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from sottovoce.common.config import RunConfig, parse_config
from sottovoce.common.data import sentiment_records, shard, split_sentiment
from sottovoce.common.models import LoadedModel, load_model
from sottovoce.common.stats import accuracy_interval, mcnemar_pvalue
from sottovoce.heldout import HeldOut
from sottovoce.local import drive_locally, open_local_holders
from sottovoce.server.coordinator import Coordinator
from sottovoce.server.run_state import RunState

HOLDERS = 3


def build_config(args: argparse.Namespace, epsilon: float, learning_rate: float) -> RunConfig:
    per_holder = args.train_size // HOLDERS
    privacy: dict[str, Any] = {"delta": args.delta, "examples_per_holder": per_holder}
    if math.isfinite(epsilon):
        privacy["epsilon"] = epsilon
    return parse_config(
        {
            "run": {
                "name": "dpzero",
                "algorithm": "dpzero",
                "max_rounds": args.steps,
                "bit_budget": 1e9,
                "seed": args.seed,
            },
            "parametrization": {"kind": "scale", "patterns": ["model.norm.weight"]},
            "evaluation": {"mode": "poisson", "batch_size": args.batch_size},
            "dpzero": {
                "learning_rate": learning_rate,
                "smoothing": args.smoothing,
                "clip": args.clip,
                "aggregate": "mean",
            },
            "privacy": privacy,
            "server": {"min_holders": HOLDERS, "quorum": HOLDERS},
        },
        "bench_dpzero",
    )


def run_one(
    config: RunConfig, base: LoadedModel, train: list[Any], held: list[Any], zero_shot: HeldOut
) -> dict[str, Any]:
    baseline = zero_shot.correct(held)
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        holders = open_local_holders(config, base.fingerprint, shard(train, HOLDERS), root)
        state = RunState.open(root / "run", config, "bench", base.fingerprint)
        coordinator = Coordinator(config, state, base.fingerprint)
        drive_locally(coordinator, holders)
        trained = HeldOut(config, load_model(config.model.name))
        trained.cache = zero_shot.cache  # same layers before the final norm: same prefixes
        trained.evaluator.apply_steps(list(state.log))
        after = trained.correct(held)
        epsilons = [
            holder.local_report(state.bits_total).get("epsilon_this_run") for holder in holders
        ]
        curves = [holder.status.history for holder in holders]
        for holder in holders:
            holder.ledger.close()
    accuracy, low, high = accuracy_interval(after.tolist())
    test = mcnemar_pvalue(baseline.tolist(), after.tolist())
    curve = [sum(c[i] for c in curves) / len(curves) for i in range(min(map(len, curves)))]
    tenth = max(1, len(curve) // 10)
    return {
        "epsilon": config.privacy.epsilon,
        "noise_multiplier": round(coordinator.spec.dp.noise_multiplier, 4),
        "learning_rate": config.dpzero.learning_rate,
        "accuracy": round(accuracy, 4),
        "ci95": [round(low, 4), round(high, 4)],
        "mcnemar_p_vs_zero_shot": test.p_value,
        "fixed": test.improved,
        "broken": test.worsened,
        "holder_epsilon_from_ledger": [None if e is None else round(e, 4) for e in epsilons],
        "steps_taken": state.log.version,
        "train_fitness_first_tenth": round(sum(curve[:tenth]) / tenth, 4) if curve else None,
        "train_fitness_last_tenth": round(sum(curve[-tenth:]) / tenth, 4) if curve else None,
        "seconds": round(time.time() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", choices=["dev", "test"], default="dev")
    parser.add_argument("--epsilons", type=float, nargs="+", default=[2.0, 6.0, math.inf])
    parser.add_argument("--learning-rates", type=float, nargs="+", default=[0.02])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--train-size", type=int, default=1500)
    parser.add_argument("--smoothing", type=float, default=0.01)
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=20261123)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    splits = split_sentiment(sentiment_records())
    train = list(splits.train[: args.train_size])
    held = list(splits.dev if args.split == "dev" else splits.test)
    print(
        f"setting: SmolLM2-135M-Instruct float32, {args.threads} threads, {HOLDERS} holders x "
        f"{args.train_size // HOLDERS} train examples, DPZero on the final norm's 576 "
        f"log-scales, {args.steps} steps, Poisson batches of {args.batch_size} expected "
        f"examples per holder, smoothing {args.smoothing}, clip {args.clip}, delta "
        f"{args.delta}, mean of the holders' scalars; held out: {args.split} "
        f"({len(held)} examples)",
        flush=True,
    )
    base = load_model("smollm2-135m-instruct")
    zero_shot = HeldOut(build_config(args, math.inf, 0.01), base)
    accuracy, low, high = accuracy_interval(zero_shot.correct(held).tolist())
    print(json.dumps({"zero_shot": round(accuracy, 4), "ci95": [round(low, 4), round(high, 4)]}))
    for learning_rate in args.learning_rates:
        for epsilon in args.epsilons:
            config = build_config(args, epsilon, learning_rate)
            print(json.dumps(run_one(config, base, train, held, zero_shot)), flush=True)


if __name__ == "__main__":
    main()
