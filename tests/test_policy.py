"""The holder's policy: loading it strictly, and refusing every run or task outside it."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest

from sottovoce.client.policy import (
    HolderPolicy,
    check_run,
    check_task,
    fitness_digest,
    load_policy,
    policy_summary,
)
from sottovoce.common.errors import ConfigError, PolicyViolation
from sottovoce.common.messages import (
    AnswerKind,
    BatchSpec,
    Candidate,
    FitnessSpec,
    RunSpec,
    Task,
)
from sottovoce.common.parametrizations.base import ParametrizationSpec
from sottovoce.common.steplog import Step

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "policy.toml"
FINGERPRINT = "sha256:" + "ab" * 32
OTHER_FINGERPRINT = "sha256:" + "cd" * 32
NOW = 1_700_000_000.0


# -- helpers -----------------------------------------------------------------------------------
def good_table() -> dict[str, Any]:
    return {
        "max_bits": 2000,
        "expected_model_fingerprint": FINGERPRINT,
        "allowed_algorithms": ["bboxer-1+1", "bboxer-1+lambda"],
        "allowed_parametrizations": ["scale", "select", "subspace"],
        "max_lambda": 8,
        "max_perturbation_scale": 0.5,
        "min_batch_size": 16,
        "allowed_batch_modes": ["minibatch", "full"],
        "ledger_dir": "ledger",
        "fitness": {
            "kind": "classification",
            "prompt_template": "Review: {text}\nSentiment:",
            "label_words": [" negative", " positive"],
            "text_field": "text",
            "label_field": "label",
        },
    }


def to_toml(table: dict[str, Any]) -> str:
    """A tiny TOML writer for the value types a policy uses (strings via JSON escapes)."""
    lines: list[str] = []
    tables: list[str] = []
    for key, value in table.items():
        if isinstance(value, dict):
            tables.append(f"[{key}]\n{to_toml(value)}")
        else:
            lines.append(f"{key} = {toml_value(value)}")
    return "\n".join(lines) + "\n" + "\n".join(tables)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    return repr(value)


def write_policy(folder: Path, table: dict[str, Any]) -> Path:
    path = folder / "policy.toml"
    path.write_text(to_toml(table), encoding="utf-8")
    return path


def make_policy(**changes: Any) -> HolderPolicy:
    base: dict[str, Any] = {
        "max_bits": 2000.0,
        "expected_model_fingerprint": FINGERPRINT,
        "allowed_algorithms": ("bboxer-1+1", "bboxer-1+lambda"),
        "allowed_parametrizations": ("scale", "select", "subspace"),
        "max_lambda": 8,
        "max_perturbation_scale": 0.5,
        "fitness": FitnessSpec(),
        "ledger_dir": Path("ledger"),
    }
    base.update(changes)
    return HolderPolicy(**base)


def make_spec(**changes: Any) -> RunSpec:
    base: dict[str, Any] = {
        "run_id": "run-1",
        "algorithm": "bboxer-1+1",
        "model_fingerprint": FINGERPRINT,
        "parametrization": ParametrizationSpec(kind="scale"),
        "fitness": FitnessSpec(),
        "batch": BatchSpec(mode="minibatch", batch_size=32),
        "answer_kind": AnswerKind.COMPARE,
        "bit_budget": 300.0,
        "max_rounds": 100,
        "log_genesis": "00" * 32,
    }
    base.update(changes)
    return RunSpec(**base)


def make_task(spec: RunSpec, **changes: Any) -> Task:
    base: dict[str, Any] = {
        "task_id": "t-000001",
        "run_id": spec.run_id,
        "round_index": 0,
        "base_version": 0,
        "new_steps": (Step(seed=7, coefficient=0.25),),
        "log_head": "11" * 32,
        "candidates": (Candidate(seed=123, scale=0.5),),
        "answer_kind": spec.answer_kind,
        "batch": spec.batch,
        "deadline_unix": NOW + 30.0,
    }
    base.update(changes)
    return Task(**base)


# -- loading -----------------------------------------------------------------------------------
def test_example_policy_loads() -> None:
    policy = load_policy(EXAMPLE)
    assert policy.max_bits == 2000.0
    assert policy.allowed_algorithms == ("bboxer-1+1", "bboxer-1+lambda")
    assert policy.allowed_parametrizations == ("scale", "select", "subspace")
    assert policy.max_lambda == 8
    assert policy.max_perturbation_scale == 0.5
    assert policy.min_batch_size == 16
    assert policy.allowed_batch_modes == ("minibatch", "full")
    assert policy.fitness == FitnessSpec(
        kind="classification",
        prompt_template="Review: {text}\nSentiment:",
        label_words=(" negative", " positive"),
        text_field="text",
        label_field="label",
        target_field="answer",
    )
    assert policy.ledger_dir == EXAMPLE.parent / "ledger"


def test_relative_ledger_dir_resolves_against_the_policy_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "holder"
    folder.mkdir()
    write_policy(folder, good_table())
    monkeypatch.chdir(tmp_path)
    policy = load_policy(Path("holder/policy.toml"))
    assert policy.ledger_dir == folder.resolve() / "ledger"
    absolute = good_table() | {"ledger_dir": str(tmp_path / "elsewhere")}
    assert load_policy(write_policy(folder, absolute)).ledger_dir == tmp_path / "elsewhere"


def test_defaults_for_optional_fields(tmp_path: Path) -> None:
    table = good_table()
    del table["min_batch_size"], table["allowed_batch_modes"]
    policy = load_policy(write_policy(tmp_path, table))
    assert policy.min_batch_size == 16
    assert policy.allowed_batch_modes == ("minibatch", "full", "poisson")


def test_error_message_has_the_documented_shape(tmp_path: Path) -> None:
    path = write_policy(tmp_path, good_table() | {"max_bits": -3})
    with pytest.raises(ConfigError) as caught:
        load_policy(path)
    assert str(caught.value) == f"{path}: max_bits: must be > 0 (got -3)"


def _without(key: str) -> dict[str, Any]:
    table = good_table()
    del table[key]
    return table


def _fitness(**changes: Any) -> dict[str, Any]:
    table = good_table()
    table["fitness"] = table["fitness"] | changes
    return table


BAD_TABLES: list[tuple[str, dict[str, Any], str]] = [
    ("max_bits string", good_table() | {"max_bits": "lots"}, "max_bits: must be a number"),
    ("max_bits bool", good_table() | {"max_bits": True}, "max_bits: must be a number"),
    ("max_bits inf", good_table() | {"max_bits": math.inf}, "max_bits: must be a finite"),
    ("max_bits zero", good_table() | {"max_bits": 0}, "max_bits: must be > 0"),
    ("max_bits missing", _without("max_bits"), "max_bits: is required"),
    ("unknown key", good_table() | {"max_bitz": 3}, "max_bitz: unknown key"),
    (
        "fingerprint format",
        good_table() | {"expected_model_fingerprint": "abc"},
        "expected_model_fingerprint: must be 'sha256:'",
    ),
    (
        "fingerprint upper case",
        good_table() | {"expected_model_fingerprint": "sha256:" + "AB" * 32},
        "expected_model_fingerprint: must be 'sha256:'",
    ),
    (
        "fingerprint missing",
        _without("expected_model_fingerprint"),
        "expected_model_fingerprint: is required",
    ),
    (
        "unknown algorithm",
        good_table() | {"allowed_algorithms": ["bboxer-1+1", "evil"]},
        "allowed_algorithms: unknown algorithm 'evil'",
    ),
    (
        "empty algorithms",
        good_table() | {"allowed_algorithms": []},
        "allowed_algorithms: must list at least one",
    ),
    (
        "algorithms not a list",
        good_table() | {"allowed_algorithms": "bboxer-1+1"},
        "allowed_algorithms: must be a list",
    ),
    (
        "unknown parametrization",
        good_table() | {"allowed_parametrizations": ["scale", "lora"]},
        "allowed_parametrizations[1]: must be one of",
    ),
    ("max_lambda zero", good_table() | {"max_lambda": 0}, "max_lambda: must be >= 1"),
    ("max_lambda float", good_table() | {"max_lambda": 2.5}, "max_lambda: must be an integer"),
    (
        "scale zero",
        good_table() | {"max_perturbation_scale": 0.0},
        "max_perturbation_scale: must be > 0",
    ),
    (
        "scale nan",
        good_table() | {"max_perturbation_scale": math.nan},
        "max_perturbation_scale: must be a finite",
    ),
    ("min batch zero", good_table() | {"min_batch_size": 0}, "min_batch_size: must be >= 1"),
    (
        "min batch string",
        good_table() | {"min_batch_size": "16"},
        "min_batch_size: must be an integer",
    ),
    (
        "batch mode",
        good_table() | {"allowed_batch_modes": ["streaming"]},
        "allowed_batch_modes[0]: must be one of",
    ),
    ("ledger_dir missing", _without("ledger_dir"), "ledger_dir: is required"),
    ("ledger_dir number", good_table() | {"ledger_dir": 3}, "ledger_dir: must be a path"),
    ("fitness missing", _without("fitness"), "fitness: is required"),
    ("fitness not a table", good_table() | {"fitness": "yes"}, "fitness: must be a table"),
    ("fitness kind", _fitness(kind="regression"), "fitness.kind: must be one of"),
    ("fitness unknown key", _fitness(secret_field="id"), "fitness.secret_field: unknown key"),
    (
        "one label word",
        _fitness(label_words=[" yes"]),
        "fitness.label_words: a classification needs",
    ),
    (
        "repeated label words",
        _fitness(label_words=[" yes", " yes"]),
        "fitness.label_words: a classification needs",
    ),
    (
        "template attribute access",
        _fitness(prompt_template="{text.__class__}"),
        "fitness.prompt_template: placeholder",
    ),
    (
        "template index access",
        _fitness(prompt_template="{text[0]} and more"),
        "fitness.prompt_template: placeholder",
    ),
    (
        "template syntax",
        _fitness(prompt_template="Review: {text"),
        "fitness.prompt_template: not a valid format string",
    ),
    ("empty text field", _fitness(text_field=""), "fitness.text_field: must not be empty"),
    ("text field number", _fitness(text_field=3), "fitness.text_field: must be a string"),
]


@pytest.mark.parametrize(
    ("table", "expected"), [case[1:] for case in BAD_TABLES], ids=[case[0] for case in BAD_TABLES]
)
def test_bad_field_is_a_config_error_naming_it(
    tmp_path: Path, table: dict[str, Any], expected: str
) -> None:
    path = write_policy(tmp_path, table)
    with pytest.raises(ConfigError) as caught:
        load_policy(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: "), message
    assert expected in message, message
    assert "\n" not in message


def test_several_problems_are_counted_in_one_line(tmp_path: Path) -> None:
    path = write_policy(tmp_path, good_table() | {"max_bits": -1, "max_lambda": 0})
    with pytest.raises(ConfigError, match=r"max_bits: must be > 0 .*; and 1 more problem"):
        load_policy(path)


def test_toml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text("max_bits = 2000\nmax_lambda = = 3\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"policy\.toml: TOML syntax error: .*line 2"):
        load_policy(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.toml: policy file not found"):
        load_policy(tmp_path / "nope.toml")


def test_policy_is_frozen() -> None:
    policy = make_policy()
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.max_bits = 1e9  # type: ignore[misc]


# -- check_run ---------------------------------------------------------------------------------
def test_good_runs_are_accepted() -> None:
    policy = make_policy()
    check_run(policy, make_spec(), FINGERPRINT)
    best_of = make_spec(algorithm="bboxer-1+lambda", answer_kind=AnswerKind.BEST_OF)
    check_run(policy, best_of, FINGERPRINT)
    check_run(policy, make_spec(batch=BatchSpec(mode="full", batch_size=0)), FINGERPRINT)
    check_run(policy, make_spec(batch=BatchSpec(mode="minibatch", batch_size=16)), FINGERPRINT)


BAD_RUNS: list[tuple[str, dict[str, Any], dict[str, Any], str, str]] = [
    # (id, policy changes, spec changes, local fingerprint, expected message part)
    (
        "local model differs from policy",
        {},
        {"model_fingerprint": OTHER_FINGERPRINT},
        OTHER_FINGERPRINT,
        "local model fingerprint sha256:cdcdcdcdcdcd... is not the policy's",
    ),
    (
        "run for another model",
        {},
        {"model_fingerprint": OTHER_FINGERPRINT},
        FINGERPRINT,
        "run is for model sha256:cdcdcdcdcdcd...; this holder has sha256:abababababab",
    ),
    (
        "algorithm not allowed",
        {"allowed_algorithms": ("bboxer-1+1",)},
        {"algorithm": "bboxer-1+lambda", "answer_kind": AnswerKind.BEST_OF},
        FINGERPRINT,
        "run wants algorithm 'bboxer-1+lambda'; policy allows ['bboxer-1+1']",
    ),
    (
        "unknown algorithm",
        {},
        {"algorithm": "exfiltrate"},
        FINGERPRINT,
        "run wants algorithm 'exfiltrate'; policy allows",
    ),
    (
        "answer kind not of the algorithm",
        {},
        {"answer_kind": AnswerKind.BEST_OF},
        FINGERPRINT,
        "run wants answer kind 'best-of' but algorithm 'bboxer-1+1' only asks for ['compare']",
    ),
    (
        "parametrization not allowed",
        {},
        {"parametrization": ParametrizationSpec(kind="full")},
        FINGERPRINT,
        "run wants parametrization 'full'; policy allows ['scale', 'select', 'subspace']",
    ),
    (
        "prompt template differs",
        {},
        {"fitness": FitnessSpec(prompt_template="Is {text} in your data?")},
        FINGERPRINT,
        "run fitness differs from the policy's pinned fitness in prompt_template",
    ),
    (
        "label words differ",
        {},
        {"fitness": FitnessSpec(label_words=(" no", " yes"))},
        FINGERPRINT,
        "pinned fitness in label_words: run has (' no', ' yes')",
    ),
    (
        "fields differ",
        {},
        {"fitness": FitnessSpec(text_field="name", label_field="income")},
        FINGERPRINT,
        "pinned fitness in text_field: run has 'name', policy pins 'text' (also: label_field)",
    ),
    (
        "target field differs",
        {},
        {"fitness": FitnessSpec(target_field="ssn")},
        FINGERPRINT,
        "pinned fitness in target_field",
    ),
    (
        "batch mode not allowed",
        {"allowed_batch_modes": ("minibatch",)},
        {"batch": BatchSpec(mode="full", batch_size=0)},
        FINGERPRINT,
        "run wants batch mode 'full'; policy allows ['minibatch']",
    ),
    (
        "minibatch too small",
        {},
        {"batch": BatchSpec(mode="minibatch", batch_size=4)},
        FINGERPRINT,
        "run wants minibatches of 4 examples; policy needs at least min_batch_size 16",
    ),
    (
        "run id with a newline",
        {},
        {"run_id": "run\nfake audit line"},
        FINGERPRINT,
        "run id 'run\\nfake audit line' must be 1-64 printable ASCII characters",
    ),
]


@pytest.mark.parametrize(
    ("policy_changes", "spec_changes", "local", "expected"),
    [case[1:] for case in BAD_RUNS],
    ids=[case[0] for case in BAD_RUNS],
)
def test_check_run_refuses(
    policy_changes: dict[str, Any], spec_changes: dict[str, Any], local: str, expected: str
) -> None:
    with pytest.raises(PolicyViolation) as caught:
        check_run(make_policy(**policy_changes), make_spec(**spec_changes), local)
    assert expected in str(caught.value)


# -- check_task --------------------------------------------------------------------------------
def test_good_tasks_are_accepted() -> None:
    policy = make_policy()
    spec = make_spec()
    check_task(policy, spec, make_task(spec), data_size=100, now=NOW)
    # Boundaries are allowed: |scale| == cap, lambda == max_lambda, batch == data size.
    check_task(
        policy, spec, make_task(spec, candidates=(Candidate(1, -0.5),)), data_size=32, now=NOW
    )
    best_of = make_spec(algorithm="bboxer-1+lambda", answer_kind=AnswerKind.BEST_OF)
    eight = tuple(Candidate(seed=i, scale=0.1) for i in range(8))
    check_task(policy, best_of, make_task(best_of, candidates=eight), data_size=100, now=NOW)
    check_task(policy, spec, make_task(spec, deadline_unix=NOW), data_size=100, now=NOW)


BEST_OF = make_spec(algorithm="bboxer-1+lambda", answer_kind=AnswerKind.BEST_OF)
COMPARE = make_spec()
FULL = make_spec(batch=BatchSpec(mode="full", batch_size=0))

BAD_TASKS: list[tuple[str, RunSpec, dict[str, Any], int, str]] = [
    # (id, run spec, task changes, data size, expected message part)
    (
        "other run",
        COMPARE,
        {"run_id": "run-2"},
        100,
        "task t-000001 is for run 'run-2'; this holder joined 'run-1'",
    ),
    (
        "too many candidates",
        BEST_OF,
        {"candidates": tuple(Candidate(seed=i, scale=0.1) for i in range(9))},
        100,
        "has 9 candidates; policy allows at most max_lambda 8",
    ),
    ("no candidates", BEST_OF, {"candidates": ()}, 100, "has no candidates"),
    (
        "scale too large",
        COMPARE,
        {"candidates": (Candidate(seed=1, scale=0.75),)},
        100,
        "candidate 0 has |scale| 0.75 > max_perturbation_scale 0.5",
    ),
    (
        "negative scale too large",
        BEST_OF,
        {"candidates": (Candidate(seed=1, scale=0.1), Candidate(seed=2, scale=-3.0))},
        100,
        "candidate 1 has |scale| 3 > max_perturbation_scale 0.5",
    ),
    (
        "scale nan",
        COMPARE,
        {"candidates": (Candidate(seed=1, scale=math.nan),)},
        100,
        "candidate 0 has scale nan: not finite",
    ),
    (
        "scale inf",
        COMPARE,
        {"candidates": (Candidate(seed=1, scale=-math.inf),)},
        100,
        "candidate 0 has scale -inf: not finite",
    ),
    (
        "seed not uint64",
        COMPARE,
        {"candidates": (Candidate(seed=-1, scale=0.1),)},
        100,
        "candidate 0 has seed -1: not a uint64",
    ),
    (
        "step too large",
        COMPARE,
        {"new_steps": (Step(1, 0.25), Step(2, -0.75))},
        100,
        "new step 1 has |coefficient| 0.75 > max_perturbation_scale 0.5",
    ),
    (
        "answer kind differs from run",
        COMPARE,
        {"answer_kind": AnswerKind.BEST_OF},
        100,
        "asks for answer kind 'best-of'; run 'run-1' uses 'compare'",
    ),
    (
        "batch differs from run",
        COMPARE,
        {"batch": BatchSpec(mode="minibatch", batch_size=64)},
        100,
        "has batch BatchSpec(mode='minibatch', batch_size=64); run 'run-1' uses",
    ),
    (
        "compare with two candidates",
        COMPARE,
        {"candidates": (Candidate(seed=1, scale=0.1), Candidate(seed=2, scale=0.1))},
        100,
        "is a compare task with 2 candidates (needs exactly 1)",
    ),
    (
        "minibatch larger than the data set",
        COMPARE,
        {},
        31,
        "wants minibatches of 32 examples; this data set has 31",
    ),
    (
        "full batch of a tiny data set",
        FULL,
        {},
        15,
        "wants the full data set, which has only 15 examples (< min_batch_size 16)",
    ),
    ("deadline passed", COMPARE, {"deadline_unix": NOW - 2.5}, 100, "deadline passed 2.5 s ago"),
    ("task id with spaces", COMPARE, {"task_id": "t 1"}, 100, "task id 't 1' must be 1-64"),
    ("task id too long", COMPARE, {"task_id": "t" * 65}, 100, "must be 1-64 printable ASCII"),
    ("empty task id", COMPARE, {"task_id": ""}, 100, "task id '' must be 1-64"),
]


@pytest.mark.parametrize(
    ("spec", "task_changes", "data_size", "expected"),
    [case[1:] for case in BAD_TASKS],
    ids=[case[0] for case in BAD_TASKS],
)
def test_check_task_refuses(
    spec: RunSpec, task_changes: dict[str, Any], data_size: int, expected: str
) -> None:
    task = make_task(spec, **task_changes)
    with pytest.raises(PolicyViolation) as caught:
        check_task(make_policy(), spec, task, data_size, now=NOW)
    assert expected in str(caught.value)


def test_check_task_rechecks_the_batch_against_the_policy() -> None:
    """A spec that never went through check_run still cannot ask for tiny minibatches."""
    spec = make_spec(batch=BatchSpec(mode="minibatch", batch_size=2))
    with pytest.raises(PolicyViolation, match="minibatches of 2 examples; policy needs"):
        check_task(make_policy(), spec, make_task(spec), data_size=100, now=NOW)


def test_deadline_defaults_to_the_wall_clock() -> None:
    spec = make_spec()
    with pytest.raises(PolicyViolation, match="deadline passed"):
        check_task(make_policy(), spec, make_task(spec, deadline_unix=1.0), data_size=100)


# -- summary -----------------------------------------------------------------------------------
def test_policy_summary_declares_caps_only() -> None:
    policy = make_policy()
    summary = policy_summary(policy)
    assert summary == {
        "expected_model_fingerprint": FINGERPRINT,
        "max_bits": "2000.0",
        "allowed_algorithms": "bboxer-1+1,bboxer-1+lambda",
        "allowed_parametrizations": "scale,select,subspace",
        "max_lambda": "8",
        "max_perturbation_scale": "0.5",
        "min_batch_size": "16",
        "allowed_batch_modes": "minibatch,full,poisson",
        "fitness_sha256": fitness_digest(FitnessSpec()),
        "max_epsilon": "None",
        "delta": "None",
        "require_dp": "false",
    }
    assert all(isinstance(value, str) for value in summary.values())
    other = make_policy(fitness=FitnessSpec(label_words=(" bad", " good")))
    assert policy_summary(other)["fitness_sha256"] != summary["fitness_sha256"]
