"""GSM8K on CPU: completion-likelihood fitness in a small stated setting, and generation timing.

Reads the GSM8K training file (``--data``, default ``../shared/data/gsm8k/train.jsonl``;
the project's code and tests never need it) and carves, with a fixed seed, disjoint
train / dev / test problems from it: the holders' training problems, a dev set (unused
here: nothing is tuned), and at most 100 test problems reported once.

1. **Completion-likelihood fitness.** 3 holders, BBoxER's (1+lambda)-ES with mirrored pairs
   on the 576 log-scales of SmolLM2's final norm, each answer scored on the holder's whole
   training split by the mean log-likelihood of the reference solution (``answer``: the
   worked solution and its ``#### N``) after ``Question: ...\\nAnswer:``. Held-out: the test
   problems' mean NLL of the reference solution (nats per token) and greedy exact match
   (``gsm8k`` extractor, numeric match, ``--max-new-tokens``) before and after, with a
   Wilson interval and McNemar's exact p.
2. **Generation fitness, timed.** The same test problems decoded greedily in batches with
   the KV cache: seconds per problem, here and in ``tests/test_generation.py`` (tiny model).

    python bench/bench_gsm8k.py --holder-problems 8 --rounds 6 --test 50
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sottovoce.common.config import parse_config
from sottovoce.common.data import Record, gsm8k_records, shard
from sottovoce.common.fitness import GenerationFitness, build_fitness, merge_scores
from sottovoce.common.models import load_model
from sottovoce.common.protocol.messages import FitnessSpec
from sottovoce.common.stats import accuracy_interval, mcnemar_pvalue
from sottovoce.heldout import HeldOut
from sottovoce.local import drive_locally, open_local_holders
from sottovoce.server.coordinator import Coordinator
from sottovoce.server.run_state import RunState

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
PROMPT = "Question: {question}\nAnswer:"
SECONDS = "generation_seconds_per_problem"


def carve(records: list[Record], train: int, dev: int, test: int) -> tuple[list[Record], ...]:
    shuffled = list(records)
    random.Random(20261201).shuffle(shuffled)
    return (
        shuffled[:train],
        shuffled[train : train + dev],
        shuffled[train + dev : train + dev + test],
    )


def held_out(
    held: HeldOut, problems: list[Record], generation: GenerationFitness
) -> dict[str, Any]:
    """Mean NLL of the reference solutions and greedy exact match, with the incumbent."""
    scores, _ = held.evaluator.score_incumbent(problems)
    started = time.perf_counter()
    parts = [
        generation.score_model(held.evaluator.model, batch)
        for batch in generation.prepare(problems, max_batch=10)
    ]
    seconds = time.perf_counter() - started
    correct = merge_scores(parts, len(problems)).correct
    return {
        "nll": float(-np.mean(scores)),
        "correct": correct,
        "generation_seconds_per_problem": seconds / len(problems),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--holder-problems", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--test", type=int, default=50)
    parser.add_argument("--dev", type=int, default=50)
    parser.add_argument("--step", type=float, default=0.002)
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if not args.data.exists():
        raise SystemExit(f"{args.data}: no GSM8K file here (the bench reads ../shared/data)")
    torch.set_num_threads(args.threads)
    train, _dev, test = carve(
        gsm8k_records(args.data), 3 * args.holder_problems, args.dev, args.test
    )
    fitness = {"kind": "completion", "prompt_template": PROMPT, "target_field": "answer"}
    config = parse_config(
        {
            "run": {
                "name": "gsm8k",
                "algorithm": "bboxer-1+lambda",
                "max_rounds": args.rounds,
                "bit_budget": 3 * args.rounds * 3.17 + 1,
                "seed": 7,
            },
            "parametrization": {"kind": "scale", "patterns": ["model.norm.weight"]},
            "optimizer": {
                "initial_step": args.step,
                "min_step": 1e-4,
                "max_step": 0.05,
                "candidates": 8,
                "mirrored": True,
            },
            "evaluation": {"mode": "full", "batch_size": 8},
            "fitness": fitness,
            "server": {"min_holders": 3, "quorum": 3, "round_timeout_s": 7200.0},
        },
        "bench_gsm8k",
    )
    generation_spec = FitnessSpec(
        kind="generation",
        prompt_template=PROMPT,
        label_words=(),
        target_field="answer",
        max_new_tokens=args.max_new_tokens,
        answer_extractor="gsm8k",
        answer_match="numeric",
    )
    base_loaded = load_model(config.model.name)
    generation = build_fitness(generation_spec, base_loaded.tokenizer)
    assert isinstance(generation, GenerationFitness)
    before = held_out(HeldOut(config, base_loaded), test, generation)
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        holders = open_local_holders(config, base_loaded.fingerprint, shard(train, 3), root)
        state = RunState.open(root / "run", config, "gsm8k", base_loaded.fingerprint)
        coordinator = Coordinator(config, state, base_loaded.fingerprint)
        drive_locally(coordinator, holders)
        steps = list(state.log)
        bits = state.bits_total
    run_seconds = time.time() - started
    tuned = HeldOut(config, load_model(config.model.name))
    tuned.evaluator.apply_steps(steps)
    after = held_out(tuned, test, generation)
    em_before = accuracy_interval(before["correct"].tolist())
    em_after = accuracy_interval(after["correct"].tolist())
    test_p = mcnemar_pvalue(before["correct"].tolist(), after["correct"].tolist())
    print(
        json.dumps(
            {
                "setting": f"SmolLM2-135M-Instruct float32 CPU, {args.threads} threads; 3 holders "
                f"x {args.holder_problems} GSM8K training problems, (1+8)-ES mirrored on the "
                f"final norm's 576 log-scales, step {args.step}, {args.rounds} rounds, "
                "completion-likelihood fitness of the reference solution on the whole split; "
                f"{args.test} test problems, greedy decoding of {args.max_new_tokens} tokens",
                "bits_per_holder": round(bits / 3, 2),
                "accepted_steps": len(steps),
                "run_seconds": round(run_seconds, 1),
                "test_nll_before": round(before["nll"], 4),
                "test_nll_after": round(after["nll"], 4),
                "exact_match_before": [round(v, 3) for v in em_before],
                "exact_match_after": [round(v, 3) for v in em_after],
                "mcnemar_p": test_p.p_value,
                "generation_seconds_per_problem": round(
                    (
                        before["generation_seconds_per_problem"]
                        + after["generation_seconds_per_problem"]
                    )
                    / 2,
                    3,
                ),
            }
        )
    )


if __name__ == "__main__":
    main()
