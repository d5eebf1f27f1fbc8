"""Which parametrization learns best on the demo task? Measured on the dev split.

Runs the demo's setting in one process (3 data holders over the same training shards as
`sottovoce simulate`, the coordinator's (1+1)-ES, no transport: `sottovoce.local`) for
each parametrization in a list, and prints dev accuracy before/after, the paired McNemar
p-value against the base model, bits, accepted steps and seconds, all from one run.
Nothing here looks at the test split.

    python bench/sweep_parametrizations.py --rounds 150 --train-size 1500
    python bench/sweep_parametrizations.py --only "norm-scale (1+7)"
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sottovoce.common.config import parse_config
from sottovoce.common.data import sentiment_records, shard, split_sentiment
from sottovoce.common.models import load_model
from sottovoce.common.stats import accuracy_interval, mcnemar_pvalue
from sottovoce.heldout import HeldOut
from sottovoce.local import drive_locally, open_local_holders
from sottovoce.server.coordinator import Coordinator
from sottovoce.server.run_state import RunState


@dataclass(frozen=True)
class Candidate:
    """One setting of the sweep: a parametrization and how the ES explores it."""

    name: str
    parametrization: dict[str, Any]
    lam: int = 7
    mode: str = "full"
    rounds: int | None = None  # None: the --rounds default
    initial_step: float = 0.05
    max_step: float = 0.5


NORM = ["model.norm.weight"]
CANDIDATES = [
    Candidate("norm-scale (1+7)", {"kind": "scale", "patterns": NORM}),
    Candidate("norm-scale (1+1)", {"kind": "scale", "patterns": NORM}, lam=1),
    Candidate("norm-select (1+7)", {"kind": "select", "patterns": NORM}),
    Candidate("norm-subspace-16 (1+7)", {"kind": "subspace", "patterns": NORM, "dimension": 16}),
    Candidate(
        "norm-scale-tensor (1+7)", {"kind": "scale", "patterns": NORM, "granularity": "tensor"}
    ),
    Candidate(
        "last-block+norm-scale (1+7), minibatch 32",
        {"kind": "scale", "patterns": [*NORM, "model.layers.29.*"]},
        mode="minibatch",
        rounds=40,
    ),
]


def run_one(candidate: Candidate, args: argparse.Namespace, splits: Any) -> dict[str, Any]:
    rounds = candidate.rounds or args.rounds
    algorithm = "bboxer-1+1" if candidate.lam == 1 else "bboxer-1+lambda"
    config = parse_config(
        {
            "run": {
                "name": "sweep",
                "algorithm": algorithm,
                "max_rounds": rounds,
                "bit_budget": 3 * rounds * math.log2(candidate.lam + 1),
                "seed": args.seed,
            },
            "parametrization": candidate.parametrization,
            "optimizer": {
                "initial_step": candidate.initial_step,
                "max_step": candidate.max_step,
                "min_step": 0.001,
                "candidates": candidate.lam,
            },
            "evaluation": {"mode": candidate.mode, "batch_size": args.batch_size},
            "server": {"min_holders": 3, "quorum": 2},
        },
        "sweep",
    )
    train = list(splits.train[: args.train_size])
    dev = list(splits.dev)
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = load_model(config.model.name)
        holders = open_local_holders(config, base.fingerprint, shard(train, 3), root)
        state = RunState.open(root / "run", config, "sweep", base.fingerprint)
        coordinator = Coordinator(config, state, base.fingerprint)
        held_out = HeldOut(config, base)
        before = held_out.correct(dev)
        drive_locally(coordinator, holders)
        held_out.evaluator.apply_steps(list(state.log))
        after = held_out.correct(dev)
        for holder in holders:
            holder.ledger.close()
    acc_before = accuracy_interval(before.tolist())
    acc_after = accuracy_interval(after.tolist())
    test = mcnemar_pvalue(before.tolist(), after.tolist())
    return {
        "name": candidate.name,
        "mode": candidate.mode,
        "rounds": rounds,
        "dimension": held_out.parametrization.dimension,
        "dev_before": round(acc_before[0], 4),
        "dev_after": round(acc_after[0], 4),
        "dev_after_ci95": [round(acc_after[1], 4), round(acc_after[2], 4)],
        "mcnemar_p": test.p_value,
        "fixed": test.improved,
        "broken": test.worsened,
        "bits": state.bits_total,
        "accepted": state.log.version,
        "final_step": coordinator.strategy.step_size,
        "seconds": round(time.time() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=150)
    parser.add_argument("--train-size", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=20261123)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="*", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    splits = split_sentiment(sentiment_records())
    print(
        f"setting: SmolLM2-135M-Instruct float32, {args.threads} threads, 3 holders x "
        f"{args.train_size // 3} train examples, {args.rounds} rounds unless stated, "
        f"minibatch {args.batch_size} where used, dev 500 (no test data)"
    )
    for candidate in CANDIDATES:
        if args.only and candidate.name not in args.only:
            continue
        print(json.dumps(run_one(candidate, args, splits)), flush=True)


if __name__ == "__main__":
    main()
