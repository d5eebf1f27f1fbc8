"""A data set's ledger as a table and as a page a data-protection officer can read.

The ledger (:mod:`sottovoce.client.ledger`) is the authoritative record of every release
that left the holder's machine. This module only reads it: one row per release (when, to
which run, what was released, what it cost, the running total), one summary per run, and
the refusals, which released nothing. The HTML page is a single self-contained file (no
script, no style sheet or font fetched from anywhere) that can be archived or mailed.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sottovoce.client.ledger import Ledger, LedgerRecord
from sottovoce.common.accounting import Gaussian, PoissonGaussian, PrivacyAccountant


@dataclass(frozen=True)
class ReleaseRow:
    """One release, as the operator reads it."""

    number: int
    time: str
    run_id: str
    task_id: str
    kind: str
    released: str
    bits: float
    total_bits: float
    dp: str  # the DP mechanism's event, or "" for a plain answer


@dataclass(frozen=True)
class RunRow:
    """What one run cost this data set."""

    run_id: str
    first: str
    last: str
    answers: int
    bits: float
    epsilon: float | None  # composed over this run's DP answers, at the policy's delta


def iso(unix: float) -> str:
    """A release time in UTC, to the second."""
    return datetime.fromtimestamp(unix, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def release_rows(ledger: Ledger) -> list[ReleaseRow]:
    """Every release, oldest first, with the running total of bits."""
    rows: list[ReleaseRow] = []
    total = 0.0
    for number, record in enumerate(ledger.records, start=1):
        total += record.bits
        rows.append(
            ReleaseRow(
                number=number,
                time=iso(record.time),
                run_id=record.run_id,
                task_id=record.task_id,
                kind=record.kind,
                released=_released(record),
                bits=record.bits,
                total_bits=total,
                dp="" if record.dp is None else describe_event(record),
            )
        )
    return rows


def run_rows(ledger: Ledger) -> list[RunRow]:
    """One row per run, in the order the runs first asked."""
    by_run: dict[str, list[LedgerRecord]] = {}
    for record in ledger.records:
        by_run.setdefault(record.run_id, []).append(record)
    delta = None if ledger.privacy is None else ledger.privacy.delta
    rows = []
    for run_id, records in by_run.items():
        events = [r.dp for r in records if r.dp is not None]
        epsilon = None
        if events and delta is not None:
            epsilon = PrivacyAccountant(events).epsilon(delta)
        rows.append(
            RunRow(
                run_id=run_id,
                first=iso(records[0].time),
                last=iso(records[-1].time),
                answers=len(records),
                bits=math.fsum(r.bits for r in records),
                epsilon=epsilon,
            )
        )
    return rows


def describe_event(record: LedgerRecord) -> str:
    """The DP mechanism of a release in words."""
    event = record.dp
    if event is None:
        return ""
    if isinstance(event, PoissonGaussian):
        return (
            f"Gaussian noise (multiplier {event.noise_multiplier:.4g}) on a secret "
            f"{event.sampling_rate:.2%} sample"
        )
    if isinstance(event, Gaussian):
        return (
            f"noisy vote of secret chunks (Gaussian noise std {event.noise_std:.4g}, "
            f"sensitivity {event.sensitivity:.4g})"
        )
    return f"randomized response (epsilon {event.epsilon:.4g} over {event.outcomes} outcomes)"


def _released(record: LedgerRecord) -> str:
    if record.value is not None:
        return f"value {record.value:.6g}"
    if record.choice is None:
        return "-"
    return f"choice {record.choice}"


def render_html(
    ledger: Ledger, refusals: Sequence[dict[str, Any]], *, generated: float | None = None
) -> str:
    """The whole ledger as one HTML page, in plain words."""
    rows = release_rows(ledger)
    runs = run_rows(ledger)
    e = html.escape
    privacy = ledger.privacy
    when = iso(generated if generated is not None else datetime.now(tz=UTC).timestamp())
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>Release ledger of data set {e(ledger.dataset_id[:12])}</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>What this data set has released</h1>",
        '<p class="lead">This page lists every answer that left this machine for this data '
        "set: when it left, to which training run, what it said, and what it cost. The "
        "ledger it is read from is kept on this machine, is append-only and hash-chained, "
        "and is charged <em>before</em> an answer leaves. No data, scores, gradients or "
        "model weights ever leave; only these answers do.</p>",
        '<section id="summary"><h2>Summary</h2><dl>',
        _dt("Data set", e(ledger.dataset_id)),
        _dt("Ledger file", e(str(ledger.path))),
        _dt(
            "Information released",
            f"{ledger.spent_bits:.2f} of {ledger.max_bits:g} bits "
            f"({_share(ledger.spent_bits, ledger.max_bits)}); "
            f"{ledger.remaining_bits:.2f} bits left",
        ),
    ]
    if privacy is not None:
        spent = ledger.spent_epsilon()
        parts.append(
            _dt(
                "Differential privacy",
                f"epsilon {spent:.3f} of {privacy.max_epsilon:g} spent at delta "
                f"{privacy.delta:g} ({_share(spent, privacy.max_epsilon)})",
            )
        )
    parts += [
        _dt("Answers released", str(len(rows))),
        _dt("Runs", str(len(runs))),
        _dt("Refusals (nothing released)", str(len(refusals))),
        _dt("First release", rows[0].time if rows else "none"),
        _dt("Last release", rows[-1].time if rows else "none"),
        "</dl>",
    ]
    if ledger.inherited is not None:
        parts.append(f'<p class="note">{e(ledger.inherited.describe())}</p>')
    parts += [
        '<p class="note">A bit is the unit of information: an answer choosing among 8 '
        "candidates costs 3 bits. Bits bound how much a run can learn from this data set in "
        "total. They do not say about whom; only answers with differential privacy "
        "(epsilon) protect each individual record.</p></section>",
        '<section id="runs"><h2>Per run</h2>',
        "<table><thead><tr><th>Run</th><th>First answer</th><th>Last answer</th>"
        "<th>Answers</th><th>Bits</th><th>Epsilon</th></tr></thead><tbody>",
    ]
    for run in runs:
        epsilon = "-" if run.epsilon is None else f"{run.epsilon:.3f}"
        parts.append(
            f"<tr><td>{e(run.run_id)}</td><td>{run.first}</td><td>{run.last}</td>"
            f'<td class="num">{run.answers}</td><td class="num">{run.bits:.2f}</td>'
            f'<td class="num">{epsilon}</td></tr>'
        )
    parts += [
        "</tbody></table></section>",
        '<section id="releases"><h2>Every release</h2>',
        "<table><thead><tr><th>#</th><th>When</th><th>Run</th><th>Question</th>"
        "<th>Kind</th><th>Released</th><th>Cost (bits)</th><th>Total (bits)</th>"
        "<th>Privacy mechanism</th></tr></thead><tbody>",
    ]
    for row in rows:
        parts.append(
            f'<tr><td class="num">{row.number}</td><td>{row.time}</td><td>{e(row.run_id)}</td>'
            f"<td>{e(row.task_id)}</td><td>{e(row.kind)}</td><td>{e(row.released)}</td>"
            f'<td class="num">{row.bits:.3f}</td><td class="num">{row.total_bits:.3f}</td>'
            f"<td>{e(row.dp) or 'none (a plain answer)'}</td></tr>"
        )
    if not rows:
        parts.append('<tr><td colspan="9">Nothing has been released.</td></tr>')
    parts += [
        "</tbody></table></section>",
        '<section id="refusals"><h2>Refusals</h2>',
        "<p>Questions this holder refused before reading any data. A refusal releases "
        "nothing but its reason code and costs nothing.</p>",
        "<table><thead><tr><th>When</th><th>Question</th><th>Code</th><th>Reason</th>"
        "</tr></thead><tbody>",
    ]
    for note in refusals:
        stamp = note.get("time")
        when_refused = iso(float(stamp)) if isinstance(stamp, int | float) else "-"
        parts.append(
            f"<tr><td>{when_refused}</td><td>{e(str(note.get('task_id')))}</td>"
            f"<td>{e(str(note.get('code')))}</td><td>{e(str(note.get('message')))}</td></tr>"
        )
    if not refusals:
        parts.append('<tr><td colspan="4">No refusals.</td></tr>')
    parts += [
        "</tbody></table></section>",
        f"<footer>Generated {when} by <code>sottovoce ledger --html</code> from the "
        "ledger on this machine.</footer></body></html>",
    ]
    return "\n".join(parts) + "\n"


def _dt(term: str, value: str) -> str:
    return f"<dt>{term}</dt><dd>{value}</dd>"


def _share(spent: float, limit: float) -> str:
    return f"{spent / limit:.1%} of the limit" if limit > 0 else "no limit"


_CSS = (
    "body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:72rem;padding:0 1rem;"
    "color:#1b1b1b;line-height:1.45}h1{font-size:1.6rem}h2{font-size:1.2rem;margin-top:2rem}"
    ".lead{font-size:1.05rem}.note{color:#555;font-size:.92rem}"
    "dl{display:grid;grid-template-columns:max-content auto;gap:.3rem 1.2rem}dt{font-weight:600}"
    "dd{margin:0;overflow-wrap:anywhere}table{border-collapse:collapse;width:100%;font-size:.9rem}"
    "th,td{border-bottom:1px solid #ddd;padding:.35rem .5rem;text-align:left;vertical-align:top}"
    "th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}"
    "footer{margin-top:2rem;color:#666;font-size:.85rem}"
)
