"""Direction generation vs. torch.randn of the same size (docs/architecture.md: ratio <= 1).

Setting: a flat float32 tensor of SmolLM2-135M's parameter count (134,515,008 elements) on
CPU with 2 threads, unless ``--numel``/``--threads``/``--device`` say otherwise. Both are
timed in the same run, interleaved, ``--repeats`` times; the minimum is reported (the
machine may be shared, and the minimum is the least disturbed measurement) next to the
median. Also timed: ``add_scaled_direction_`` on a tensor of that size (one step of
``full``). Usage: ``python bench/bench_directions.py [--numel N] [--threads T]``.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable

import torch

from sottovoce.common.directions import add_scaled_direction_, rademacher

SMOLLM2_135M_NUMEL = 134_515_008


def _seconds(run: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=SMOLLM2_135M_NUMEL)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    weights = torch.zeros(args.numel, dtype=torch.float32, device=device)

    timings: dict[str, list[float]] = {"rademacher": [], "randn": [], "add_step": []}
    rademacher(0, 0, 1 << 20, device=device)  # warm-up: thread pool, sign table
    for seed in range(args.repeats):
        timings["rademacher"].append(
            _seconds(functools.partial(rademacher, seed, 0, args.numel, device=device), device)
        )
        timings["randn"].append(
            _seconds(functools.partial(torch.randn, args.numel, device=device), device)
        )
        timings["add_step"].append(
            _seconds(functools.partial(add_scaled_direction_, weights, seed, 0, 0.5), device)
        )

    print(
        f"directions: {args.numel:,} float32 elements, device {device}, "
        f"{args.threads} threads, {args.repeats} repeats (min / median seconds)"
    )
    for name, values in timings.items():
        print(f"  {name:<11} {min(values):8.3f} / {statistics.median(values):8.3f}")
    ratio = min(timings["rademacher"]) / min(timings["randn"])
    print(f"  ratio rademacher / randn (min): {ratio:.2f}  (target <= 1.00)")


if __name__ == "__main__":
    main()
