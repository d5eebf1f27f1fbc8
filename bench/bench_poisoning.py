"""One poisoned data holder out of 5: how far does it move a run, per aggregate rule?

DPZero rows: the poisoned holder answers every task with the largest value the wire
carries (+1000) instead of its clipped, noised estimate: the worst a single liar can do
to a mean. BBoxER rows (`bboxer:0`, `bboxer:1`): the demo's (1+7)-ES with full-split
comparisons, and the liar always votes that the first candidate is better, without
looking at its data.
The run is otherwise the DPZero benchmark's (`bench_dpzero.py`): SmolLM2-135M-Instruct,
the final norm's 576 log-scales, Poisson batches of 64 expected examples, non-private so
that only the poisoning differs, the same seeds for every row. Prints held-out accuracy
(95% Wilson) for a clean run and for poisoned runs under each aggregate rule.

    python bench/bench_poisoning.py --split test --steps 1000
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from sottovoce.client.holder import DataHolder
from sottovoce.common.config import RunConfig, parse_config
from sottovoce.common.data import sentiment_records, shard, split_sentiment
from sottovoce.common.models import load_model
from sottovoce.common.protocol.answers import AnswerKind
from sottovoce.common.protocol.messages import Answer, Task
from sottovoce.common.stats import accuracy_interval, mcnemar_pvalue
from sottovoce.heldout import HeldOut
from sottovoce.local import drive_locally, open_local_holders
from sottovoce.server.coordinator import Coordinator
from sottovoce.server.run_state import RunState

HOLDERS = 5
POISON = 1000.0  # the largest |value| the wire accepts


def poison(holder: DataHolder) -> None:
    """Make ``holder`` lie: +POISON to every DPZero task, "candidate 1 is better" to BBoxER."""
    honest = holder.answer

    def lie(task: Task) -> Answer:
        if task.answer_kind is not AnswerKind.DP_SCALAR:
            return Answer(task_id=task.task_id, choice=1)
        answer = honest(task)
        return answer if answer.refused else Answer(task_id=task.task_id, choice=None, value=POISON)

    holder.answer = lie  # type: ignore[method-assign]


def bboxer_config(args: argparse.Namespace) -> RunConfig:
    return parse_config(
        {
            "run": {"name": "poison", "algorithm": "bboxer-1+lambda", "max_rounds": 150,
                    "bit_budget": 5 * 150 * 3, "seed": args.seed},
            "parametrization": {"kind": "scale", "patterns": ["model.norm.weight"]},
            "optimizer": {"initial_step": 0.05, "min_step": 0.001, "max_step": 0.5,
                          "candidates": 7},
            "evaluation": {"mode": "full"},
            "server": {"min_holders": HOLDERS, "quorum": HOLDERS},
        },
        "bench_poisoning",
    )  # fmt: skip


def run_one(
    args: argparse.Namespace,
    rule: str,
    poisoned: bool,
    train: list[Any],
    held: list[Any],
    zero: HeldOut,
) -> dict[str, Any]:
    config = bboxer_config(args) if rule == "bboxer" else parse_config(
        {
            "run": {"name": "poison", "algorithm": "dpzero", "max_rounds": args.steps,
                    "bit_budget": 1e9, "seed": args.seed},
            "parametrization": {"kind": "scale", "patterns": ["model.norm.weight"]},
            "evaluation": {"mode": "poisson", "batch_size": 64},
            "dpzero": {"learning_rate": 0.5, "smoothing": 0.01, "clip": 1.0, "aggregate": rule,
                       "trim_fraction": 0.2},
            "server": {"min_holders": HOLDERS, "quorum": HOLDERS},
        },
        "bench_poisoning",
    )  # fmt: skip
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = load_model(config.model.name)
        holders = open_local_holders(config, base.fingerprint, shard(train, HOLDERS), root)
        if poisoned:
            poison(holders[-1])
        state = RunState.open(root / "run", config, "bench", base.fingerprint)
        drive_locally(Coordinator(config, state, base.fingerprint), holders)
        trained = HeldOut(config, base)
        trained.cache = zero.cache
        trained.evaluator.apply_steps(list(state.log))
        after = trained.correct(held)
        for holder in holders:
            holder.ledger.close()
    accuracy, low, high = accuracy_interval(after.tolist())
    test = mcnemar_pvalue(zero.correct(held).tolist(), after.tolist())
    return {
        "aggregate": "plurality vote (BBoxER)" if rule == "bboxer" else rule,
        "poisoned_holders": int(poisoned),
        "accuracy": round(accuracy, 4),
        "ci95": [round(low, 4), round(high, 4)],
        "mcnemar_p_vs_zero_shot": test.p_value,
        "seconds": round(time.time() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", choices=["dev", "test"], default="test")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=20261123)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--rows", nargs="+", default=["mean:0", "mean:1", "median:1", "trimmed-mean:1"]
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    splits = split_sentiment(sentiment_records())
    train = list(splits.train[:1500])
    held = list(splits.dev if args.split == "dev" else splits.test)
    print(
        f"setting: SmolLM2-135M-Instruct float32, {args.threads} threads, {HOLDERS} holders x "
        f"{1500 // HOLDERS} train examples, non-private DPZero on the final norm's 576 "
        f"log-scales, {args.steps} steps, Poisson batches of 64, lr 0.5, smoothing 0.01, clip 1;"
        f" the poisoned holder answers +{POISON:g}; bboxer rows: (1+7)-ES, 150 rounds, full-split"
        f" comparisons, the liar always votes for candidate 1; held out: {args.split} "
        f"({len(held)})",
        flush=True,
    )
    norm_scales = {"parametrization": {"kind": "scale", "patterns": ["model.norm.weight"]}}
    zero = HeldOut(parse_config(norm_scales, "zero"), load_model("smollm2-135m-instruct"))
    accuracy, low, high = accuracy_interval(zero.correct(held).tolist())
    print(json.dumps({"zero_shot": round(accuracy, 4), "ci95": [round(low, 4), round(high, 4)]}))
    for row in args.rows:
        rule, poisoned = row.split(":")
        print(json.dumps(run_one(args, rule, poisoned == "1", train, held, zero)), flush=True)


if __name__ == "__main__":
    main()
