"""Export: base + log written as a plain Hugging Face checkpoint, all or nothing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import (
    accepted_round,
    base_plus_steps,
    differing_tensors,
    tiny_fingerprint,
    write_run_config,
)
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from sottovoce.api import open_coordinator
from sottovoce.common.errors import ConfigError, LogIntegrityError
from sottovoce.common.steplog import Step, StepLog, as_float32
from sottovoce.server.export import LOG_FILE, export_run

STEPS = [
    Step(seed=11, coefficient=as_float32(0.01)),
    Step(seed=12, coefficient=as_float32(-0.02)),
    Step(seed=11, coefficient=as_float32(0.005)),  # a seed may come back
]


def make_run(tmp_path: Path, kind: str = "full") -> Path:
    """A run directory on the tiny model whose log holds ``STEPS``."""
    config = write_run_config(tmp_path / "run.toml", parametrization={"kind": kind})
    run_dir = tmp_path / "run"
    coordinator = open_coordinator(config, run_dir, model_fingerprint=tiny_fingerprint())
    for index, step in enumerate(STEPS):  # journaled, then logged, as the coordinator does
        coordinator.state.record_round(accepted_round(index, step))
    return run_dir


def load_checkpoint(folder: Path) -> dict[str, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
    return dict(model.state_dict())


def test_full_export_equals_base_plus_sum_of_steps(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path)
    out = tmp_path / "exported"
    result = export_run(run_dir, out)
    assert result.steps == 3 and result.out_dir == out

    weights = load_checkpoint(out)
    assert differing_tensors(base_plus_steps(STEPS), weights) == []
    base = base_plus_steps([])
    assert [name for name in base if torch.equal(base[name], weights[name])] == []
    assert torch.equal(weights["lm_head.weight"], weights["model.embed_tokens.weight"])  # tied

    card = json.loads((out / LOG_FILE).read_text(encoding="utf-8"))
    assert card["base_fingerprint"] == tiny_fingerprint()
    assert card["steps"] == 3 and card["log_head"] == result.log_head
    assert [(r["seed"], r["coefficient"]) for r in card["log"]] == [
        (s.seed, s.coefficient) for s in STEPS
    ]
    assert result.log_head in (out / "README.md").read_text(encoding="utf-8")


def test_export_refuses_a_non_empty_out(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path)
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(ConfigError, match="taken: exists and is not empty; choose a new --out"):
        export_run(run_dir, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize("exists", [False, True], ids=["missing", "not-a-run"])
def test_export_refuses_what_is_not_a_run(tmp_path: Path, exists: bool) -> None:
    run_dir = tmp_path / "nothing-here"
    if exists:
        run_dir.mkdir()
        (run_dir / "log.jsonl").write_text("", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"nothing-here: not a run directory \(no run.json\)"):
        export_run(run_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_accepts_a_simulate_run_directory(tmp_path: Path) -> None:
    """`simulate` keeps the coordinator's state in RUN/coordinator; --run RUN finds it."""
    make_run(tmp_path)
    simulated = tmp_path / "simulated"
    simulated.mkdir()
    (tmp_path / "run").rename(simulated / "coordinator")
    result = export_run(simulated, tmp_path / "out")
    assert result.steps == 3
    assert differing_tensors(base_plus_steps(STEPS), load_checkpoint(tmp_path / "out")) == []


@pytest.mark.parametrize("damage", ["deleted", "truncated", "altered"])
def test_export_refuses_a_log_the_journal_disagrees_with(tmp_path: Path, damage: str) -> None:
    run_dir = make_run(tmp_path)
    log = run_dir / "log.jsonl"
    lines = log.read_text(encoding="utf-8").splitlines(keepends=True)
    if damage == "deleted":
        log.unlink()
    elif damage == "truncated":
        log.write_text("".join(lines[:1]), encoding="utf-8")
    else:  # a valid chain of other steps: only the journal can tell
        log.unlink()
        meta = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
        other = StepLog.open(log, meta["genesis"])
        for step in [*STEPS[:2], Step(seed=99, coefficient=as_float32(0.5))]:
            other.append(step)
    held = {"deleted": 0, "truncated": 1, "altered": 3}[damage]
    expected = (
        f"log.jsonl \\({held} steps\\) and journal.jsonl \\(3 accepted\\) disagree from step 2"
        if damage == "altered"
        else f"log.jsonl holds {held} steps, journal.jsonl accepted 3; the log is missing"
    )
    with pytest.raises(LogIntegrityError, match=expected):
        export_run(run_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("failing", [PreTrainedModel, PreTrainedTokenizerBase])
def test_export_failing_midway_leaves_no_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: type
) -> None:
    run_dir = make_run(tmp_path)
    out = tmp_path / "exports" / "model"

    def save_then_fail(self: Any, folder: Path, *args: Any, **kwargs: Any) -> None:
        (Path(folder) / "half-written.bin").write_bytes(b"\0" * 64)
        raise OSError("No space left on device")

    monkeypatch.setattr(failing, "save_pretrained", save_then_fail)
    with pytest.raises(OSError, match="No space left"):
        export_run(run_dir, out)
    assert list((tmp_path / "exports").iterdir()) == []  # neither out nor a staging folder

    monkeypatch.undo()
    export_run(run_dir, out)  # the failed attempt left nothing in the way
    assert differing_tensors(base_plus_steps(STEPS), load_checkpoint(out)) == []


def test_the_model_card_says_what_it_was_tuned_for_and_its_perplexity_ratio(
    tmp_path: Path,
) -> None:
    run_dir = make_run(tmp_path)
    export_run(run_dir, tmp_path / "plain")
    card = (tmp_path / "plain" / "README.md").read_text(encoding="utf-8")
    assert "Tuned for: classification: the next token after the prompt" in card
    assert "Perplexity on general text: not measured for this run" in card

    quality = {
        "perplexity": {"base": 25.4, "tuned": 26.1, "ratio": 26.1 / 25.4},
        "sets": {"amazon": {"examples": 1000, "accuracy_base": 0.839, "accuracy_tuned": 0.84}},
    }
    (run_dir / "report.json").write_text(json.dumps({"quality_on_public_sets": quality}))
    export_run(run_dir, tmp_path / "measured")
    card = (tmp_path / "measured" / "README.md").read_text(encoding="utf-8")
    assert "25.4 (base) -> 26.1 (this model), ratio 1.028" in card
    assert "Out-of-domain accuracy, amazon (1000 examples): 0.8390 -> 0.8400." in card
    sidecar = json.loads((tmp_path / "measured" / LOG_FILE).read_text(encoding="utf-8"))
    assert sidecar["quality_on_public_sets"] == quality
