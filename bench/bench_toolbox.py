"""BBoxER's toolbox on the demo task: (1+lambda) vs CMA-ES vs diagonal CMA vs (mu/mu_w, lambda).

The demo's federation (3 holders of the bundled movie-review sentences, SmolLM2-135M,
full-split answers) runs in one process on the real Coordinator, DataHolder, policies and
ledgers (`sottovoce.local`, no transport), once per (parametrization, optimizer, budget):

* **budget-matched**: the same bits per holder. lambda = 8: a full ranking costs
  log2(8!) = 15.3 bits an answer, best-of-8 log2(9) = 3.17, so (1+8) gets 4.8x the rounds;
* **equal rounds**: every optimizer the same number of rounds (then (1+8) hears less).

Every run's model is scored on the dev split (the choice of step size is made there) and,
once, on the fixed test split (1,000 sentences, never seen by a holder): accuracy with its
Wilson 95% interval and the exact McNemar p against the base; the bundled Amazon sentences
(out of domain); the perplexity ratio to the base on a general text (issue 11's bundled
text when `sottovoce.common.quality` is present, else the Amazon sentences joined, and the
JSON says which); bits heard per holder; accepted steps; wall seconds. One JSON line a run.
Each run's log is written to `--logs` so its figures can be recomputed without rerunning
(`--rescore`).

    python bench/bench_toolbox.py --parametrization norm-scale --rounds 40
    python bench/bench_toolbox.py --parametrization lora-blocks --rounds 20 --train-size 300
    python bench/bench_toolbox.py --rescore runs/toolbox-logs
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

import numpy as np
import torch

from sottovoce.client.evaluator import Prefix, PrefixCache, suffix_hidden
from sottovoce.client.holder import DataHolder
from sottovoce.common.config import RunConfig, parse_config
from sottovoce.common.data import Record, sentiment_records, shard, split_sentiment
from sottovoce.common.fitness import PreparedBatch
from sottovoce.common.models import load_model
from sottovoce.common.protocol.answers import ranking_bits
from sottovoce.common.stats import accuracy_interval, mcnemar_pvalue
from sottovoce.common.steplog import Step
from sottovoce.heldout import HeldOut
from sottovoce.local import drive_locally, join_all, open_local_holders
from sottovoce.server.coordinator import Coordinator
from sottovoce.server.run_state import RunState

NORM = "model.norm.weight"
PARAMETRIZATIONS: dict[str, dict[str, Any]] = {
    # BBoxER's 576 per-channel log-scales of the final norm (the holders' head cache applies)
    "norm-scale": {"kind": "scale", "patterns": [NORM], "dimension": 576},
    # rank-1 LoRA B factors of the attention output of the last 2 blocks: 2 x 576 = 1152
    "lora-blocks": {
        "kind": "lora",
        "rank": 1,
        "patterns": [f"model.layers.{b}.self_attn.o_proj.weight" for b in (28, 29)],
        "dimension": 1152,
        "projection_seed": 1,
    },
    # EGGROLL-style seeded rank-1 moves of the same two matrices (seeded optimizers only)
    "lowrank-blocks": {
        "kind": "lowrank",
        "rank": 1,
        "patterns": [f"model.layers.{b}.self_attn.o_proj.weight" for b in (28, 29)],
    },
}


TINY_PARAMETRIZATIONS: dict[str, dict[str, Any]] = {  # --tiny: a smoke run of this script
    "norm-scale": {"kind": "scale", "patterns": [NORM], "dimension": 32},
    "lora-blocks": {
        "kind": "lora",
        "rank": 1,
        "patterns": [f"model.layers.{b}.self_attn.o_proj.weight" for b in (0, 1)],
        "dimension": 64,
        "projection_seed": 1,
    },
    "lowrank-blocks": {"kind": "lowrank", "rank": 1, "last_k_blocks": 1},
}
MODEL = {"name": "smollm2-135m-instruct"}


@dataclass(frozen=True)
class Optimizer:
    name: str
    algorithm: str
    mirrored: bool = False
    explicit: bool = False  # CMA: needs explicit coordinates


OPTIMIZERS = [
    Optimizer("(1+8)-ES", "bboxer-1+lambda", mirrored=True),
    Optimizer("CMA-ES", "cma-es", explicit=True),
    Optimizer("diagonal CMA", "cma-diagonal", explicit=True),
    Optimizer("(4/4_w,8)-ES", "es-mu-lambda", mirrored=True),
]
LAMBDA = 8


def config_for(
    parametrization: str, optimizer: Optimizer, rounds: int, step: float, seed: int
) -> RunConfig:
    table = TINY_PARAMETRIZATIONS if MODEL["name"].startswith("tiny") else PARAMETRIZATIONS
    spec = dict(table[parametrization])
    if not optimizer.explicit:
        spec.pop("dimension", None)
    bits = ranking_bits(LAMBDA) if optimizer.algorithm != "bboxer-1+lambda" else math.log2(9)
    return parse_config(
        {
            "run": {
                "name": "toolbox",
                "algorithm": optimizer.algorithm,
                "max_rounds": rounds,
                "bit_budget": 3 * rounds * bits + 1.0,
                "seed": seed,
            },
            "model": dict(MODEL),
            **(
                {"fitness": {"label_words": ["n", "p"]}} if MODEL["name"].startswith("tiny") else {}
            ),
            "parametrization": spec,
            "optimizer": {
                "initial_step": step,
                "min_step": min(step, 1e-4),
                "max_step": max(4 * step, 0.05),
                "candidates": LAMBDA,
                "mirrored": optimizer.mirrored,
                "rank_depth": 0,
            },
            "evaluation": {"mode": "full", "batch_size": 32},
            "server": {"min_holders": 3, "quorum": 3, "round_timeout_s": 3600.0},
            "simulate": {"max_holder_drift_linf": 4.0},
        },
        "bench_toolbox",
    )


class Scorer:
    """Held-out figures of one parametrization's models, every frozen prefix computed once.

    The base model is scored once. Everything before the first touched module (the final
    norm, or block 28) is the same for the base and every tuned model, so it is captured
    once per held-out batch, per perplexity window and per holder's training batch, and
    every later model runs only the suffix: what makes a block-level run affordable on
    two shared cores. The reuse is exact (the same modules on the same inputs).
    """

    def __init__(self, config: RunConfig, splits: Any, amazon: list[Record], args: Any):
        self.splits = splits
        self.amazon = amazon[: args.amazon_size]
        self.dev = splits.dev[: args.dev_size]
        self.test = splits.test[: args.test_size]
        self.base_loaded = load_model(config.model.name)
        base = HeldOut(config, self.base_loaded)
        self.caches = {name: PrefixCache() for name in self.sets()}
        self.base = {name: self.correct(base, name, recs) for name, recs in self.sets().items()}
        self.meter = PerplexityMeter(base, args.perplexity_tokens)
        self.base_ppl = self.meter.base
        self.donors: dict[int, Any] = {}

    def correct(self, held: HeldOut, name: str, records: list[Record]) -> np.ndarray:
        _, correct = held.evaluator.score_incumbent(records, self.caches[name])
        return correct

    def sets(self) -> dict[str, list[Record]]:
        return {"dev": self.dev, "test": self.test, "amazon": self.amazon}

    def figures(self, config: RunConfig, steps: list[Step]) -> dict[str, Any]:
        held = HeldOut(config, load_model(config.model.name))
        held.evaluator.apply_steps(steps)
        out: dict[str, Any] = {}
        for name, records in self.sets().items():
            after = self.correct(held, name, records)
            acc, low, high = accuracy_interval(after.tolist())
            test = mcnemar_pvalue(self.base[name].tolist(), after.tolist())
            out[name] = {
                "before": round(float(self.base[name].mean()), 4),
                "after": round(acc, 4),
                "ci95": [round(low, 4), round(high, 4)],
                "mcnemar_p": test.p_value,
                "fixed": test.improved,
                "broken": test.worsened,
            }
        out["perplexity_ratio"] = round(self.meter.perplexity(held) / self.base_ppl, 4)
        return out

    def prefill(self, holders: list[DataHolder], config: RunConfig) -> None:
        """Give each holder the caches its first round would fill (computed once per shard)."""
        for index, holder in enumerate(holders):
            evaluator = holder.evaluator
            assert evaluator is not None
            if index not in self.donors:
                donor = HeldOut(config, self.base_loaded).evaluator
                donor._prefix_cache = {} if donor.split is not None else None
                donor.score_incumbent(holder.records)
                self.donors[index] = (donor._head_cache, donor._prefix_cache)
            head, prefixes = self.donors[index]
            if evaluator._head_cache is not None and head is not None:
                evaluator._head_cache.update(head)
            if evaluator._prefix_cache is not None and prefixes is not None:
                evaluator._prefix_cache.update(prefixes)


class PerplexityMeter:
    """Perplexity on fixed 512-token windows, the frozen prefix of each computed once."""

    def __init__(self, base: HeldOut, tokens: int):
        self.windows = text_batches(base.evaluator.fitness.tokenizer, tokens)
        self.prefixes: list[Prefix | None] = [
            None if base.evaluator.split is None else base.evaluator._prefix(batch)
            for batch in self.windows
        ]
        self.base = self.perplexity(base)

    @torch.inference_mode()
    def perplexity(self, held: HeldOut) -> float:
        """exp(mean NLL) of every window token after the first."""
        evaluator = held.evaluator
        total, count = 0.0, 0
        for batch, prefix in zip(self.windows, self.prefixes, strict=True):
            if prefix is None or evaluator.parts is None or evaluator.split is None:
                logits = evaluator.model(**batch.model_inputs()).logits
            else:
                hidden = suffix_hidden(evaluator.parts, evaluator.split, prefix, 0)
                logits = evaluator.parts.head(hidden)
            log_probs = torch.log_softmax(logits[:, :-1].double(), dim=-1)
            targets = batch.input_ids[:, 1:].unsqueeze(-1)
            total -= float(log_probs.gather(-1, targets).sum())
            count += int(targets.numel())
        return math.exp(total / count)


def rescore_perplexity(folder: Path, tokens: int) -> None:
    """Saved runs' perplexity ratios on the current text (a run made before the merge)."""
    meters: dict[str, PerplexityMeter] = {}
    for path in sorted(folder.glob("*.json")):
        saved = json.loads(path.read_text())
        config = parse_config(saved["config"], str(path))
        parametrization = path.name.split("__")[0]
        if parametrization not in meters:
            meters[parametrization] = PerplexityMeter(
                HeldOut(config, load_model(config.model.name)), tokens
            )
        meter = meters[parametrization]
        held = HeldOut(config, load_model(config.model.name))
        held.evaluator.apply_steps([Step.from_json(s) for s in saved["steps"]])
        ratio = meter.perplexity(held) / meter.base
        print(json.dumps({"log": str(path), "text": text_name(), "perplexity_ratio": ratio}))


def text_batches(tokenizer: Any, tokens: int) -> list[PreparedBatch]:
    """Windows of 512 tokens of issue 11's bundled general text, or of Amazon sentences."""
    try:
        from sottovoce.common.quality import general_text

        text = general_text()
    except ImportError:
        text = " ".join(str(r["text"]) for r in sentiment_records("amazon"))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:tokens]
    rows = torch.tensor(ids[: (len(ids) // 512) * 512], dtype=torch.long).view(-1, 512)
    return [
        PreparedBatch(
            input_ids=row.unsqueeze(0),
            attention_mask=torch.ones(1, 512, dtype=torch.long),
            position_ids=torch.arange(512).unsqueeze(0),
            logits_to_keep=0,
            example_index=torch.tensor([i]),
        )
        for i, row in enumerate(rows)
    ]


def text_name() -> str:
    try:
        from sottovoce.common.quality import GENERAL_TEXT_NAME

        return str(GENERAL_TEXT_NAME)
    except ImportError:
        return "the bundled Amazon sentences joined (issue 11's general text not merged yet)"


def run_one(
    parametrization: str,
    optimizer: Optimizer,
    rounds: int,
    step: float,
    matching: str,
    args: argparse.Namespace,
    splits: Any,
    scorer: Scorer,
) -> dict[str, Any]:
    config = config_for(parametrization, optimizer, rounds, step, args.seed)
    train = list(splits.train[: args.train_size])
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = load_model(config.model.name)
        holders = open_local_holders(config, base.fingerprint, shard(train, 3), root)
        state = RunState.open(root / "run", config, "bench", base.fingerprint)
        coordinator = Coordinator(config, state, base.fingerprint)
        join_all(coordinator, holders)
        scorer.prefill(holders, config)
        drive_locally(coordinator, holders)
        seconds = time.time() - started
        steps = list(state.log)
        for holder in holders:
            holder.ledger.close()
        refused = sum(h.status.refused for h in holders)
    name = f"{parametrization}|{optimizer.name}|{matching}|step{step:g}"
    log_path = Path(args.logs) / (name.replace("|", "__").replace("/", "_") + ".json")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text(
        json.dumps(
            {"config": config.model_dump(mode="json"), "steps": [s.to_json() for s in steps]}
        )
    )
    result = {
        "parametrization": parametrization,
        "optimizer": optimizer.name,
        "algorithm": optimizer.algorithm,
        "matching": matching,
        "initial_step": step,
        "lambda": LAMBDA,
        "rounds": rounds,
        "bits_per_holder": round(state.bits_total / 3, 2),
        "accepted_steps": len(steps),
        "refused": refused,
        "run_seconds": round(seconds, 1),
        "log": str(log_path),
    }
    result.update(scorer.figures(config, steps))
    return result


def rescore(folder: Path, scorer_for: Any) -> None:
    for path in sorted(folder.glob("*.json")):
        saved = json.loads(path.read_text())
        config = parse_config(saved["config"], str(path))
        steps = [Step.from_json(s) for s in saved["steps"]]
        parametrization = path.name.split("__")[0]
        print(json.dumps({"log": str(path), **scorer_for(parametrization).figures(config, steps)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parametrization", choices=sorted(PARAMETRIZATIONS), default="norm-scale")
    parser.add_argument("--rounds", type=int, default=40, help="rank rounds (budget and equal)")
    parser.add_argument("--steps", type=float, nargs="+", default=[0.005])
    parser.add_argument("--train-size", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=20261123)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="*", default=None, help="optimizer names")
    parser.add_argument("--matching", nargs="*", default=["budget", "rounds"])
    parser.add_argument("--logs", default="runs/toolbox-logs")
    parser.add_argument("--rescore", type=Path, default=None)
    parser.add_argument("--amazon-size", type=int, default=1000)
    parser.add_argument("--dev-size", type=int, default=500, help="the first n of dev")
    parser.add_argument("--test-size", type=int, default=1000, help="the first n of test")
    parser.add_argument("--perplexity-tokens", type=int, default=2048)
    parser.add_argument("--tiny", action="store_true", help="smoke run on the tiny test model")
    parser.add_argument("--rescore-perplexity", type=Path, default=None)
    args = parser.parse_args()
    if args.tiny:
        MODEL["name"] = "tiny-llama"
    torch.set_num_threads(args.threads)
    splits = split_sentiment(sentiment_records())
    amazon = _amazon()
    started = time.time()
    if args.rescore_perplexity is not None:
        rescore_perplexity(args.rescore_perplexity, args.perplexity_tokens)
        return
    if args.rescore is not None:
        scorers: dict[str, Scorer] = {}

        def scorer_for(name: str) -> Scorer:
            config = config_for(name, OPTIMIZERS[0], 1, 0.01, args.seed)
            return scorers.setdefault(name, Scorer(config, splits, amazon, args))

        rescore(args.rescore, scorer_for)
        return
    scorer = Scorer(
        config_for(args.parametrization, OPTIMIZERS[0], 1, 0.01, args.seed), splits, amazon, args
    )
    print(
        json.dumps(
            {
                "setting": f"SmolLM2-135M-Instruct float32, {args.threads} threads, 3 holders x "
                f"{args.train_size // 3} train sentences, full-split answers, lambda {LAMBDA}, "
                f"rank rounds {args.rounds}; dev {len(scorer.dev)}, test {len(scorer.test)} "
                "(the first of the fixed split), Amazon "
                f"{len(scorer.amazon)}; "
                f"perplexity on {args.perplexity_tokens // 512 * 512} tokens of {text_name()}",
                "base_perplexity": round(scorer.base_ppl, 3),
                "setup_seconds": round(time.time() - started, 1),
            }
        ),
        flush=True,
    )
    budget_rounds = round(args.rounds * ranking_bits(LAMBDA) / math.log2(LAMBDA + 1))
    for optimizer in OPTIMIZERS:
        if args.only and optimizer.name not in args.only:
            continue
        if optimizer.explicit and args.parametrization == "lowrank-blocks":
            continue  # millions of coordinates: CMA's explicit space cannot reach them
        for step in args.steps:
            plans = []
            if optimizer.algorithm == "bboxer-1+lambda":
                if "budget" in args.matching:
                    plans.append(("budget", budget_rounds))
                if "rounds" in args.matching:
                    plans.append(("rounds", args.rounds))
            else:
                plans.append(("budget=rounds", args.rounds))
            for matching, rounds in plans:
                result = run_one(
                    args.parametrization, optimizer, rounds, step, matching, args, splits, scorer
                )
                print(json.dumps(result), flush=True)


def _amazon() -> list[Record]:
    try:
        from sottovoce.common.quality import ood_records

        return ood_records()["amazon"]
    except ImportError:
        import random

        records = sentiment_records("amazon")
        random.Random(0).shuffle(records)
        return records[:1000]


if __name__ == "__main__":
    main()
