"""`sottovoce ledger` as tables and as a page a data-protection officer reads.

The fast tests check the table and the page's content against the ledger; the slow one
renders the page in a real headless Chromium (Debian's package) and reads what it shows.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import write_policy, write_records

from sottovoce.api import open_ledger
from sottovoce.cli import main
from sottovoce.common.accounting import RandomizedResponse
from sottovoce.common.protocol.answers import AnswerKind

CHROMIUM = shutil.which("chromium")
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
)  # fmt: skip


def charged_ledger(tmp_path: Path) -> tuple[Path, Path]:
    """A data set that released three answers to two runs (one DP) and refused nothing."""
    data = write_records(tmp_path / "data.jsonl", 24)
    policy = write_policy(
        tmp_path / "policy.toml",
        tmp_path / "ledger",
        max_bits=50.0,
        max_epsilon=8.0,
        delta=1e-5,
        answer_mechanisms=["plain", "randomized-response"],
    )
    with open_ledger(policy, data) as book:
        book.charge("run-a:r0:x", "run-a", 1.0, 1, answer_kind=AnswerKind.COMPARE)
        book.charge("run-a:r1:x", "run-a", 1.0, 0, answer_kind=AnswerKind.COMPARE)
        book.charge(
            "run-b:r0:x",
            "run-b",
            3.0,
            5,
            answer_kind=AnswerKind.BEST_OF,
            dp=RandomizedResponse(epsilon=1.0, outcomes=8),
        )
    return policy, data


def test_ledger_prints_tables_of_runs_and_releases(tmp_path: Path) -> None:
    policy, data = charged_ledger(tmp_path)
    result = CliRunner().invoke(
        main, ["ledger", "--policy", str(policy), "--data", str(data)], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 0, result.output
    assert "Per run" in result.output and "Every release" in result.output
    assert "run-a" in result.output and "run-b:r0:x" in result.output
    assert "5.00 of 50 bits spent, 45.00 left" in result.output
    assert "randomized response (epsilon 1 over 8 outcomes)" in result.output
    summary = CliRunner().invoke(
        main, ["ledger", "--policy", str(policy), "--data", str(data), "--json"]
    )
    assert '"spent_bits": 5.0' in summary.output


def test_ledger_html_says_what_was_released_when_to_whom_at_what_cost(tmp_path: Path) -> None:
    policy, data = charged_ledger(tmp_path)
    page = tmp_path / "ledger.html"
    result = CliRunner().invoke(
        main, ["ledger", "--policy", str(policy), "--data", str(data), "--html", str(page)]
    )
    assert result.exit_code == 0, result.output
    text = page.read_text(encoding="utf-8")
    assert page.stat().st_mode & 0o777 == 0o600  # figures about the holder's data
    assert "<script" not in text and "http" not in text.split("</style>")[0]  # self-contained
    for expected in ("run-a", "run-b", "run-b:r0:x", "choice 5", "5.00 of 50 bits",
                     "randomized response (epsilon 1 over 8 outcomes)", "UTC"):  # fmt: skip
        assert expected in text, expected


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="no chromium (apt-get install chromium)")
def test_the_ledger_page_renders_in_a_real_browser(tmp_path: Path) -> None:
    policy, data = charged_ledger(tmp_path)
    page = tmp_path / "ledger.html"
    CliRunner().invoke(
        main, ["ledger", "--policy", str(policy), "--data", str(data), "--html", str(page)]
    )
    assert CHROMIUM is not None
    profile = tmp_path / "chromium-profile"
    common = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}"]
    dom = subprocess.run(
        [*common, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    rendered = dom.stdout
    assert "What this data set has released" in rendered
    assert rendered.count("<tr>") >= 1 + 3 + 2  # header rows, three releases, two runs
    shot = tmp_path / "ledger.png"
    taken = subprocess.run(
        [*common, f"--screenshot={shot}", "--window-size=1280,1400", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert taken.returncode == 0 and shot.stat().st_size > 10_000, taken.stderr[-2000:]
    # the page as laid out: the browser's own text of it (innerText, not the source)
    text = subprocess.run(
        [*common, "--dump-dom", "--run-all-compositor-stages-before-draw",
         "--virtual-time-budget=2000", page.as_uri()],
        capture_output=True, text=True, timeout=120,
    ).stdout  # fmt: skip
    assert "5.00 of 50 bits" in text and "run-b:r0:x" in text


def test_a_chunk_vote_release_is_described_as_such() -> None:
    """The report names each DP mechanism: a chunk vote's Gaussian event (sensitivity
    sqrt(2)) is not randomized response."""
    from sottovoce.client.ledger import LedgerRecord
    from sottovoce.client.ledger_report import describe_event
    from sottovoce.common.accounting import chunk_vote_event

    record = LedgerRecord(
        seq=0, time=0.0, run_id="r", task_id="t", kind="compare", bits=1.0, choice=0,
        prev_hash="", hash="", dp=chunk_vote_event(14.1),
    )  # fmt: skip
    assert describe_event(record) == (
        "noisy vote of secret chunks (Gaussian noise std 14.1, sensitivity 1.414)"
    )
