"""Writing an evaluation: ``report.json``, ``report.md`` and a self-contained ``report.html``.

The JSON has every figure; the pages show the tables and the ROC curves (log-log, as the
membership-inference literature plots them, so the low-FPR region is visible), and open in
a browser from disk: the HTML inlines its image.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from sottovoce.common.errors import ConfigError
from sottovoce.common.storage import SHARED, atomic_write_bytes

ROC_PLOT = "roc.png"


def write_report(out_dir: Path, report: dict[str, Any]) -> list[Path]:
    """Write the report files into ``out_dir`` (created; must be new or empty)."""
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConfigError(f"--out {out_dir}: exists and is not empty; choose a new folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    curves = report.pop("_curves", {})
    png = roc_png(curves)
    markdown = render_markdown(report, ROC_PLOT)
    image = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    files = {
        "report.json": json.dumps(report, indent=2, sort_keys=True).encode(),
        ROC_PLOT: png,
        "report.md": markdown.encode(),
        "report.html": render_html(report, image).encode(),
    }
    written = []
    for name, content in files.items():
        written.append(_write_atomic(out_dir / name, content))
    return written


def roc_png(curves: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]) -> bytes:
    """One panel per attack, one curve per model, log-log axes, chance as a diagonal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attacks = sorted({attack for by_attack in curves.values() for attack in by_attack})
    figure, axes = plt.subplots(1, max(1, len(attacks)), figsize=(5.5 * max(1, len(attacks)), 4.6))
    axes_list = np.atleast_1d(axes)
    for axis, attack in zip(axes_list, attacks, strict=False):
        for model, by_attack in curves.items():
            if attack in by_attack:
                fpr, tpr = by_attack[attack]
                axis.plot(np.maximum(fpr, 1e-4), np.maximum(tpr, 1e-4), label=model)
        axis.plot([1e-4, 1], [1e-4, 1], "k:", linewidth=0.8, label="chance")
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlim(1e-3, 1)
        axis.set_ylim(1e-3, 1)
        axis.set_xlabel("false-positive rate")
        axis.set_ylabel("true-positive rate")
        axis.set_title(f"membership inference: {attack}")
        axis.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return buffer.getvalue()


def tables(report: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """The report's tables as (title, header, rows) of strings, for Markdown and HTML alike."""
    return [
        _utility_table(report),
        _quality_table(report),
        _attack_table(report),
        _bound_table(report),
        _cost_table(report),
    ]


def render_markdown(report: dict[str, Any], plot: str) -> str:
    lines = [f"# Evaluation of {', '.join(report['runs'])}", "", _intro(report), ""]
    for title, header, rows in tables(report):
        lines += [f"## {title}", "", "| " + " | ".join(header) + " |"]
        lines.append("|" + "---|" * len(header))
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        lines.append("")
    lines += [f"![ROC curves]({plot})", "", "## How", "", report["membership_inference"]["how"]]
    return "\n".join(lines) + "\n"


def render_html(report: dict[str, Any], image: str) -> str:
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>sottovoce evaluation</title>",
        "<style>body{font-family:sans-serif;max-width:72em;margin:2em auto}"
        "table{border-collapse:collapse;margin-bottom:1.5em}td,th{border:1px solid #ccc;"
        "padding:.25em .6em;text-align:left}</style></head><body>",
        f"<h1>Evaluation of {html.escape(', '.join(report['runs']))}</h1>",
        f"<p>{html.escape(_intro(report))}</p>",
    ]
    for title, header, rows in tables(report):
        parts.append(f"<h2>{html.escape(title)}</h2><table><tr>")
        parts += [f"<th>{html.escape(cell)}</th>" for cell in header]
        parts.append("</tr>")
        for row in rows:
            parts.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>")
        parts.append("</table>")
    parts.append(f"<img alt='ROC curves' src='{image}'>")
    how = html.escape(report["membership_inference"]["how"])
    parts.append(f"<h2>How</h2><p>{how}</p></body></html>")
    return "\n".join(parts)


# -- tables ----------------------------------------------------------------------------------
def _intro(report: dict[str, Any]) -> str:
    sets = report["data"]["sets"]
    return (
        f"Model {report['model']}; {sets['members']['examples']} members, "
        f"{sets['nonmembers']['examples']} non-members; data: {report['data']['source']}. "
        f"Evaluation took {report['wall_seconds']} s."
    )


def _utility_table(report: dict[str, Any]) -> tuple[str, list[str], list[list[str]]]:
    utility = report["utility"]
    set_names = list(next(iter(utility.values())))
    rows = []
    for model, by_set in utility.items():
        row = [model]
        for name in set_names:
            entry = by_set[name]
            cell = f"{entry['accuracy']:.3f} [{entry['ci95'][0]:.3f}, {entry['ci95'][1]:.3f}]"
            if "mcnemar_vs_base" in entry:
                cell += f" (p={entry['mcnemar_vs_base']['p_value']:.2g})"
            row.append(cell)
        rows.append(row)
    return "Utility (accuracy, 95% Wilson; McNemar p vs base)", ["model", *set_names], rows


def _quality_table(report: dict[str, Any]) -> tuple[str, list[str], list[list[str]]]:
    """Is each tuned model still a language model (perplexity ratio, KL, OOD change)?"""
    quality = report.get("quality", {})
    header = ["model", "perplexity (base → tuned)", "ratio", "KL on held-out (nats)"]
    ood_names = sorted(
        {n for q in quality.values() for n, e in q["sets"].items() if e["role"] == "out-of-domain"}
    )
    header += [
        f"{name[4:] if name.startswith('ood:') else name} accuracy change" for name in ood_names
    ]
    rows = []
    for model, section in quality.items():
        ppl = section["perplexity"]
        sets = section["sets"]
        held = next((e for e in sets.values() if e["role"].startswith("in-domain")), None)
        kl = held.get("kl_base_to_tuned_nats") if held else None
        row = [
            model,
            f"{ppl['base']:.4g} → {ppl['tuned']:.4g}",
            f"{ppl['ratio']:.4g}",
            "" if kl is None else f"{kl:.4g}",
        ]
        for name in ood_names:
            entry = sets[name]
            row.append(f"{entry['accuracy_change']:+.3f} (p={entry['mcnemar']['p_value']:.2g})")
        rows.append(row)
    title = "Still a language model? (perplexity on the bundled general text; KL(base || tuned))"
    return title, header, rows


def _attack_table(report: dict[str, Any]) -> tuple[str, list[str], list[list[str]]]:
    results = report["membership_inference"]["results"]
    header = ["model", "attack", "AUC", "TPR @ 1% FPR", "TPR @ 0.1% FPR"]
    rows = []
    for model, attacks in results.items():
        for attack in attacks:
            at = attack["tpr_at_fpr"]
            rows.append(
                [
                    model,
                    attack["attack"],
                    _ci(attack["auc"]),
                    _ci(at.get("0.01")),
                    _ci(at.get("0.001")),
                ]
            )
    return "Membership inference (95% bootstrap intervals)", header, rows


def _bound_table(report: dict[str, Any]) -> tuple[str, list[str], list[list[str]]]:
    header = [
        "run",
        "bits heard",
        "transcript bits",
        "n",
        "train risk",
        "transcript bound",
        "old bound",
        "measured test risk",
        "epsilon (delta)",
    ]
    rows = []
    for run, bound in report["bound"].items():
        dp = bound.get("dp")
        epsilon = (
            f"{dp['epsilon_this_run_max_over_holders']:.2f} ({dp['delta']:g})" if dp else "none"
        )
        transcript = bound.get("transcript")
        rows.append(
            [
                run,
                f"{bound['bits_spent']:.0f}",
                f"{transcript['transcript_bits']:.0f}" if transcript else "-",
                str(bound["n"]),
                f"{bound['train_risk']:.3f}",
                f"{transcript['transcript_bound']:.3f}" if transcript else "-",
                f"{bound['test_risk_bound']:.3f}",
                f"{bound['measured_test_risk']:.3f}",
                epsilon,
            ]
        )
    return "Bounds on the test risk (docs/bound.md), and the measured test risk", header, rows


def _cost_table(report: dict[str, Any]) -> tuple[str, list[str], list[list[str]]]:
    cost = report["cost"]
    header = ["", "wall s (whole run)", "compute s (one process)", "forward passes",
              "peak memory (one process)", "bytes on the wire", "data pooled"]  # fmt: skip
    rows = []
    for run, figures in cost["runs"].items():
        rows.append(
            [
                f"{run}: {figures['holders']} holders",
                _num(figures["wall_seconds"]),
                _num(figures["holder_compute_seconds_max"]) + " per holder",
                _num(figures["holder_forward_passes_max"]) + " per holder",
                _mib(figures["holder_peak_rss_bytes_max"]) + " per holder",
                _mib(figures["wire_bytes_total"]),
                "no",
            ]
        )
    if "baseline" in cost:
        base = cost["baseline"]
        rows.append(
            [
                "backprop baseline: one process",
                _num(base["wall_seconds"]),
                _num(base["compute_seconds"]),
                f"{base['forward_passes']} ({base['training_steps']} with a backward)",
                _mib(base["peak_rss_bytes"]),
                "-",
                "yes",
            ]
        )
    return "Cost (forward passes of sub-batches of up to 32 examples)", header, rows


def _ci(entry: dict[str, float] | None) -> str:
    if entry is None:
        return "n/a (too few non-members)"
    return f"{entry['value']:.3f} [{entry['ci95_low']:.3f}, {entry['ci95_high']:.3f}]"


def _num(value: Any) -> str:
    return "-" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def _mib(value: Any) -> str:
    if value is None:
        return "-"
    if value < 2**20:
        return f"{value / 2**10:.1f} KiB"
    return f"{value / 2**20:.0f} MiB"


def _write_atomic(path: Path, content: bytes) -> Path:
    return atomic_write_bytes(path, content, mode=SHARED)  # a report to share, not a secret
