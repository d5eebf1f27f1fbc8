"""Markdown tables from bench_toolbox.py's JSON lines (one per run), for the README.

python bench/toolbox_table.py runs/toolbox-norm.jsonl [more.jsonl ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _acc(figure: dict[str, object]) -> str:
    low, high = figure["ci95"]  # type: ignore[misc]
    return f"{figure['after']:.3f} [{low:.3f}, {high:.3f}]"


def main() -> None:
    print(
        "| parametrization | optimizer | matching | step | rounds | bits/holder | steps | "
        "dev acc | test acc (95% CI) | McNemar p (test) | Amazon acc | ppl ratio | run s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for path in sys.argv[1:]:
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            if "setting" in row:
                print(f"| *{row['setting']}; base perplexity {row.get('base_perplexity')}* |")
                continue
            if "test" not in row:
                continue
            print(
                f"| {row['parametrization']} | {row['optimizer']} | {row['matching']} | "
                f"{row['initial_step']:g} | {row['rounds']} | {row['bits_per_holder']:.0f} | "
                f"{row['accepted_steps']} | {row['dev']['after']:.3f} | {_acc(row['test'])} | "
                f"{row['test']['mcnemar_p']:.2g} | {row['amazon']['after']:.3f} | "
                f"{row['perplexity_ratio']:.4f} | {row['run_seconds']:.0f} |"
            )


if __name__ == "__main__":
    main()
