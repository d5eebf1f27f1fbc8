"""A long local phase is never silent: a count on a terminal, plain lines in a log."""

from __future__ import annotations

import io

from helpers import TINY, run_config_data, tiny_records
from rich.console import Console

from sottovoce.common.config import parse_config
from sottovoce.common.fitness import build_fitness
from sottovoce.common.models import load_model
from sottovoce.evidence.scoring import SharedPrefixScorer
from sottovoce.progress import counted_phase


def log_console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=False, width=100), out


def test_a_log_gets_a_plain_line_per_interval_and_one_at_the_end() -> None:
    console, out = log_console()
    with counted_phase(console, "measuring", "passes", every_s=0.0) as advance:
        for _ in range(3):
            advance()
    lines = out.getvalue().splitlines()
    assert lines[:3] == [f"measuring: {n} passes (0 s)" for n in (1, 2, 3)]
    assert lines[3].startswith("measuring: 3 passes, done in ")
    assert "\x1b[" not in out.getvalue()  # no live bar's escape codes in a log


def test_a_long_interval_prints_only_the_closing_line() -> None:
    console, out = log_console()
    with counted_phase(console, "measuring", "passes", every_s=3600.0) as advance:
        advance()
    (line,) = out.getvalue().splitlines()
    assert line.startswith("measuring: 1 passes, done in ")


def test_counting_after_the_phase_prints_nothing() -> None:
    console, out = log_console()
    with counted_phase(console, "measuring", "passes", every_s=0.0) as advance:
        advance()
    before = out.getvalue()
    advance()  # a hook left attached to a later measurement
    assert out.getvalue() == before


def test_the_scorer_reports_every_forward_pass() -> None:
    """The progress count is the scorer's own forward-pass count, prefixes included."""
    loaded = load_model(TINY)
    config = parse_config(run_config_data(), "run.toml")
    fitness = build_fitness(config.fitness, loaded.tokenizer)
    for split in (1, None):
        scorer = SharedPrefixScorer(loaded.model, fitness, split, max_batch=8)
        seen: list[None] = []
        scorer.on_forward = lambda seen=seen: seen.append(None)
        scorer.add("set", tiny_records(20))
        scorer.score(loaded.model, "set")
        # 3 batches of <= 8: with a split, their prefixes once and then the suffixes
        assert len(seen) == scorer.forward_passes == (6 if split is not None else 3)
