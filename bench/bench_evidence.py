"""The evidence table: BBoxER (the demo), DPZero at epsilon = 6 and a backprop baseline.

Runs the two federations with ``sottovoce simulate`` (unless ``--runs`` names finished run
folders), then ``sottovoce evaluate`` on both at once, and prints the report's Markdown:
utility in-domain and out-of-domain, loss-threshold and offline-LiRA membership inference,
the bits bound with epsilon, and the cost of each, next to LoRA fine-tuning of the same model
on the same data, stopped at the same utility.

    python bench/bench_evidence.py --out /tmp/evidence
    python bench/bench_evidence.py --runs runs/demo runs/dpzero --out /tmp/evidence

Each simulated holder keeps its ledger inside its run's folder (``simulate`` does so for the
bundled data), so a benchmark spends no real data set's lifetime budget.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = (ROOT / "examples" / "run.toml", ROOT / "examples" / "dpzero.toml")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="a new folder")
    parser.add_argument("--runs", type=Path, nargs="*", help="finished run folders to evaluate")
    parser.add_argument("--reference-models", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.out.exists() and any(args.out.iterdir()):
        sys.exit(f"--out {args.out}: exists and is not empty")
    args.out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    runs = args.runs or [simulate(config, args.out, env) for config in CONFIGS]
    evaluation = args.out / "evaluation"
    command = [sys.executable, "-m", "sottovoce.cli", "evaluate", "--out", str(evaluation)]
    for run in runs:
        command += ["--run", str(run)]
    command += ["--reference-models", str(args.reference_models)]
    command += ["--threads", str(args.threads)]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True, env=env)
    print((evaluation / "report.md").read_text(encoding="utf-8"))


def simulate(config: Path, out: Path, env: dict[str, str]) -> Path:
    run_dir = out / config.stem
    command = [sys.executable, "-m", "sottovoce.cli", "simulate", "--config", str(config)]
    command += ["--run-dir", str(run_dir)]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True, env=env)
    return run_dir


if __name__ == "__main__":
    main()
