"""Is the tuned model still a language model? Perplexity ratio, out-of-domain accuracy and KL.

On the tiny model: an unchanged model must show exactly 1.0 and 0.0; a deliberately
destroyed one (final-norm scales multiplied by large random factors, the failure the old
demo shipped) must show a huge perplexity ratio and KL; the cached and the plain-forward
paths must agree; the figures must be computed on the sets they name.
"""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from sottovoce.api import read_config
from sottovoce.common import quality
from sottovoce.common.data import records_hash, sentiment_records
from sottovoce.common.errors import DataError
from sottovoce.common.fitness import build_fitness
from sottovoce.common.models import load_model
from sottovoce.common.quality import (
    QualityFigures,
    cap_records,
    forward_margins,
    forward_perplexity,
    last_position_kl,
    margin_auc,
    ood_records,
    quality_section,
    text_windows,
)
from sottovoce.common.steplog import Step
from sottovoce.evidence.drift import DriftMeter
from sottovoce.evidence.scoring import SharedPrefixScorer
from sottovoce.server.coordinator import Coordinator
from sottovoce.server.run_report import coordinator_report, measure_public_quality
from sottovoce.server.run_state import RoundRecord, RunState
from tests.helpers import FITNESS, TINY, tiny_records, write_run_config


def _destroyed(model: torch.nn.Module) -> torch.nn.Module:
    """The final norm's weight times exp(N(0, 3^2)) per channel: factors of 1e-4..1e4."""
    broken = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        weight = broken.model.norm.weight
        weight.mul_(torch.exp(3.0 * torch.randn(weight.shape, generator=generator)))
    return broken


def _meter(base: torch.nn.Module, split: int | None, n: int = 40) -> DriftMeter:
    loaded = load_model(TINY)
    fitness = build_fitness(FITNESS, loaded.tokenizer)
    scorer = SharedPrefixScorer(base, fitness, split, max_batch=16)
    scorer.add("task", tiny_records(n, seed=1))
    windows = text_windows(loaded.tokenizer, max_positions=128, max_tokens=1024)
    return DriftMeter(scorer, base, prompt_sets=["task"], windows=windows)


def test_general_text_windows_are_exact_and_stated() -> None:
    tokenizer = load_model(TINY).tokenizer  # byte-level: one token per byte
    windows = text_windows(tokenizer, max_positions=100, max_tokens=1000, per_batch=3)
    assert windows.window == 100 and windows.tokens == 1000
    assert windows.scored_tokens == 10 * 99
    assert [batch.size for batch in windows.batches] == [3, 3, 3, 1]
    text = quality.general_text().encode("utf-8")
    assert bytes(windows.batches[0].input_ids[0].tolist()) == text[:100]
    assert bytes(windows.batches[3].input_ids[0].tolist()) == text[900:1000]
    described = windows.describe()
    assert described["windows"] == 10 and described["scored_tokens"] == 990
    assert "Alice" in quality.general_text()


def test_a_missing_general_text_set_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(quality, "GENERAL_TEXT_FILE", "no_such_text.txt")
    with pytest.raises(DataError, match=r"no_such_text\.txt cannot be read") as caught:
        quality.general_text()
    assert "\n" not in str(caught.value)
    with pytest.raises(DataError):
        text_windows(load_model(TINY).tokenizer)


def test_kl_is_zero_for_equal_logits_and_matches_its_definition() -> None:
    generator = torch.Generator().manual_seed(3)
    base, tuned = torch.randn(5, 11, generator=generator), torch.randn(5, 11, generator=generator)
    assert torch.equal(last_position_kl(base, base), torch.zeros(5, dtype=torch.float64))
    p, q = torch.softmax(base.double(), -1), torch.softmax(tuned.double(), -1)
    expected = (p * (p.log() - q.log())).sum(-1)
    assert torch.allclose(last_position_kl(base, tuned), expected)
    assert bool((last_position_kl(base, tuned) > 0).all())


@pytest.mark.parametrize("split", [2, 1, None])  # head-input cache, last block, full forwards
def test_base_is_exactly_one_and_zero_and_a_destroyed_model_is_caught(split: int | None) -> None:
    base = load_model(TINY).model
    meter = _meter(base, split)
    assert meter.base.kl == {"task": 0.0}
    same = meter.measure(copy.deepcopy(base))
    assert same.perplexity == meter.base.perplexity  # bit for bit: ratio exactly 1.0
    assert same.kl == {"task": 0.0}
    assert (same.correct["task"] == meter.base.correct["task"]).all()

    broken = meter.measure(_destroyed(base))
    assert broken.perplexity is not None and meter.base.perplexity is not None
    assert broken.perplexity.value / meter.base.perplexity.value > 20
    assert broken.kl["task"] > 1.0
    # The plain-forward path (what a coordinator runs) measures the same perplexity.
    plain = forward_perplexity(_destroyed(base), meter.windows)  # type: ignore[arg-type]
    assert plain.value == pytest.approx(broken.perplexity.value, rel=1e-4)


def test_the_meter_measures_the_sets_it_names() -> None:
    loaded = load_model(TINY)
    fitness = build_fitness(FITNESS, loaded.tokenizer)
    meter = _meter(loaded.model, 2, n=40)
    correct, margins = forward_margins(loaded.model, fitness, tiny_records(40, seed=1))
    assert (meter.base.correct["task"] == correct).all()
    assert margins is not None
    assert np.allclose(meter.base.margins["task"], margins, atol=1e-5)
    labels = np.array([r["label"] for r in tiny_records(40, seed=1)])
    assert (correct == ((margins > 0) == (labels == 1))).all()  # ties go to label 0
    assert meter.records("task") == tiny_records(40, seed=1)


def test_ood_records_are_evaluates_sample_of_the_bundled_amazon_set() -> None:
    amazon = ood_records()["amazon"]
    assert len(amazon) == 1000
    assert amazon == cap_records(sentiment_records("amazon"), 1000, 0)
    assert len({r["id"] for r in amazon}) == 1000


def test_a_served_runs_report_measures_public_sets_only(tmp_path: Path) -> None:
    config, text = read_config(
        write_run_config(tmp_path / "run.toml", run={"name": "q", "max_rounds": 3})
    )
    loaded = load_model(TINY)
    state = RunState.open(tmp_path / "run", config, text, loaded.fingerprint)
    coordinator = Coordinator(config, state, loaded.fingerprint)
    candidates = coordinator.strategy.ask(0)
    step = Step(seed=candidates[0].seed, coefficient=3.0)  # a drastic move of all log-scales
    record = RoundRecord(
        round_index=0,
        candidates=candidates,
        choices={},
        refusals={},
        winner=0,
        steps=(step,),
        step_size_after=0.05,
        bits=0.0,
        closed_by="test",
    )
    state.record_round(record)
    report = coordinator_report(
        config, state, coordinator.spec, public_quality=measure_public_quality(config, state)
    )
    assert "quality_on_public_sets" not in coordinator_report(config, state, coordinator.spec)
    section = report["quality_on_public_sets"]
    assert "error" not in section, section
    assert set(section["sets"]) == {"amazon"}  # no in-domain set: the coordinator has no data
    amazon = section["sets"]["amazon"]
    assert amazon["examples"] == 1000 and amazon["role"] == "out-of-domain"
    assert amazon["sha256"] == records_hash(ood_records()["amazon"])
    assert "kl_base_to_tuned_nats" not in amazon and "kl_definition" not in section
    perplexity = section["perplexity"]
    assert perplexity["tokens"] == perplexity["windows"] * perplexity["window_tokens"]
    assert perplexity["ratio"] > 1.5  # every final-norm channel scaled by e^3 or e^-3
    text = quality.general_text().encode("utf-8")
    assert perplexity["text_sha256"] == hashlib.sha256(text).hexdigest()


def test_a_threshold_shift_moves_accuracy_but_not_the_margin_auc() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 400)
    margins = labels * 1.0 + rng.normal(0, 1, 400) - 0.5
    shifted = margins - 1.0  # the same ranking, more "label 0" answers
    records = [{"text": str(i), "label": int(label)} for i, label in enumerate(labels)]

    def figures(m: np.ndarray) -> QualityFigures:
        return QualityFigures(None, {"s": (m > 0) == (labels == 1)}, {}, {"s": m})

    entry = quality_section(
        figures(margins), figures(shifted), windows=None, sets={"s": records}, roles={"s": "x"}
    )["sets"]["s"]
    assert entry["accuracy_change"] < -0.1 and entry["mcnemar"]["p_value"] < 1e-4
    assert entry["margin_auc_base"] == entry["margin_auc_tuned"] > 0.6
    assert entry["answered_label_1_tuned"] < entry["answered_label_1_base"]
    assert entry["true_label_1_rate"] == labels.mean()
    assert margin_auc(np.array([1.0, 0.0, 0.5]), np.array([1, 0, 0])) == 1.0
    assert margin_auc(np.array([1.0, 1.0]), np.array([1, 0])) == 0.5  # a tie counts half
