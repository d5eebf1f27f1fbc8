"""Rendering a run report for people (the JSON is for machines)."""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def print_report(report: dict[str, Any], console: Console | None = None) -> None:
    """A short table: held-out metric before/after, significance, bits, bound, time."""
    console = console or Console()
    table = Table(title=f"sottovoce report: {report['algorithm']}", show_header=False)
    table.add_column("what")
    table.add_column("value")
    before, after = report["heldout_metric_before"], report["heldout_metric_after"]
    lo_b, hi_b = report["heldout_metric_before_ci95"]
    lo_a, hi_a = report["heldout_metric_after_ci95"]
    split = f"{report['heldout_split']} ({report['heldout_examples']} examples)"
    table.add_row(
        f"{report['heldout_metric']} before, {split}", f"{before:.4f}  [{lo_b:.4f}, {hi_b:.4f}]"
    )
    table.add_row(f"{report['heldout_metric']} after", f"{after:.4f}  [{lo_a:.4f}, {hi_a:.4f}]")
    mc = report["mcnemar"]
    table.add_row(
        "paired McNemar",
        f"p = {mc['p_value']:.3g} ({mc['improved']} fixed, {mc['worsened']} broken)",
    )
    for label, value in quality_rows(report.get("quality")):
        table.add_row(label, value)
    table.add_row("rounds / accepted steps", f"{report['rounds']} / {report['accepted_steps']}")
    table.add_row("bits spent", f"{report['bits_spent_total']:.1f} of {report['bit_budget']:g}")
    for holder, bits in report["bits_spent_per_holder"].items():
        table.add_row(f"  {holder}", f"{bits:.1f}")
    bound = report["generalization_bound"]
    vacuous = " (vacuous: it says nothing)" if bound["vacuous"] else ""
    # A risk is at most 1: a larger "bound" (many heard bits, e.g. DPZero's 32 an answer)
    # is no bound at all, and says so.
    old_vacuous = " (vacuous: above 1)" if bound["old_bound"] >= 1.0 else ""
    table.add_row(
        f"test risk bound (delta={bound['delta']})",
        f"{bound['transcript_bound']:.4f} from {bound['transcript_bits']:.0f} transcript bits"
        f"{vacuous}; old bound {bound['old_bound']:.4f}{old_vacuous} from "
        f"{bound['heard_bits']:.0f} bits "
        f"heard (measured {bound['measured_test_risk']:.4f}, train {bound['train_risk']:.4f}, "
        f"n={bound['n']})",
    )
    privacy = report.get("privacy")
    if privacy:
        sigma = privacy["noise_multiplier"]
        rr = privacy.get("randomized_response_epsilon")
        chunks = privacy.get("chunks")
        mechanism = f"randomized response, eps {rr:g} an answer" if rr else f"sigma {sigma:.4g}"
        if chunks:
            mechanism = f"chunk votes, K {chunks}, noise std {privacy['vote_noise']:.4g} votes"
        table.add_row("differential privacy", f"{mechanism}; delta {privacy['delta']:g}")
        for holder, spent in privacy["per_holder"].items():
            epsilon = spent.get("epsilon_this_run")
            shown = "not reported" if epsilon is None else f"{epsilon:.3f}"
            table.add_row(f"  {holder} epsilon (its ledger)", shown)
        table.add_row("  accountant", privacy["accountant"])
    table.add_row("wall time", f"{report['wall_seconds']:.0f} s")
    console.print(table)


def quality_rows(quality: dict[str, Any] | None) -> list[tuple[str, str]]:
    """Rows for the quality section: perplexity ratio, out-of-domain change, KL."""
    if not quality:
        return []
    rows = []
    ppl = quality.get("perplexity")
    if ppl:
        rows.append(
            (
                f"perplexity, general text ({ppl['scored_tokens']} tokens)",
                f"{ppl['base']:.4g} → {ppl['tuned']:.4g} (ratio {ppl['ratio']:.4g})",
            )
        )
    for name, entry in quality.get("sets", {}).items():
        kl = entry.get("kl_base_to_tuned_nats")
        kl_text = "" if kl is None else f"; KL(base || tuned) {kl:.4g} nats"
        if entry["role"] == "out-of-domain":
            rows.append(
                (
                    f"{name} accuracy (out-of-domain, {entry['examples']})",
                    f"{entry['accuracy_base']:.4f} → {entry['accuracy_tuned']:.4f}, McNemar p = "
                    f"{entry['mcnemar']['p_value']:.3g}{kl_text}",
                )
            )
        elif kl is not None:
            rows.append((f"KL to the base, {entry['role']}", f"{kl:.4g} nats"))
    return rows


def command_prefix(tool: str) -> str:
    """How to call ``tool`` (``sottovoce``, ``python``) of this environment from this shell.

    The bare name if it is on PATH and is this environment's; else its path (relative to
    the working directory when inside it, e.g. ``.venv/bin/sottovoce``), so a printed
    command works without an activated virtual environment.
    """
    ours = Path(sys.executable).parent / tool
    if not ours.exists():
        return shlex.quote(sys.executable) + (" -m sottovoce.cli" if tool == "sottovoce" else "")
    found = shutil.which(tool)
    if found is not None and Path(found).absolute() == ours.absolute():
        return tool
    try:
        shown = os.path.relpath(ours)
    except ValueError:  # another drive (Windows)
        shown = str(ours)
    return shlex.quote(shown if not shown.startswith("..") else str(ours))


def next_steps(report: dict[str, Any]) -> list[str]:
    """Where a simulated run went, and commands to try on it, runnable as printed."""
    run_dir, model = Path(report["run_dir"]), report["exported_model"]
    tool, python = command_prefix("sottovoce"), command_prefix("python")
    holder = run_dir / "holders" / "holder-0"
    q = shlex.quote
    load = f"from transformers import AutoModelForCausalLM as M; M.from_pretrained({model!r})"
    return [
        f"run directory: {run_dir}",
        f"exported model: {model} (a Hugging Face checkpoint; its README.md is the model card)",
        "next:",
        f"  {python} -c {q(load)}",
        f"  {tool} ledger --policy {q(str(holder / 'policy.toml'))} "
        f"--data {q(str(holder / 'data.jsonl'))}   # what holder-0 released",
        f"  {tool} export --run {q(str(run_dir))} --out {q(str(run_dir / 'model-again'))}"
        "   # replay the log again",
        f"  {tool} evaluate --run {q(str(run_dir))} --out {q(str(run_dir / 'evidence'))}"
        "   # membership inference, baseline (minutes)",
    ]
