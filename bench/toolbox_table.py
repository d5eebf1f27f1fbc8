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
    """Rows in file order; the step size chosen on dev (per optimizer and matching) is bold,
    a dev tie going to the smaller step."""
    rows = [
        json.loads(line)
        for path in sys.argv[1:]
        for line in Path(path).read_text(encoding="utf-8").splitlines()
    ]
    runs = [row for row in rows if "test" in row]
    chosen: dict[tuple[str, str, str], int] = {}  # the run chosen on dev, by its index
    for index, row in enumerate(runs):
        key = (row["parametrization"], row["optimizer"], row["matching"])
        held = chosen.get(key)
        # the best dev accuracy; a tie goes to the smaller step (it moves the model less)
        if held is None or (row["dev"]["after"], -row["initial_step"]) > (
            runs[held]["dev"]["after"],
            -runs[held]["initial_step"],
        ):
            chosen[key] = index
    print(
        "| parametrization | optimizer | matching | step | rounds | bits/holder | steps | "
        "dev acc | test acc (95% CI) | McNemar p (test) | Amazon acc | ppl ratio | run s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for index, row in enumerate(runs):
        key = (row["parametrization"], row["optimizer"], row["matching"])
        mark = "**" if chosen[key] == index else ""
        print(
            f"| {row['parametrization']} | {mark}{row['optimizer']}{mark} | {row['matching']} | "
            f"{row['initial_step']:g} | {row['rounds']} | {row['bits_per_holder']:.0f} | "
            f"{row['accepted_steps']} | {row['dev']['after']:.3f} | {_acc(row['test'])} | "
            f"{row['test']['mcnemar_p']:.2g} | {row['amazon']['after']:.3f} | "
            f"{row['perplexity_ratio']:.4f} | {row['run_seconds']:.0f} |"
        )
    settings = {(row["setting"], row.get("base_perplexity")) for row in rows if "setting" in row}
    for setting, perplexity in sorted(settings, key=str):  # one line per distinct setting
        print(f"\nSetting: {setting}; base perplexity {perplexity}.")


if __name__ == "__main__":
    main()
