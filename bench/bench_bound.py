"""The transcript bound against the old one, on a real run: is it within 2x of the test risk?

Runs ``sottovoce simulate --config examples/bound.toml`` (3 holders x 2,700 training
sentences, 30 rounds, SmolLM2-135M; about 40 minutes on 2 busy CPU cores, most of it the
holders' first pass over their data) unless ``--report`` names a finished run's report, and
prints, from that one run: the old bound (Hoeffding over every bit heard), the transcript
bound (Maurer's kl over the aggregated transcript's code length, docs/bound.md), the
measured test risk, their ratio, and whether the run gained significantly (McNemar).

    python bench/bench_bound.py                       # run examples/bound.toml, then report
    python bench/bench_bound.py --report runs/X/report.json   # report a finished run
    python bench/bench_bound.py --report runs/demo-report.json  # e.g. the default demo's
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from sottovoce.reporting import quality_rows

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "examples" / "bound.toml"


def run_simulation(out: Path) -> Path:
    report = out / "report.json"
    command = [
        sys.executable, "-m", "sottovoce.cli", "simulate", "--config", str(CONFIG),
        "--run-dir", str(out / "run"), "--report", str(report),
    ]  # fmt: skip
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT)
    print(f"bench_bound: simulate took {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", type=Path, help="a finished simulate report.json")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-bound")
    args = parser.parse_args()
    path = args.report or run_simulation(args.out)
    report = json.loads(path.read_text(encoding="utf-8"))
    bound = report["generalization_bound"]
    measured = bound["measured_test_risk"]
    ratio = bound["transcript_bound"] / measured
    p_value = report["mcnemar"]["p_value"]
    print(f"run {report['run_id']}: {report['rounds']} rounds, {report['accepted_steps']} steps")
    print(f"  n = {bound['n']}, delta = {bound['delta']}, train risk {bound['train_risk']:.4f}")
    print(
        f"  old bound (Hoeffding, {bound['heard_bits']:.0f} bits heard):  {bound['old_bound']:.4f}"
    )
    print(
        f"  transcript bound (kl, {bound['transcript_bits']:.1f} transcript bits): "
        f"{bound['transcript_bound']:.4f}"
    )
    print(f"  measured test risk: {measured:.4f}  (bound / measured = {ratio:.2f})")
    print(
        f"  accuracy {report['heldout_metric_before']:.4f} -> {report['heldout_metric_after']:.4f}"
        f", McNemar p = {p_value:.2g}"
    )
    for label, value in quality_rows(report.get("quality")):
        print(f"  {label}: {value}")
    met = ratio <= 2.0 and p_value < 0.05
    print(f"  target (bound <= 2x measured, p < 0.05): {'met' if met else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
