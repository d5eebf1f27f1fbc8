"""Data holder evaluation vs plain inference: throughput and peak memory (docs/architecture.md).

Targets (docs/architecture.md): fitness evaluation throughput >= 90% of a plain
``model(**batch)`` loop on the same data, and peak memory <= inference memory + the
largest perturbed tensor.

Setting (defaults): SmolLM2-135M-Instruct, float32, CPU, 2 torch threads, the demo's
fitness (``"Review: {text}\\nSentiment:"``, label words " negative"/" positive") on the
first 64 examples of the sentiment train split, sub-batches of 32.

**Throughput.** The plain loop runs ``model(**batch.model_inputs())`` over batches
prepared once, outside the clock, with 1 and with 2 forwards per batch; the evaluator's
time includes its own tokenization and scoring, as a holder pays them. A
forward-equivalent is one model evaluation of one example (incumbent or candidate). The
ratio is the evaluator's forward-equivalents per second over the plain loops' best
per-forward rate (the faster of x1 and x2/2: the stricter reference). Measured:

* ``full`` (every tensor, so no prefix reuse): ``score(examples, [])`` (the incumbent
  alone: the plain case of the throughput target), then the incumbent and one candidate (each
  candidate forward perturbs all 134.5M weights in place and restores them);
* ``scale`` on ``model.norm.weight`` with ``--candidates`` candidates: a first pass (a
  fresh evaluator: the prefix runs once per batch, the candidates only the final norm
  and the label rows of the head) and a second pass on the same examples (the head-input
  cache: no decoder layer runs at all).

Every measurement is repeated ``--repeats`` times, interleaved; shown are min and median
times, the ratio from min times and the median of the ratios within each repeat (the
machine may be shared: measurements seconds apart see similar loads).

**Peak memory.** Each case runs in a fresh subprocess that loads the model and prepares
one batch of ``--batch`` examples, runs its work once as a warm-up (one-time allocations),
resets the kernel's peak-RSS mark (``/proc/self/clear_refs``) and runs the work again:
plain inference (two forwards), the holder's evaluator with ``full`` (one candidate:
perturb, forward, restore every tensor) or with ``scale`` on the final norm
(``--candidates`` candidates). Work peak = ``VmHWM`` after the work (``ru_maxrss`` is
shown too: it cannot be reset for threads that have exited). The extra over plain
inference is shown from the peaks and from each process's peak - ready RSS (which
removes allocator noise in the resting state), next to the largest perturbed tensor.

Usage: ``SOTTOVOCE_CACHE=... python bench/bench_holder.py [--examples 64] [--repeats 5]``
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from sottovoce.client.evaluator import CandidateEvaluator
from sottovoce.common.data import Record, sentiment_records, split_sentiment
from sottovoce.common.fitness import Fitness, PreparedBatch, build_fitness
from sottovoce.common.models import LoadedModel, load_model
from sottovoce.common.parametrizations.base import Parametrization, ParametrizationSpec
from sottovoce.common.parametrizations.registry import build_parametrization
from sottovoce.common.parametrizations.select import InPlaceParametrization
from sottovoce.common.protocol.messages import Candidate, FitnessSpec
from sottovoce.common.steplog import as_float32

MODEL = "smollm2-135m-instruct"
NORM = ("model.norm.weight",)
SCALE = as_float32(0.05)  # the demo's initial step
MEMORY_MODES = ("plain", "full", "scale")
MIB = 1024 * 1024


# -- shared setup ------------------------------------------------------------------------
@dataclass
class Setting:
    """What every measurement shares: the model, the fitness and the examples."""

    loaded: LoadedModel
    fitness: Fitness
    examples: list[Record]
    batch: int
    parametrization: Parametrization | None = None

    @property
    def model(self) -> torch.nn.Module:
        return self.loaded.model


def load_setting(n_examples: int, batch: int, dtype: str) -> Setting:
    loaded = load_model(MODEL, dtype=dtype)
    fitness = build_fitness(FitnessSpec(), loaded.tokenizer)
    train = split_sentiment(sentiment_records()).train
    return Setting(loaded, fitness, list(train[:n_examples]), batch)


def attached(setting: Setting, spec: ParametrizationSpec) -> Parametrization:
    parametrization = build_parametrization(spec)
    parametrization.attach(setting.model)
    return parametrization


def candidates(count: int, first_seed: int) -> list[Candidate]:
    return [Candidate(seed=first_seed + i, scale=SCALE) for i in range(count)]


@torch.inference_mode()
def plain_loop(model: torch.nn.Module, batches: Sequence[PreparedBatch], forwards: int) -> None:
    """The reference: ``model(**batch)`` ``forwards`` times per prepared batch, nothing else."""
    for batch in batches:
        for _ in range(forwards):
            model(**batch.model_inputs())


def seconds(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


# -- throughput ----------------------------------------------------------------------------
@dataclass
class Timed:
    """One throughput measurement: its timings, in seconds per pass over the examples."""

    name: str
    forward_equivalents: int  # per example
    times: list[float]


def measure_throughput(setting: Setting, repeats: int, n_candidates: int) -> list[Timed]:
    model, examples = setting.model, setting.examples
    batches = setting.fitness.prepare(examples, max_batch=setting.batch)
    full = attached(setting, ParametrizationSpec(kind="full"))
    full_eval = CandidateEvaluator(model, full, setting.fitness, max_batch=setting.batch)
    scale = build_parametrization(ParametrizationSpec(kind="scale", patterns=NORM))
    lam = n_candidates
    rows = [
        Timed("plain loop, 1 forward/batch", 1, []),
        Timed("plain loop, 2 forwards/batch", 2, []),
        Timed("full: incumbent only", 1, []),
        Timed("full: incumbent + 1 candidate", 2, []),
        Timed(f"scale(norm): 1st pass, {lam} cand.", 1 + lam, []),
        Timed(f"scale(norm): 2nd pass, {lam} cand.", 1 + lam, []),
    ]
    plain_loop(model, batches, 1)  # warm-up: thread pool, kernels
    full_eval.score(examples, candidates(1, 0))  # warm-up: direction tables
    for repeat in range(repeats):
        one = candidates(1, 1000 * (repeat + 1))
        many, more = candidates(lam, 1000 * (repeat + 1)), candidates(lam, 1000 * repeat + 500)
        rows[0].times.append(seconds(functools.partial(plain_loop, model, batches, 1)))
        rows[1].times.append(seconds(functools.partial(plain_loop, model, batches, 2)))
        rows[2].times.append(seconds(functools.partial(full_eval.score, examples, [])))
        rows[3].times.append(seconds(functools.partial(full_eval.score, examples, one)))
        scale.attach(model)  # hooks on the final norm only while scale is measured
        scale_eval = CandidateEvaluator(model, scale, setting.fitness, max_batch=setting.batch)
        rows[4].times.append(seconds(functools.partial(scale_eval.score, examples, many)))
        rows[5].times.append(seconds(functools.partial(scale_eval.score, examples, more)))
        scale.detach()
    return rows


def print_throughput(rows: list[Timed], n_examples: int) -> None:
    """Times and ratios against the plain loops' best seconds per forward.

    "ratio min" compares minimum times; "paired" is the median over repeats of the ratio
    within one repeat (measurements taken minutes apart on a shared machine see different
    loads; those within a repeat are seconds apart).
    """
    plain = rows[:2]
    print(
        f"  {'':<36} {'min s':>7} {'median s':>9} {'fwd-eq/s':>9} {'ratio min':>9} {'paired':>7}",
        flush=True,
    )
    best_reference = min(min(row.times) / row.forward_equivalents for row in plain)
    for row in rows:
        paired = [
            row.forward_equivalents
            * min(p.times[r] / p.forward_equivalents for p in plain)
            / row.times[r]
            for r in range(len(row.times))
        ]
        best = min(row.times)
        print(
            f"  {row.name:<36} {best:7.3f} {statistics.median(row.times):9.3f} "
            f"{n_examples * row.forward_equivalents / best:9.1f} "
            f"{row.forward_equivalents * best_reference / best:9.2f} "
            f"{statistics.median(paired):7.2f}"
        )
    print(
        "  ratio: forward-equivalents/s over the plain loops' best per-forward rate "
        "(of x1 and x2/2)\n"
        "  target (docs/architecture.md): >= 0.90 for the plain case (full: incumbent only)",
        flush=True,
    )


# -- peak memory ---------------------------------------------------------------------------
def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def proc_status_kib(field: str) -> int:
    """A ``/proc/self/status`` figure in KiB: ``VmRSS`` (now) or ``VmHWM`` (peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def memory_work(setting: Setting, mode: str, n_candidates: int) -> Callable[[], object]:
    """One case's work; a fresh evaluator each time, so no cache carries over."""
    model, examples = setting.model, setting.examples
    if mode == "plain":
        batches = setting.fitness.prepare(examples, max_batch=setting.batch)
        return functools.partial(plain_loop, model, batches, 2)
    assert setting.parametrization is not None
    evaluator = CandidateEvaluator(
        model, setting.parametrization, setting.fitness, max_batch=setting.batch
    )
    count = 1 if mode == "full" else n_candidates
    return functools.partial(evaluator.score, examples, candidates(count, 7))


def memory_child(mode: str, batch: int, n_candidates: int, dtype: str) -> dict[str, object]:
    """Run one memory case in this (fresh) process and report its RSS figures, in KiB.

    The work runs once as a warm-up (thread pools, kernel workspaces, the allocator's
    heap), then the peak mark is reset and the work runs again, measured. The peak is the
    kernel's ``VmHWM``: ``ru_maxrss`` is that too, but also remembers the peak of any
    thread that has exited, which a reset cannot clear (it is reported alongside).
    """
    setting = load_setting(batch, batch, dtype)
    if mode != "plain":
        spec = (
            ParametrizationSpec(kind="full")
            if mode == "full"
            else ParametrizationSpec(kind="scale", patterns=NORM)
        )
        setting.parametrization = attached(setting, spec)
    memory_work(setting, mode, n_candidates)()
    work = memory_work(setting, mode, n_candidates)
    gc.collect()
    cold_peak = proc_status_kib("VmHWM")
    ready_rss = proc_status_kib("VmRSS")
    was_reset = reset_peak_rss() and proc_status_kib("VmHWM") < cold_peak
    work()
    report: dict[str, object] = {
        "mode": mode,
        "ready_rss_kib": ready_rss,
        "cold_peak_kib": cold_peak,
        "peak_kib": proc_status_kib("VmHWM"),
        "ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "peak_was_reset": was_reset,
        "model_bytes": sum(p.numel() * p.element_size() for p in setting.model.parameters()),
    }
    if isinstance(setting.parametrization, InPlaceParametrization):
        tensors = setting.parametrization.tensors
        report["max_backup_bytes"] = setting.parametrization.max_backup_bytes
        report["largest_tensor_bytes"] = max(t.nbytes for t in tensors)
        report["largest_tensor"] = max(tensors, key=lambda t: t.nbytes).name
    return report


def run_memory_case(mode: str, args: argparse.Namespace) -> dict[str, object]:
    command = [
        sys.executable, __file__, "--memory-child", mode,
        "--batch", str(args.batch), "--candidates", str(args.candidates),
        "--threads", str(args.threads), "--dtype", args.dtype,
    ]  # fmt: skip
    threads = str(args.threads)
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory case {mode} failed:\n{done.stderr[-2000:]}")
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def mib(value: object, unit: int = 1024) -> float:
    """``value`` (in units of ``unit`` bytes: KiB by default) in MiB."""
    assert isinstance(value, int)
    return value * unit / MIB


def print_memory(reports: dict[str, dict[str, object]], n_candidates: int) -> None:
    plain = mib(reports["plain"]["peak_kib"])
    model_bytes = reports["plain"]["model_bytes"]
    labels = {
        "plain": "plain inference, 2 forwards",
        "full": "holder, full, 1 candidate",
        "scale": f"holder, scale(norm), {n_candidates} cand.",
    }
    print(
        f"  {'(MiB)':<34} {'ready RSS':>9} {'load+warm-up peak':>17} {'work peak':>9} "
        f"{'peak - ready':>12} {'peak - plain peak':>17} {'ru_maxrss':>9}"
    )
    for mode, report in reports.items():
        peak, ready = mib(report["peak_kib"]), mib(report["ready_rss_kib"])
        print(
            f"  {labels[mode]:<34} {ready:9.1f} {mib(report['cold_peak_kib']):17.1f} "
            f"{peak:9.1f} {peak - ready:12.1f} {peak - plain:17.1f} "
            f"{mib(report['ru_maxrss_kib']):9.1f}"
        )
    full = reports["full"]
    largest = mib(full["largest_tensor_bytes"], unit=1)
    extra = mib(full["peak_kib"]) - plain
    print(
        f"  largest perturbed tensor ({full['largest_tensor']}, tied with the embedding): "
        f"{largest:.1f} MiB ({_mb(full['largest_tensor_bytes'])}); full's max_backup_bytes: "
        f"{mib(full['max_backup_bytes'], unit=1):.1f} MiB ({_mb(full['max_backup_bytes'])}); "
        f"a model copy: {mib(model_bytes, unit=1):.1f} MiB ({_mb(model_bytes)})"
    )
    increment = extra_increment(full, reports["plain"])
    print(
        f"  full's extra over plain inference / largest perturbed tensor: "
        f"{extra / largest:.2f} (peaks), {increment / largest:.2f} (peak - ready); "
        f"claim: about 1, a model copy would be {mib(model_bytes, unit=1) / largest:.1f}",
        flush=True,
    )
    if not all(report["peak_was_reset"] for report in reports.values()):
        print("  note: the peak-RSS mark could not be reset; work peaks include model loading")


def extra_increment(case: dict[str, object], plain: dict[str, object]) -> float:
    """MiB a case's work adds over its own ready RSS, minus what plain inference adds."""
    return (
        mib(case["peak_kib"])
        - mib(case["ready_rss_kib"])
        - (mib(plain["peak_kib"]) - mib(plain["ready_rss_kib"]))
    )


def _mb(value: object) -> str:
    assert isinstance(value, int)
    return f"{value / 1e6:.1f} MB"


# -- main ----------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--candidates", type=int, default=7, help="lambda for scale")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--memory-child", choices=MEMORY_MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        report = memory_child(args.memory_child, args.batch, args.candidates, args.dtype)
        print(json.dumps(report))
        return

    setting_line = (
        f"model {MODEL}, {args.dtype}, CPU, {args.threads} threads, batch {args.batch}, "
        f"fitness: demo sentiment classification"
    )
    if not args.skip_throughput:
        setting = load_setting(args.examples, args.batch, args.dtype)
        print(
            f"holder throughput: {setting_line}, {len(setting.examples)} train examples, "
            f"{args.repeats} repeats interleaved",
            flush=True,
        )
        rows = measure_throughput(setting, args.repeats, args.candidates)
        print_throughput(rows, len(setting.examples))
        del setting
        gc.collect()
    if not args.skip_memory:
        print(f"holder peak memory (one fresh process per case): {setting_line}", flush=True)
        reports = {mode: run_memory_case(mode, args) for mode in MEMORY_MODES}
        print_memory(reports, args.candidates)


if __name__ == "__main__":
    main()
