"""Learning without drifting: which setting gains in domain and keeps a language model? Dev only.

For each setting, the demo's federation (3 holders x 500 training sentences of the bundled
movie snippets, the demo's fitness and seeds) runs in one process on the real Coordinator,
DataHolder, policies and ledgers (`sottovoce.local`, no transport). The run's model is then
measured with `sottovoce.evidence.drift.DriftMeter` on the **dev** split (500 sentences),
the bundled Amazon sentences (the 1,000 `sottovoce evaluate` uses) and the bundled general
text, and one JSON line is printed per setting:

    in-domain dev accuracy before/after (Wilson 95%, McNemar p), Amazon accuracy
    before/after (McNemar p), perplexity ratio to the base, KL(base || tuned) on the dev
    prompts (nats), bits heard, accepted steps, the log-scales' range, seconds.

Nothing here reads the test split. Most settings move only the final norm, so the holders'
head-input caches apply: each holder's cache is filled once, by the same evaluator code on
the same batches as its own first round (the cached tensor is the input of the final norm
at each prompt's last position), and handed to that holder's evaluator in every such
setting. `--check` runs the first setting once more without that hand-over and says
whether the logs are identical.

The block-level settings (the last decoder block's two norms, a low-rank move of its
``down_proj``) cannot use that cache: the final norm's input changes with every step. The
holders' evaluators reuse prefixes across tasks instead (``cache_prefixes``, on for every
full-split run): each batch runs blocks 0-28 once, in the first round, and every later
round runs only block 29, the final norm and the label rows of the head, for the
incumbent and each candidate. The measuring side does the same: a second
:class:`DriftMeter` whose shared prefix stops before block 29 (built only when such a
setting is chosen). Each row gives the first round's seconds and the mean of the later
rounds' (all holders together, in this one process). DPZero settings draw secret Poisson
batches and noise, so they vary from run to run; BBoxER settings on full splits are
deterministic.

    python bench/sweep_drift.py                       # every setting
    python bench/sweep_drift.py --only demo small-steps-0.01
    python bench/sweep_drift.py --list
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sottovoce.client.evaluator import CandidateEvaluator, suffix_start
from sottovoce.common.config import RunConfig, parse_config
from sottovoce.common.data import Record, shard
from sottovoce.common.fitness import build_fitness
from sottovoce.common.models import LoadedModel, load_model
from sottovoce.common.parametrizations.registry import build_parametrization
from sottovoce.common.quality import QualityFigures, margin_auc, ood_records, text_windows
from sottovoce.common.stats import accuracy_interval, mcnemar_pvalue
from sottovoce.evidence.drift import DriftMeter
from sottovoce.evidence.scoring import SharedPrefixScorer
from sottovoce.federation import bundled_split
from sottovoce.local import drive_locally, join_all, open_local_holders
from sottovoce.server.coordinator import Coordinator
from sottovoce.server.run_state import RunState
from sottovoce.server.strategies import StepSizeRule
from sottovoce.server.strategies.low_norm import LowNormES

DEMO = Path(__file__).resolve().parent.parent / "examples" / "run.toml"
DPZERO = Path(__file__).resolve().parent.parent / "examples" / "dpzero.toml"
NORM = ["model.norm.weight"]
LAST_BLOCK = 29  # SmolLM2-135M has 30 decoder blocks
LAST_BLOCK_NORMS = [
    f"model.layers.{LAST_BLOCK}.input_layernorm.weight",
    f"model.layers.{LAST_BLOCK}.post_attention_layernorm.weight",
]
LAST_DOWN_PROJ = [f"model.layers.{LAST_BLOCK}.mlp.down_proj.weight"]


@dataclass(frozen=True)
class Setting:
    """One setting: overrides of the demo's (or DPZero example's) run config."""

    name: str
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    base: Path = DEMO
    low_norm_pool: int | None = None  # LowNormES: λ most inward of this many seeds


def es(
    name: str,
    step: float,
    max_step: float | None = None,
    *,
    lam: int = 7,
    rounds: int = 150,
    mirrored: bool = False,
    min_step: float | None = None,
    parametrization: dict[str, Any] | None = None,
    mode: str = "full",
    low_norm_pool: int | None = None,
    kl: tuple[float, int] | None = None,
) -> Setting:
    """A BBoxER setting: (1+λ)-ES, the one-fifth rule between min_step and max_step.

    ``kl = (weight, prompts)`` adds the holder's pinned divergence penalty: every choice
    subtracts weight x KL(base || candidate) on that many of the holder's secret prompts.
    """
    bits = 3 * rounds * (1.0 if lam == 1 else math.log2(lam + 1))
    penalty = {} if kl is None else {"fitness": {"kl_weight": kl[0], "kl_prompts": kl[1]}}
    return Setting(
        name,
        {
            **penalty,
            "run": {
                "algorithm": "bboxer-1+1" if lam == 1 else "bboxer-1+lambda",
                "max_rounds": rounds,
                "bit_budget": bits,
            },
            "optimizer": {
                "initial_step": step,
                "min_step": min(step, min_step if min_step is not None else step / 50),
                "max_step": max_step if max_step is not None else step,
                "candidates": lam,
                "mirrored": mirrored,
            },
            "parametrization": parametrization
            or {"kind": "scale", "granularity": "channel", "patterns": NORM},
            "evaluation": {"mode": mode},
        },
        low_norm_pool=low_norm_pool,
    )


def dpzero(name: str, lr: float, max_coefficient: float, steps: int = 1000) -> Setting:
    """A DPZero setting at the example's epsilon = 6 (noise calibrated for ``steps``)."""
    return Setting(
        name,
        {
            "run": {"max_rounds": steps, "bit_budget": 96.0 * steps},
            "dpzero": {"learning_rate": lr, "max_coefficient": max_coefficient},
        },
        base=DPZERO,
    )


SETTINGS = [
    es("demo (0.05, max 0.5)", 0.05, 0.5, min_step=0.001),
    es("steps 0.02, max 0.05", 0.02, 0.05),
    es("steps 0.01, max 0.02", 0.01, 0.02),
    es("steps 0.005, max 0.01", 0.005, 0.01),
    es("steps 0.002, max 0.004", 0.002, 0.004),
    es("fixed step 0.01", 0.01),
    es("fixed step 0.005", 0.005),
    es("mirrored 8, steps 0.01, max 0.02", 0.01, 0.02, lam=8, mirrored=True),
    es("mirrored 8, steps 0.005, max 0.01", 0.005, 0.01, lam=8, mirrored=True),
    es("(1+3), steps 0.01, max 0.02, 300 rounds", 0.01, 0.02, lam=3, rounds=300),
    es("(1+7), steps 0.005, max 0.01, 300 rounds", 0.005, 0.01, rounds=300),
    es("(1+1), steps 0.01, max 0.02, 450 rounds", 0.01, 0.02, lam=1, rounds=450),
    es("(1+7), steps 0.01, max 0.02, 75 rounds", 0.01, 0.02, rounds=75),
    es(
        "select (additive), steps 0.01, max 0.02",
        0.01,
        0.02,
        parametrization={"kind": "select", "patterns": NORM},
    ),
    es(
        "subspace 16, steps 0.05, max 0.1",
        0.05,
        0.1,
        parametrization={"kind": "subspace", "patterns": NORM, "dimension": 16},
    ),
    es(
        "tensor granularity (one scale), steps 0.05, max 0.5",
        0.05,
        0.5,
        parametrization={"kind": "scale", "granularity": "tensor", "patterns": NORM},
    ),
    es("(1+7), step 0.002, 10 rounds", 0.002, rounds=10),
    es("(1+7), step 0.002, 25 rounds", 0.002, rounds=25),
    es("(1+7), step 0.005, 25 rounds", 0.005, rounds=25),
    es("(1+7), step 0.002, 50 rounds", 0.002, rounds=50),
    es("(1+7), step 0.002, 15 rounds", 0.002, rounds=15),
    es("(1+7), step 0.005, 10 rounds", 0.005, rounds=10),
    es("(1+7), step 0.001, 25 rounds", 0.001, rounds=25),
    es("(1+7), step 0.001, 50 rounds", 0.001, rounds=50),
    es("mirrored 8, step 0.002, 10 rounds", 0.002, lam=8, rounds=10, mirrored=True),
    es("low-norm pool 64, step 0.02", 0.02, low_norm_pool=64),
    es("low-norm pool 64, step 0.05", 0.05, low_norm_pool=64),
    es("low-norm pool 256, step 0.05, 300 rounds", 0.05, rounds=300, low_norm_pool=256),
    es("low-norm pool 64, step 0.1", 0.1, low_norm_pool=64),
    es("mirrored 8, step 0.005, 50 rounds", 0.005, lam=8, rounds=50, mirrored=True),
    es(
        "mirrored 8, step 0.005, 50 rounds, KL penalty 1 on 64 prompts",
        0.005,
        lam=8,
        rounds=50,
        mirrored=True,
        kl=(1.0, 64),
    ),
    es(
        "mirrored 8, step 0.005, 50 rounds, KL penalty 10 on 64 prompts",
        0.005,
        lam=8,
        rounds=50,
        mirrored=True,
        kl=(10.0, 64),
    ),
    es(
        "mirrored 8, step 0.005, 50 rounds, KL penalty 3 on 64 prompts",
        0.005,
        lam=8,
        rounds=50,
        mirrored=True,
        kl=(3.0, 64),
    ),
    es(
        "mirrored 8, steps 0.01, max 0.02, 100 rounds, KL penalty 10 on 64 prompts",
        0.01,
        0.02,
        lam=8,
        rounds=100,
        mirrored=True,
        kl=(10.0, 64),
    ),
    es(
        "mirrored 8, step 0.002, 25 rounds, KL penalty 10 on 64 prompts",
        0.002,
        lam=8,
        rounds=25,
        mirrored=True,
        kl=(10.0, 64),
    ),
    # Decoder-block settings, at the demo's 10 rounds (reduced rounds: see the README).
    es(
        "last block's 2 norms (1152 log-scales), mirrored 8, step 0.002, 10 rounds",
        0.002,
        lam=8,
        rounds=10,
        mirrored=True,
        parametrization={"kind": "scale", "granularity": "channel", "patterns": LAST_BLOCK_NORMS},
    ),
    # ||dW||_F = c sqrt(576 x 1536 / 4) = 470 c: c = 0.001 moves 0.27 % of the matrix's
    # norm (172) a step, about the demo's 0.2 % per log-scale
    es(
        "last block's down_proj, lowrank rank 4, mirrored 8, step 0.001, 10 rounds",
        0.001,
        lam=8,
        rounds=10,
        mirrored=True,
        parametrization={"kind": "lowrank", "rank": 4, "patterns": LAST_DOWN_PROJ},
    ),
    es(
        "last block's down_proj, lowrank rank 4, mirrored 8, step 0.002, 10 rounds",
        0.002,
        lam=8,
        rounds=10,
        mirrored=True,
        parametrization={"kind": "lowrank", "rank": 4, "patterns": LAST_DOWN_PROJ},
    ),
    dpzero("DPZero eps 6: example (lr 0.5, max coef 0.5)", 0.5, 0.5),
    dpzero("DPZero eps 6: lr 0.1, max coef 0.05", 0.1, 0.05),
    dpzero("DPZero eps 6: lr 0.05, max coef 0.02", 0.05, 0.02),
    dpzero("DPZero eps 6: lr 0.2, max coef 0.05, 300 steps", 0.2, 0.05, steps=300),
    dpzero("DPZero eps 6: lr 0.05, max coef 0.005, 50 steps", 0.05, 0.005, steps=50),
    dpzero("DPZero eps 6: lr 0.01, max coef 0.002, 100 steps", 0.01, 0.002, steps=100),
    dpzero("DPZero eps 6: lr 0.02, max coef 0.002, 25 steps", 0.02, 0.002, steps=25),
]


def config_of(setting: Setting) -> RunConfig:
    with open(setting.base, "rb") as handle:
        data = tomllib.load(handle)
    for section, values in setting.overrides.items():
        data.setdefault(section, {}).update(values)
    data["simulate"]["eval_split"] = "dev"
    return parse_config(data, setting.name)


class HeadCaches:
    """Each holder's head-input cache (:func:`head_caches`), filled when first asked for:
    a sweep of block-level settings alone never needs it."""

    def __init__(self, base: LoadedModel, shards: list[list[Record]]):
        self.base = base
        self.shards = shards
        self._caches: list[dict] | None = None

    def get(self) -> list[dict]:
        if self._caches is None:
            started = time.time()
            self._caches = head_caches(self.base, config_of(Setting("head caches")), self.shards)
            print(json.dumps({"head_caches_seconds": round(time.time() - started, 1)}), flush=True)
        return self._caches


def head_caches(base: LoadedModel, config: RunConfig, shards: list[list[Record]]) -> list[dict]:
    """Each holder's head-input cache, as its first full-split round would fill it
    (``config``: the demo's, whose parametrization touches only the final norm)."""
    model = copy.deepcopy(base.model)
    parametrization = build_parametrization(config.parametrization)
    parametrization.attach(model)
    fitness = build_fitness(config.fitness, base.tokenizer)
    caches = []
    for records in shards:
        evaluator = CandidateEvaluator(model, parametrization, fitness)
        evaluator.score(records, [])
        assert evaluator._head_cache is not None  # the final norm only: the cache applies
        caches.append(evaluator._head_cache)
    parametrization.detach()
    return caches


class Meters:
    """One :class:`DriftMeter` per shared-prefix split, built when a setting first needs it.

    The final norm's settings share the prefix up to the final norm; a setting that moves
    block k needs a prefix that stops before block k (its base run again, once).
    """

    def __init__(self, base: LoadedModel, config: RunConfig, dev: list[Record]):
        self.base = base
        self.config = config
        self.dev = dev
        self._meters: dict[int | None, DriftMeter] = {}

    def at(self, split: int | None) -> DriftMeter:
        if split not in self._meters:
            started = time.time()
            model = copy.deepcopy(self.base.model)
            fitness = build_fitness(self.config.fitness, self.base.tokenizer)
            scorer = SharedPrefixScorer(model, fitness, split)
            scorer.add("heldout", self.dev)
            scorer.add("amazon", ood_records()["amazon"])
            windows = text_windows(
                self.base.tokenizer, max_positions=model.config.max_position_embeddings
            )
            meter = DriftMeter(scorer, model, prompt_sets=["heldout", "amazon"], windows=windows)
            self._meters[split] = meter
            info = {"meter_split": split, "meter_seconds": round(time.time() - started, 1)}
            print(json.dumps({**info, **windows.describe()}), flush=True)
        return self._meters[split]


def timed_answers(holder: Any, seconds: list[float]) -> None:
    """Wrap ``holder.answer`` so each call's wall seconds are appended to ``seconds``."""
    answer = holder.answer

    def timed(task: Any) -> Any:
        started = time.perf_counter()
        try:
            return answer(task)
        finally:
            seconds.append(time.perf_counter() - started)
            print(f"answer {len(seconds)}: {seconds[-1]:.1f} s", file=sys.stderr, flush=True)

    holder.answer = timed


def run_setting(
    setting: Setting,
    base: LoadedModel,
    shards: list[list[Record]],
    caches: HeadCaches | None,
    meters: Meters,
) -> tuple[dict[str, Any], str]:
    config = config_of(setting)
    started = time.time()
    answer_seconds: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        holders = open_local_holders(
            config, base.fingerprint, shards, root, max_lambda=setting.low_norm_pool
        )
        state = RunState.open(root / "run", config, setting.name, base.fingerprint)
        coordinator = Coordinator(config, state, base.fingerprint)
        if setting.low_norm_pool is not None:
            # Study only: the served coordinator builds a plain ComparisonES (see README).
            coordinator.strategy = LowNormES(
                run_seed=config.run.seed,
                candidates=config.optimizer.candidates,
                step_rule=StepSizeRule(
                    config.optimizer.initial_step,
                    config.optimizer.min_step,
                    config.optimizer.max_step,
                ),
                dimension=base.model.state_dict()["model.norm.weight"].numel(),
                pool=setting.low_norm_pool,
            )
        join_all(coordinator, holders)
        holder_splits = []
        for index, holder in enumerate(holders):
            assert holder.evaluator is not None
            holder_splits.append(holder.evaluator.split)
            # Only an evaluator that keeps a head-input cache (the final norm alone) gets one.
            if caches is not None and holder.evaluator.head_inputs is not None:
                holder.evaluator._head_cache = dict(caches.get()[index])
            timed_answers(holder, answer_seconds)
        drive_locally(coordinator, holders)
        forward_passes = [holder.evaluator.forward_passes for holder in holders]
        for holder in holders:
            holder.ledger.close()
        steps, bits = list(state.log), state.bits_total
        head = state.log.head
    seconds = time.time() - started
    model = copy.deepcopy(base.model)
    parametrization = build_parametrization(config.parametrization)
    parametrization.attach(model)
    for step in steps:
        parametrization.apply_step(step)
    split = suffix_start(model, parametrization.touched_modules())
    meter = meters.at(split)
    tuned = meter.measure(model)
    moved = _displacement(base.model, parametrization.export_state_dict())
    parametrization.detach()
    row = _row(setting, config, meter.base, tuned, bits, len(steps), moved, seconds)
    per_round = [
        sum(answer_seconds[r : r + len(holders)])
        for r in range(0, len(answer_seconds), len(holders))
    ]
    row["holder_prefix_split"] = holder_splits[0]
    row["holder_forward_passes"] = forward_passes
    row["seconds_first_round"] = round(per_round[0], 1) if per_round else None
    later = per_round[1:]
    row["seconds_per_later_round"] = round(sum(later) / len(later), 2) if later else None
    for name, label in (("heldout", "dev"), ("amazon", "amazon")):
        labels = np.array([int(str(r["label"])) for r in meter.records(name)])
        for figures, when in ((meter.base, "before"), (tuned, "after")):
            margins = figures.margins[name]
            row[f"{label}_answered_positive_{when}"] = round(float((margins > 0).mean()), 4)
            auc = margin_auc(margins, labels)
            row[f"{label}_margin_auc_{when}"] = None if auc is None else round(auc, 4)
    return row, head


def _displacement(base: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, float]:
    """How far the moved weights went: factors tuned / base per channel for norm weights
    (the final norm's, or a block's), and ||tuned - base|| / ||base|| for every moved tensor."""
    before_state = base.state_dict()
    moved = [n for n, t in state.items() if not torch.equal(before_state[n], t)]
    if not moved:
        return {"relative_change": 0.0}
    before = torch.cat([before_state[n].double().flatten() for n in moved])
    after = torch.cat([state[n].double().flatten() for n in moved])
    result = {"relative_change": float((after - before).norm() / before.norm())}
    if all(before_state[n].dim() == 1 for n in moved):
        factor = after / before
        log = factor.abs().log()
        prefix = "norm" if moved == NORM else "block_norm"
        result[f"{prefix}_factor_min"] = float(factor.min())
        result[f"{prefix}_factor_max"] = float(factor.max())
        result["log_factor_rms"] = float(log.pow(2).mean().sqrt())
    return result


def _row(
    setting: Setting,
    config: RunConfig,
    base: QualityFigures,
    tuned: QualityFigures,
    bits: float,
    accepted: int,
    moved: dict[str, float],
    seconds: float,
) -> dict[str, Any]:
    row: dict[str, Any] = {"setting": setting.name, "algorithm": config.run.algorithm}
    for name, label in (("heldout", "dev"), ("amazon", "amazon")):
        before, after = base.correct[name].tolist(), tuned.correct[name].tolist()
        accuracy, low, high = accuracy_interval(after)
        test = mcnemar_pvalue(before, after)
        row[f"{label}_before"] = round(float(np.mean(before)), 4)
        row[f"{label}_after"] = round(accuracy, 4)
        row[f"{label}_after_ci95"] = [round(low, 4), round(high, 4)]
        row[f"{label}_mcnemar_p"] = float(f"{test.p_value:.3g}")
        row[f"{label}_fixed_broken"] = [test.improved, test.worsened]
    assert base.perplexity is not None and tuned.perplexity is not None
    row["perplexity_base"] = round(base.perplexity.value, 3)
    row["perplexity_ratio"] = float(f"{tuned.perplexity.value / base.perplexity.value:.4g}")
    row["kl_dev_nats"] = float(f"{tuned.kl['heldout']:.4g}")
    row["kl_amazon_nats"] = float(f"{tuned.kl['amazon']:.4g}")
    row["bits"] = round(bits, 1)
    row["rounds"] = config.run.max_rounds
    row["accepted"] = accepted
    row.update({k: float(f"{v:.4g}") for k, v in moved.items()})
    row["seconds"] = round(seconds, 1)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=None, help="setting names (exact)")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--check", action="store_true", help="verify the cache hand-over")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    chosen = [s for s in SETTINGS if not args.only or s.name in args.only]
    if args.list or not chosen:
        print("\n".join(s.name for s in SETTINGS))
        return
    torch.set_num_threads(args.threads)
    demo = config_of(chosen[0])
    base = load_model(demo.model.name)
    splits, train = bundled_split(demo)
    shards = shard(train, demo.simulate.holders)
    print(
        f"setting: {demo.model.name} float32, {args.threads} threads, {len(shards)} holders x "
        f"{len(shards[0])} training sentences, dev {len(splits.dev)} (no test data), Amazon "
        "1,000, general text; head-input caches for the final norm's settings, prefix reuse "
        "for the block-level ones",
        flush=True,
    )
    meters = Meters(base, demo, list(splits.dev))
    caches = HeadCaches(base, shards)
    for setting in chosen:
        row, _ = run_setting(setting, base, shards, caches, meters)
        print(json.dumps(row), flush=True)
    if args.check:
        _, again = run_setting(chosen[0], base, shards, None, meters)
        _, cached = run_setting(chosen[0], base, shards, caches, meters)
        print(json.dumps({"check": chosen[0].name, "same_log_without_hand_over": again == cached}))


if __name__ == "__main__":
    main()
