"""Rendering a run report for people (the JSON is for machines)."""

from __future__ import annotations

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
    table.add_row(
        f"test risk bound (delta={bound['delta']})",
        f"{bound['transcript_bound']:.4f} from {bound['transcript_bits']:.0f} transcript bits"
        f"{vacuous}; old bound {bound['old_bound']:.4f} from {bound['heard_bits']:.0f} bits "
        f"heard (measured {bound['measured_test_risk']:.4f}, train {bound['train_risk']:.4f}, "
        f"n={bound['n']})",
    )
    privacy = report.get("privacy")
    if privacy:
        sigma = privacy["noise_multiplier"]
        rr = privacy.get("randomized_response_epsilon")
        mechanism = f"randomized response, eps {rr:g} an answer" if rr else f"sigma {sigma:.4g}"
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
