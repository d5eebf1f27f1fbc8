"""Private comparisons that still learn? Chunk votes against randomized response at equal ε.

Runs one setting (a run config under ``examples/``: its data, holders, rounds, seed and
optimizer) once per row, each row the same run with another answer mechanism, in one
process (``sottovoce.local``: the real Coordinator, DataHolders, policies and ledgers, no
transport), and prints held-out accuracy with a 95% Wilson interval, the exact McNemar
p-value against the zero-shot model, the ε each holder's own ledger charged, the bits and
the seconds, all from one run of this script.

Rows (``--rows``, each ``name[:key=value,...]``):

* ``plain``: the config's comparisons, no DP (``lam=1`` for the (1+1)-ES);
* ``rr:eps=E``: randomized response on every choice, per-answer ε calibrated so that
  ``run.max_rounds`` answers cost E at ``privacy.delta`` (dp-accounting);
* ``cv:eps=E,K=64,lam=1,m=1``: chunk votes, noise calibrated the same way (``noise=S``
  states the std instead, ``noise=0`` is noiseless chunk voting), keep margin ``m`` noise
  stds;
* ``dpzero:eps=E``: DPZero at the same ε with its own step count, batches, learning rate
  and coefficient cap (``--dpzero-*``; the defaults are issue 11's dev choice, the one
  DPZero setting on dev that keeps the model whole: 25 steps, lr 0.02, |coefficient| at
  most 0.002), for reference.

``--drift`` also measures every row's model as ``sottovoce evaluate`` does
(:class:`~sottovoce.evidence.drift.DriftMeter`, as ``bench/sweep_drift.py``): accuracy on
the 1,000 Amazon sentences, the perplexity ratio to the base on the bundled general text
and the mean KL(base || model) on the held-out prompts.

Speed: the setting touches only the final norm, so every record's input to it is computed
once (cached under ``--cache`` across rows and invocations) and shared by every row's
holders and by the held-out scoring; a round then costs a norm and two output rows per
example and candidate. Choose K and noise with ``--split dev``; report with ``--split test``.

    python bench/bench_chunkvote.py --config examples/chunkvote-demo-data.toml --split dev \\
        --repeats 2 --rows plain cv:eps=6,K=64,m=1
    python bench/bench_chunkvote.py --config examples/chunkvote-demo-data.toml --split test \\
        --drift --rows plain rr:eps=2 rr:eps=6 cv:eps=2,K=64,m=1 cv:eps=6,K=64,m=1 \\
        dpzero:eps=2 dpzero:eps=6
    python bench/bench_chunkvote.py --config examples/chunkvote-data-rich.toml --split test \\
        --rows plain rr:eps=2 rr:eps=6 cv:eps=2,K=64,m=1 cv:eps=6,K=64,m=1 \\
        dpzero:eps=2 dpzero:eps=6
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sottovoce.api import read_config
from sottovoce.client.evaluator import record_key, suffix_start
from sottovoce.client.holder import DataHolder
from sottovoce.common.accounting import calibrate_randomized_response, calibrate_vote_noise
from sottovoce.common.config import RunConfig, parse_config, read_toml
from sottovoce.common.data import Record, shard
from sottovoce.common.fitness import build_fitness
from sottovoce.common.models import LoadedModel, load_model
from sottovoce.common.parametrizations.registry import build_parametrization
from sottovoce.common.quality import ood_records, text_windows
from sottovoce.common.stats import accuracy_interval, mcnemar_pvalue
from sottovoce.common.steplog import Step
from sottovoce.evidence.drift import DriftMeter
from sottovoce.evidence.scoring import SharedPrefixScorer
from sottovoce.federation import bundled_split
from sottovoce.heldout import HeldOut
from sottovoce.local import drive_locally, join_all, open_local_holders
from sottovoce.server.coordinator import Coordinator
from sottovoce.server.run_state import RunState

Row = tuple[str, dict[str, float]]


def parse_row(text: str) -> Row:
    name, _, rest = text.partition(":")
    if name not in ("plain", "rr", "cv", "dpzero"):
        raise SystemExit(f"--rows: unknown row {name!r} (plain, rr, cv, dpzero)")
    options = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        options[key] = float(value)
    return name, options


def row_config(base: dict[str, Any], row: Row, args: argparse.Namespace) -> RunConfig:
    """The setting's config with the row's answer mechanism (everything else the same)."""
    name, options = row
    data = {key: dict(value) if isinstance(value, dict) else value for key, value in base.items()}
    privacy = {"delta": base.get("privacy", {}).get("delta", 1e-5)}
    optimizer = dict(data.get("optimizer", {}))
    lam = int(options.get("lam", optimizer.get("candidates", 1)))
    optimizer["candidates"] = lam
    if optimizer.get("mirrored") and lam % 2:
        optimizer["mirrored"] = False
    rounds = int(data["run"]["max_rounds"])
    data["run"]["algorithm"] = "bboxer-1+1" if lam == 1 else "bboxer-1+lambda"
    if name == "rr":
        privacy["randomized_response_epsilon"] = calibrate_randomized_response(
            options["eps"], privacy["delta"], rounds, lam + 1
        )
    elif name == "cv":
        privacy["chunks"] = int(options["K"])
        if "noise" in options:
            noise = options["noise"]
            if noise > 0:
                privacy["vote_noise"] = noise
        else:
            privacy["epsilon"] = options["eps"]
            noise = calibrate_vote_noise(options["eps"], privacy["delta"], rounds)
        if options.get("m"):  # the keep margin, in noise stds (votes without noise)
            privacy["keep_margin"] = options["m"] * (noise if noise > 0 else 1.0)
    elif name == "dpzero":
        smallest = min(len(s) for s in shard(bundled_split(parse(data))[1], holders(data)))
        data["run"]["algorithm"] = "dpzero"
        data["run"]["max_rounds"] = args.dpzero_steps
        data["run"]["bit_budget"] = 1e9
        data["evaluation"] = {"mode": "poisson", "batch_size": args.dpzero_batch}
        data["dpzero"] = {
            "learning_rate": args.dpzero_learning_rate,
            "smoothing": args.dpzero_smoothing,
            "clip": 1.0,
            "aggregate": "mean",
            "max_coefficient": args.dpzero_max_coefficient,
        }
        privacy.update(epsilon=options["eps"], examples_per_holder=smallest)
        optimizer = {}
    data["privacy"] = privacy
    data["optimizer"] = optimizer
    return parse(data)


def parse(data: dict[str, Any]) -> RunConfig:
    return parse_config(data, "bench_chunkvote")


def holders(data: dict[str, Any]) -> int:
    return int(data.get("simulate", {}).get("holders", 3))


def head_cache(
    path: Path, config: RunConfig, base: LoadedModel, records: list[Record]
) -> dict[str, torch.Tensor]:
    """Every record's final-norm input, computed once and kept on disk between rows."""
    cache: dict[str, torch.Tensor] = torch.load(path) if path.exists() else {}
    scorer = HeldOut(config, base)
    scorer.evaluator.share_head_inputs(cache)
    missing = [record for record in records if record_key(record) not in cache]
    started = time.time()
    for start in range(0, len(missing), 100):
        scorer.evaluator.score(missing[start : start + 100], [])  # fills the cache
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(cache, path)
    scorer.parametrization.detach()
    print(
        f"head inputs: {len(records) - len(missing)} of {len(records)} records cached, the "
        f"rest computed in {time.time() - started:.0f} s",
        flush=True,
    )
    return cache


def share_cache_at_join(holder: DataHolder, cache: dict[str, torch.Tensor]) -> None:
    """Give the holder's evaluator the cache as soon as it exists: at joining, the holder
    takes its KL-to-base reference on 128 of its own prompts, which reads those same head
    inputs (without the cache, 3 x 128 full forwards a row)."""
    take = holder._take_divergence_reference

    def shared_then_take(run: Any) -> None:
        run.evaluator.share_head_inputs(cache)
        take(run)

    setattr(holder, "_take_divergence_reference", shared_then_take)  # noqa: B010


class Drift:
    """Amazon accuracy, perplexity ratio and KL of a row's model against the base.

    The base's prefix (every block before the final norm) runs once on the 1,000 Amazon
    sentences ``sottovoce evaluate`` uses and on the general text; a row's model is then
    measured by its suffix alone (:class:`~sottovoce.evidence.drift.DriftMeter`).
    """

    def __init__(self, config: RunConfig, base: LoadedModel):
        started = time.time()
        self.config = config
        self.model = copy.deepcopy(base.model)  # no parametrization attached: the base
        parametrization = build_parametrization(config.parametrization)
        parametrization.attach(self.model)
        split = suffix_start(self.model, parametrization.touched_modules())
        parametrization.detach()
        scorer = SharedPrefixScorer(
            self.model, build_fitness(config.fitness, base.tokenizer), split
        )
        scorer.add("amazon", ood_records()["amazon"])
        positions = getattr(self.model.config, "max_position_embeddings", None)
        windows = text_windows(base.tokenizer, max_positions=positions)
        self.meter = DriftMeter(scorer, self.model, prompt_sets=["amazon"], windows=windows)
        print(
            f"drift meter: Amazon {len(scorer.records('amazon'))} sentences, "
            f"{windows.scored_tokens} general-text tokens, prepared in "
            f"{time.time() - started:.0f} s",
            flush=True,
        )

    def measure(self, steps: list[Step]) -> dict[str, Any]:
        model = copy.deepcopy(self.model)
        parametrization = build_parametrization(self.config.parametrization)
        parametrization.attach(model)
        for step in steps:
            parametrization.apply_step(step)
        tuned = self.meter.measure(model)
        parametrization.detach()
        base = self.meter.base
        before, after = base.correct["amazon"].tolist(), tuned.correct["amazon"].tolist()
        accuracy, low, high = accuracy_interval(after)
        test = mcnemar_pvalue(before, after)
        assert base.perplexity is not None and tuned.perplexity is not None
        return {
            "amazon_before": round(float(sum(before) / len(before)), 4),
            "amazon_accuracy": round(accuracy, 4),
            "amazon_ci95": [round(low, 4), round(high, 4)],
            "amazon_mcnemar_p": test.p_value,
            "perplexity_ratio": float(f"{tuned.perplexity.value / base.perplexity.value:.4g}"),
            "kl_amazon_nats": float(f"{tuned.kl['amazon']:.4g}"),
        }


def score_held_out(
    config: RunConfig,
    base: LoadedModel,
    cache: dict[str, torch.Tensor],
    held: list[Record],
    steps: list[Step],
) -> tuple[np.ndarray, np.ndarray]:
    """Per-sentence scores and correctness of the base plus ``steps`` on ``held``.

    HeldOut attaches its parametrization's hooks to the shared base module; they are taken
    off again here, or every later row would be scored with this row's scales on top of
    its own (the first version of this bench did that: rows after the first in one
    invocation were scored as the sum of all rows so far).
    """
    scorer = HeldOut(config, base)
    try:
        scorer.evaluator.share_head_inputs(cache)
        scorer.evaluator.apply_steps(steps)
        return scorer.evaluator.score_incumbent(held, scorer.cache)
    finally:
        scorer.parametrization.detach()


def run_row(
    config: RunConfig,
    row: Row,
    shards: list[list[Record]],
    held: list[Record],
    baseline: list[bool],
    cache: dict[str, torch.Tensor],
    base: LoadedModel,
    zero_scores: np.ndarray,
    drift: Drift | None = None,
) -> dict[str, Any]:
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        # Every head input is cached: a whole split is one batch of norm and two head rows.
        local = open_local_holders(config, base.fingerprint, shards, root, max_batch=4096)
        for holder in local:
            share_cache_at_join(holder, cache)
        state = RunState.open(root / "run", config, "bench", base.fingerprint)
        coordinator = Coordinator(config, state, base.fingerprint)
        join_all(coordinator, local)
        for holder in local:
            assert holder.evaluator is not None
            holder.evaluator.share_head_inputs(cache)
        drive_locally(coordinator, local)
        steps = list(state.log)
        scores, correct = score_held_out(config, base, cache, held, steps)
        after = correct.tolist()
        again, _ = score_held_out(config, base, cache, held, [])
        if not np.array_equal(again, zero_scores):  # no row may leak into the next
            raise SystemExit("the base no longer scores as zero-shot after a row")
        reports = [holder.local_report(state.bits_total) for holder in local]
        for holder in local:
            holder.ledger.close()
    accuracy, low, high = accuracy_interval(after)
    test = mcnemar_pvalue(baseline, after)
    spec = coordinator.spec
    epsilons = [r.get("epsilon_this_run") for r in reports]
    figures = drift.measure(steps) if drift is not None else {}
    return {
        "row": row[0] + (":" + ",".join(f"{k}={v:g}" for k, v in row[1].items()) if row[1] else ""),
        "mechanism": spec.mechanism,
        "candidates": config.optimizer.candidates if row[0] != "dpzero" else 1,
        "chunks": spec.dp.chunks or None,
        "vote_noise": round(spec.dp.vote_noise, 4) or None,
        "keep_margin": round(spec.dp.keep_margin, 4) or None,
        "rr_epsilon_per_answer": round(spec.dp.randomized_response_epsilon, 5) or None,
        "dpzero_noise_multiplier": round(spec.dp.noise_multiplier, 4) or None,
        "accuracy": round(accuracy, 4),
        "ci95": [round(low, 4), round(high, 4)],
        # The mean log-probability of the right label: a finer reading than accuracy.
        "heldout_mean_logprob": round(float(scores.mean()), 4),
        "mcnemar_p_vs_zero_shot": test.p_value,
        "fixed": test.improved,
        "broken": test.worsened,
        "holder_epsilon_from_ledger": [None if e is None else round(e, 4) for e in epsilons],
        "rounds": len(state.rounds),
        "steps_taken": state.log.version,
        "bits_heard": round(state.bits_total, 1),
        "train_risk_per_holder": [round(r["train_risk"], 4) for r in reports],
        **figures,
        "seconds": round(time.time() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--split", choices=["dev", "test"], default="dev")
    parser.add_argument("--rows", nargs="+", default=["plain"])
    parser.add_argument(
        "--held-out",
        type=int,
        default=0,
        help="score only the first N sentences of the split (0: all); for a slow machine",
    )
    parser.add_argument("--repeats", type=int, default=1, help="runs of each randomized row")
    parser.add_argument("--cache", type=Path, default=Path("runs/bench-cache/head-inputs.pt"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dpzero-steps", type=int, default=25)
    parser.add_argument("--dpzero-batch", type=int, default=64)
    parser.add_argument("--dpzero-learning-rate", type=float, default=0.02)
    parser.add_argument("--dpzero-smoothing", type=float, default=0.01)
    parser.add_argument("--dpzero-max-coefficient", type=float, default=0.002)
    parser.add_argument(
        "--drift",
        action="store_true",
        help="also Amazon accuracy, perplexity ratio and KL of every row's model",
    )
    parser.add_argument("--out", type=Path, default=None, help="append JSON lines here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [parse_row(text) for text in args.rows]
    config, _ = read_config(args.config)
    base_data = read_toml(args.config)
    splits, train = bundled_split(config)
    shards = shard(train, config.simulate.holders)
    held = list(splits.dev if args.split == "dev" else splits.test)
    if args.held_out:
        held = held[: args.held_out]
    print(
        f"setting {args.config}: {config.model.name} {config.model.dtype}, {args.threads} "
        f"threads, {len(shards)} holders x {min(map(len, shards))}-{max(map(len, shards))} "
        f"train sentences, {config.run.max_rounds} rounds, seed {config.run.seed}, "
        f"parametrization {config.parametrization.kind} {list(config.parametrization.patterns)}, "
        f"step {config.optimizer.initial_step} in [{config.optimizer.min_step}, "
        f"{config.optimizer.max_step}], delta {config.privacy.delta}; held out: {args.split} "
        f"({len(held)} sentences)",
        flush=True,
    )
    base = load_model(config.model.name)
    drift = Drift(config, base) if args.drift else None
    cache = head_cache(args.cache, config, base, [*train, *held])
    zero_scores, zero_correct = score_held_out(config, base, cache, held, [])
    baseline = zero_correct.tolist()
    accuracy, low, high = accuracy_interval(baseline)
    emit(
        args.out,
        {
            "row": "zero-shot",
            "accuracy": round(accuracy, 4),
            "ci95": [round(low, 4), round(high, 4)],
            "heldout_mean_logprob": round(float(zero_scores.mean()), 4),
        },
    )
    for row in rows:
        randomized = row[0] != "plain" and not (row[0] == "cv" and row[1].get("noise") == 0)
        for _ in range(args.repeats if randomized else 1):
            result = run_row(
                row_config(base_data, row, args),
                row,
                shards,
                held,
                baseline,
                cache,
                base,
                zero_scores,
                drift,
            )
            emit(args.out, result)


def emit(out: Path | None, result: dict[str, Any]) -> None:
    line = json.dumps(result)
    print(line, flush=True)
    if out is not None:
        with open(out, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")


if __name__ == "__main__":
    main()
