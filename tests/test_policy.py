"""The holder's policy: loading it strictly, and refusing every run or task outside it."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from sottovoce.client.policy import (
    HolderPolicy,
    check_run,
    check_steps,
    check_task,
    fitness_digest,
    load_policy,
    parametrizations_digest,
    policy_summary,
    policy_toml,
)
from sottovoce.common.directions import rademacher
from sottovoce.common.errors import ConfigError, PolicyViolation, RefusalCode
from sottovoce.common.parametrizations.base import ParametrizationSpec
from sottovoce.common.parametrizations.drift import DriftTracker
from sottovoce.common.protocol.answers import AnswerKind
from sottovoce.common.protocol.messages import BatchSpec, Candidate, FitnessSpec, RunSpec, Task
from sottovoce.common.protocol.seeds import SeedSchedule, candidate_seed
from sottovoce.common.steplog import Step

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "policy.toml"
FINGERPRINT = "sha256:" + "ab" * 32
OTHER_FINGERPRINT = "sha256:" + "cd" * 32
NOW = 1_700_000_000.0
DIRECTION_SEED = 99
NORM_SCALES = ParametrizationSpec(kind="scale", patterns=("model.norm.weight",))
NORMS = ParametrizationSpec(kind="select", patterns=("*norm*",))
SUBSPACE = ParametrizationSpec(kind="subspace", dimension=64, projection_seed=3)
PINNED = (NORM_SCALES, NORMS, SUBSPACE)


def seed(round_index: int, lane: int = 0) -> int:
    return candidate_seed(DIRECTION_SEED, round_index, lane)


def spec_table(spec: ParametrizationSpec) -> dict[str, Any]:
    table = dataclasses.asdict(spec)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in table.items() if v is not None}


# -- helpers -----------------------------------------------------------------------------------
def good_table() -> dict[str, Any]:
    return {
        "max_bits": 2000,
        "expected_model_fingerprint": FINGERPRINT,
        "allowed_algorithms": ["bboxer-1+1", "bboxer-1+lambda"],
        "parametrizations": [spec_table(spec) for spec in PINNED],
        "max_lambda": 8,
        "max_perturbation_scale": 0.5,
        "max_drift_linf": 1.0,
        "min_batch_size": 16,
        "min_examples": 100,
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
    return tomli_w.dumps(table)


def write_policy(folder: Path, table: dict[str, Any]) -> Path:
    path = folder / "policy.toml"
    path.write_text(to_toml(table), encoding="utf-8")
    return path


def make_policy(**changes: Any) -> HolderPolicy:
    base: dict[str, Any] = {
        "max_bits": 2000.0,
        "expected_model_fingerprint": FINGERPRINT,
        "allowed_algorithms": ("bboxer-1+1", "bboxer-1+lambda"),
        "parametrizations": PINNED,
        "max_lambda": 8,
        "max_perturbation_scale": 0.5,
        "max_drift_linf": 1.0,
        "min_examples": 100,
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
        "parametrization": NORM_SCALES,
        "fitness": FitnessSpec(),
        "batch": BatchSpec(mode="minibatch", batch_size=32),
        "answer_kind": AnswerKind.COMPARE,
        "bit_budget": 300.0,
        "max_rounds": 100,
        "log_genesis": "00" * 32,
        "direction_seed": DIRECTION_SEED,
    }
    base.update(changes)
    return RunSpec(**base)


def make_task(spec: RunSpec, **changes: Any) -> Task:
    base: dict[str, Any] = {
        "task_id": "t-000001",
        "run_id": spec.run_id,
        "round_index": 1,
        "base_version": 0,
        "new_steps": (Step(seed=seed(0), coefficient=0.25),),
        "log_head": "11" * 32,
        "candidates": (Candidate(seed=seed(1), scale=0.5),),
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
    assert policy.parametrizations == (
        ParametrizationSpec(kind="scale", patterns=("model.norm.weight",), granularity="channel"),
    )
    assert policy.max_drift_linf == 0.5
    assert policy.min_examples == 500
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
        "allowed_algorithms[1]: must be one of 'bboxer-1+1', 'bboxer-1+lambda', 'dpzero', "
        "'cma-es', 'cma-diagonal' or 'es-mu-lambda'",
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
        good_table() | {"parametrizations": [{"kind": "scale"}, {"kind": "adapter"}]},
        "parametrizations[1].kind: must be one of",
    ),
    (
        "parametrization unknown key",
        good_table() | {"parametrizations": [{"kind": "scale", "rows": [3]}]},
        "parametrizations[0].rows: unknown key (known: kind, patterns",
    ),
    (
        "no parametrization",
        good_table() | {"parametrizations": []},
        "parametrizations: must list at least one",
    ),
    (
        "retired kinds list",
        good_table() | {"allowed_parametrizations": ["scale"]},
        "allowed_parametrizations: replaced by [[parametrizations]] tables",
    ),
    (
        "huge subspace",
        good_table() | {"parametrizations": [{"kind": "subspace", "dimension": 2**40}]},
        "parametrizations[0].dimension: a subspace needs 1..16777216",
    ),
    ("drift cap missing", _without("max_drift_linf"), "max_drift_linf: is required"),
    ("drift cap zero", good_table() | {"max_drift_linf": 0.0}, "max_drift_linf: must be > 0"),
    ("min_examples missing", _without("min_examples"), "min_examples: is required"),
    (
        "min_examples below a batch",
        good_table() | {"min_examples": 8},
        "min_examples: 8 is below min_batch_size 16",
    ),
    (
        "unknown mechanism",
        good_table() | {"answer_mechanisms": ["plain", "telepathy"]},
        "answer_mechanisms[1]: must be one of",
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
    for pinned in PINNED:
        check_run(policy, make_spec(parametrization=pinned), FINGERPRINT)


EMBEDDING_SCALES = ParametrizationSpec(
    kind="scale", patterns=("model.embed_tokens.weight",), granularity="channel"
)
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
        "run wants answer kind 'best-of' but algorithm 'bboxer-1+1' only asks for 'compare'",
    ),
    (
        "parametrization kind not pinned",
        {},
        {"parametrization": ParametrizationSpec(kind="full")},
        FINGERPRINT,
        "run's parametrization is not one the policy pins: closest differs in kind",
    ),
    (
        # The isolation attack's first move: per-token scales of the embedding, where a
        # direction can touch what only one record's tokens use.
        "same kind, other tensors",
        {},
        {"parametrization": EMBEDDING_SCALES},
        FINGERPRINT,
        "closest differs in patterns: run has ('model.embed_tokens.weight',)",
    ),
    (
        "same kind, other granularity",
        {},
        {"parametrization": dataclasses.replace(NORM_SCALES, granularity="tensor")},
        FINGERPRINT,
        "closest differs in granularity",
    ),
    (
        "same kind, last blocks added",
        {},
        {"parametrization": dataclasses.replace(NORMS, last_k_blocks=1)},
        FINGERPRINT,
        "closest differs in last_k_blocks",
    ),
    (
        "subspace of another dimension",
        {},
        {"parametrization": dataclasses.replace(SUBSPACE, dimension=2**40)},
        FINGERPRINT,
        "closest differs in dimension",
    ),
    (
        "subspace with another projection",
        {},
        {"parametrization": dataclasses.replace(SUBSPACE, projection_seed=4)},
        FINGERPRINT,
        "closest differs in projection_seed",
    ),
    (
        "too many rounds",
        {"max_rounds_per_run": 50},
        {},
        FINGERPRINT,
        "run wants 100 rounds; policy allows max_rounds_per_run 50",
    ),
    (
        "plain answers refused",
        {"answer_mechanisms": ("randomized-response", "dp-scalar")},
        {},
        FINGERPRINT,
        "run's answers would be 'plain'; policy allows ['randomized-response', 'dp-scalar']",
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
        # Compared with the declared floor, never the real size: a free refusal must not
        # tell the coordinator how many records there are.
        "minibatch above the declared size",
        {},
        {"batch": BatchSpec(mode="minibatch", batch_size=101)},
        FINGERPRINT,
        "wants minibatches of 101 examples; the policy declares min_examples 100",
    ),
    (
        "run id with a newline",
        {},
        {"run_id": "run\nfake audit line"},
        FINGERPRINT,
        "run id 'run\\nfake audit line' must be 1-64 characters of [A-Za-z0-9._:-]",
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


def test_require_dp_allows_only_private_mechanisms() -> None:
    policy = make_policy(max_epsilon=4.0, delta=1e-6, require_dp=True)
    assert not policy.allows_mechanism("plain")
    assert policy.allows_mechanism("randomized-response")
    with pytest.raises(PolicyViolation, match="requires DP answers"):
        check_run(policy, make_spec(), FINGERPRINT)


# -- check_task --------------------------------------------------------------------------------
def schedule(lanes: int = 8) -> SeedSchedule:
    return SeedSchedule(DIRECTION_SEED, lanes)


def check(spec: RunSpec, task: Task, **policy_changes: Any) -> None:
    check_task(make_policy(**policy_changes), spec, task, schedule(), now=NOW)


def test_good_tasks_are_accepted() -> None:
    spec = make_spec()
    check(spec, make_task(spec))
    # Boundaries are allowed: |scale| == cap, lambda == max_lambda, the deadline itself.
    check(spec, make_task(spec, candidates=(Candidate(seed(1), -0.5),)))
    best_of = make_spec(algorithm="bboxer-1+lambda", answer_kind=AnswerKind.BEST_OF)
    eight = tuple(Candidate(seed=seed(1, i), scale=0.1) for i in range(8))
    check(best_of, make_task(best_of, candidates=eight))
    mirrored = (Candidate(seed(1, 0), 0.1), Candidate(seed(1, 0), -0.1))
    check(best_of, make_task(best_of, candidates=mirrored))
    check(spec, make_task(spec, deadline_unix=NOW))


BEST_OF = make_spec(algorithm="bboxer-1+lambda", answer_kind=AnswerKind.BEST_OF)
COMPARE = make_spec()

BAD_TASKS: list[tuple[str, RunSpec, dict[str, Any], str, RefusalCode]] = [
    # (id, run spec, task changes, expected message part, reason code)
    (
        "other run",
        COMPARE,
        {"run_id": "run-2"},
        "task t-000001 is for run 'run-2'; this holder joined 'run-1'",
        RefusalCode.MALFORMED,
    ),
    (
        "too many candidates",
        BEST_OF,
        {"candidates": tuple(Candidate(seed=seed(1, i), scale=0.1) for i in range(9))},
        "has 9 candidates; policy allows at most max_lambda 8",
        RefusalCode.POLICY,
    ),
    ("no candidates", BEST_OF, {"candidates": ()}, "has no candidates", RefusalCode.MALFORMED),
    (
        "scale too large",
        COMPARE,
        {"candidates": (Candidate(seed=seed(1), scale=0.75),)},
        "candidate 0 has |scale| 0.75 > max_perturbation_scale 0.5",
        RefusalCode.POLICY,
    ),
    (
        "negative scale too large",
        BEST_OF,
        {"candidates": (Candidate(seed=seed(1, 0), scale=0.1), Candidate(seed(1, 1), -3.0))},
        "candidate 1 has |scale| 3 > max_perturbation_scale 0.5",
        RefusalCode.POLICY,
    ),
    (
        "scale nan",
        COMPARE,
        {"candidates": (Candidate(seed=seed(1), scale=math.nan),)},
        "candidate 0 has scale nan: not finite",
        RefusalCode.MALFORMED,
    ),
    (
        "scale inf",
        COMPARE,
        {"candidates": (Candidate(seed=seed(1), scale=-math.inf),)},
        "candidate 0 has scale -inf: not finite",
        RefusalCode.MALFORMED,
    ),
    (
        "seed not uint64",
        COMPARE,
        {"candidates": (Candidate(seed=-1, scale=0.1),)},
        "candidate 0 has seed -1: not a uint64",
        RefusalCode.MALFORMED,
    ),
    (
        # A ground seed: the coordinator searched for a direction it likes.
        "seed off the schedule",
        COMPARE,
        {"candidates": (Candidate(seed=123456789, scale=0.1),)},
        "candidate 0 has seed 123456789, which is not on the run's seed schedule for round 1",
        RefusalCode.POLICY,
    ),
    (
        "seed of another round",
        COMPARE,
        {"candidates": (Candidate(seed=seed(2), scale=0.1),)},
        "not on the run's seed schedule for round 1",
        RefusalCode.POLICY,
    ),
    (
        "seed of a lane past max_lambda",
        COMPARE,
        {"candidates": (Candidate(seed=seed(1, 8), scale=0.1),)},
        "not on the run's seed schedule for round 1 (lanes 0..7)",
        RefusalCode.POLICY,
    ),
    (
        "one seed asked three times",
        BEST_OF,
        {
            "candidates": (
                Candidate(seed(1), 0.1),
                Candidate(seed(1), -0.1),
                Candidate(seed(1), 0.2),
            )
        },
        "uses seed",
        RefusalCode.POLICY,
    ),
    (
        "a seed twice, not mirrored",
        BEST_OF,
        {"candidates": (Candidate(seed(1), 0.1), Candidate(seed(1), 0.2))},
        "a seed may appear once, or twice as a mirrored pair",
        RefusalCode.POLICY,
    ),
    (
        "too many new steps",
        COMPARE,
        {"new_steps": tuple(Step(seed(i), 0.125) for i in range(3))},
        "carries 3 new steps; policy allows max_new_steps_per_task 2",
        RefusalCode.POLICY,
    ),
    (
        "log past the run's steps",
        COMPARE,
        {"base_version": 5},
        "brings the log to 6 steps; policy allows max_steps_per_run 5",
        RefusalCode.POLICY,
    ),
    (
        "round past the run",
        COMPARE,
        {"round_index": 100},
        "is round 100 of a run of 100 rounds",
        RefusalCode.MALFORMED,
    ),
    (
        "answer kind differs from run",
        COMPARE,
        {"answer_kind": AnswerKind.BEST_OF},
        "asks for answer kind 'best-of'; run 'run-1' uses 'compare'",
        RefusalCode.MALFORMED,
    ),
    (
        "batch differs from run",
        COMPARE,
        {"batch": BatchSpec(mode="minibatch", batch_size=64)},
        "has batch BatchSpec(mode='minibatch', batch_size=64); run 'run-1' uses",
        RefusalCode.MALFORMED,
    ),
    (
        "compare with two candidates",
        COMPARE,
        {"candidates": (Candidate(seed=seed(1, 0), scale=0.1), Candidate(seed(1, 1), 0.1))},
        "is a compare task with 2 candidates (needs exactly 1)",
        RefusalCode.MALFORMED,
    ),
    (
        "deadline passed",
        COMPARE,
        {"deadline_unix": NOW - 2.5},
        "deadline passed 2.5 s ago",
        RefusalCode.EXPIRED,
    ),
    (
        "task id with spaces",
        COMPARE,
        {"task_id": "t 1"},
        "task id 't 1' must be 1-64",
        RefusalCode.POLICY,
    ),
    (
        "task id too long",
        COMPARE,
        {"task_id": "t" * 65},
        "must be 1-64 characters of [A-Za-z0-9._:-]",
        RefusalCode.POLICY,
    ),
    ("empty task id", COMPARE, {"task_id": ""}, "task id '' must be 1-64", RefusalCode.POLICY),
]


@pytest.mark.parametrize(
    ("spec", "task_changes", "expected", "code"),
    [case[1:] for case in BAD_TASKS],
    ids=[case[0] for case in BAD_TASKS],
)
def test_check_task_refuses(
    spec: RunSpec, task_changes: dict[str, Any], expected: str, code: RefusalCode
) -> None:
    task = make_task(spec, **task_changes)
    with pytest.raises(PolicyViolation) as caught:
        check(spec, task, max_new_steps_per_task=2, max_steps_per_run=5)
    assert expected in str(caught.value)
    assert caught.value.code is code


def test_check_task_rechecks_the_batch_against_the_policy() -> None:
    """A spec that never went through check_run still cannot ask for tiny minibatches."""
    spec = make_spec(batch=BatchSpec(mode="minibatch", batch_size=2))
    with pytest.raises(PolicyViolation, match="minibatches of 2 examples; policy needs"):
        check(spec, make_task(spec))


def test_deadline_defaults_to_the_wall_clock() -> None:
    spec = make_spec()
    with pytest.raises(PolicyViolation, match="deadline passed"):
        check_task(make_policy(), spec, make_task(spec, deadline_unix=1.0), schedule())


# -- check_steps: the log's seeds and the total drift -------------------------------------------
NORM_BLOCKS = [(0, 64)]  # 64 log-scales: what the drift tracker replays


def steps_check(
    steps: list[Step], *, last_round: int = -1, before_round: int = 50, **policy: Any
) -> tuple[list[int], DriftTracker]:
    tracker = DriftTracker(NORM_BLOCKS)
    rounds, pending = check_steps(
        make_policy(**policy),
        steps,
        schedule(),
        last_round=last_round,
        before_round=before_round,
        drift=tracker,
        name="task t",
    )
    tracker.commit(pending)
    return rounds, tracker


def test_steps_on_the_schedule_are_accepted_with_their_rounds() -> None:
    steps = [Step(seed(0, 3), 0.125), Step(seed(4, 0), -0.125), Step(seed(9, 7), 0.25)]
    rounds, tracker = steps_check(steps)
    assert rounds == [0, 4, 9]
    x = sum(step.coefficient * rademacher(step.seed, 0, 64).double() for step in steps)
    drift = tracker.drift
    assert drift.exact and drift.steps == 3
    assert drift.linf == float(x.abs().max()) and drift.l2 == pytest.approx(float(x.norm()))


def test_a_model_too_large_to_track_is_bounded_by_the_sum_of_coefficients() -> None:
    tracker = DriftTracker([(0, 10), (1, 20)], explicit_limit=16)
    tracker.commit(tracker.preview([Step(seed(0), 0.25), Step(seed(1), -0.125)]))
    assert not tracker.drift.exact
    assert tracker.drift.linf == 0.375 and tracker.drift.l2 == pytest.approx(0.375 * 30**0.5)


BAD_STEPS: list[tuple[str, list[Step], dict[str, Any], str]] = [
    (
        "coefficient above the cap",
        [Step(seed(0), 0.25), Step(seed(1), -0.75)],
        {},
        "new step 1 has |coefficient| 0.75 > max_perturbation_scale 0.5",
    ),
    (
        "a ground seed",
        [Step(424242, 0.125)],
        {},
        "new step 0 has seed 424242, which is not a candidate of any round 0..49",
    ),
    (
        "a round twice",
        [Step(seed(3, 0), 0.125), Step(seed(3, 1), 0.125)],
        {},
        "new step 1 has seed",
    ),
    (
        "rounds out of order",
        [Step(seed(5), 0.125), Step(seed(2), 0.125)],
        {},
        "not a candidate of any round 6..49",
    ),
    (
        "a step from a round not yet asked",
        [Step(seed(50), 0.125)],
        {},
        "not a candidate of any round 0..49",
    ),
    (
        # Many small steps, each under the per-step cap, add up past the total cap.
        "small steps add up",
        [Step(seed(r, 0), 0.25) for r in range(40)],
        {},
        "policy allows max_drift_linf 1",
    ),
    (
        "L2 cap",
        [Step(seed(0), 0.5)],
        {"max_drift_l2": 1.0},  # one step of 0.5 on 64 coordinates: L2 = 4
        "in L2 norm; policy allows max_drift_l2 1",
    ),
]


@pytest.mark.parametrize(
    ("steps", "policy", "expected"),
    [case[1:] for case in BAD_STEPS],
    ids=[case[0] for case in BAD_STEPS],
)
def test_check_steps_refuses(steps: list[Step], policy: dict[str, Any], expected: str) -> None:
    with pytest.raises(PolicyViolation) as caught:
        steps_check(steps, **policy)
    assert expected in str(caught.value)


def test_the_steps_before_a_task_are_checked_from_the_last_round_on() -> None:
    with pytest.raises(PolicyViolation, match=r"not a candidate of any round 4\.\.49"):
        steps_check([Step(seed(2), 0.125)], last_round=3)
    rounds, _ = steps_check([Step(seed(4), 0.125)], last_round=3)
    assert rounds == [4]


# -- summary and writing -------------------------------------------------------------------------
def test_policy_summary_declares_caps_only() -> None:
    policy = make_policy()
    summary = policy_summary(policy)
    assert summary == {
        "expected_model_fingerprint": FINGERPRINT,
        "max_bits": "2000.0",
        "allowed_algorithms": "bboxer-1+1,bboxer-1+lambda",
        "parametrizations_sha256": parametrizations_digest(PINNED),
        "max_lambda": "8",
        "max_perturbation_scale": "0.5",
        "max_drift_linf": "1.0",
        "max_drift_l2": "None",
        "max_new_steps_per_task": "1000",
        "max_steps_per_run": "10000",
        "max_rounds_per_run": "10000",
        "answer_mechanisms": "plain,randomized-response,dp-scalar,chunk-vote",
        "min_batch_size": "16",
        "min_examples": "100",
        "allowed_batch_modes": "minibatch,full,poisson",
        "fitness_sha256": fitness_digest(FitnessSpec()),
        "max_epsilon": "None",
        "delta": "None",
        "require_dp": "false",
        "min_chunks": "1",
        "max_answer_epsilon": "None",
    }
    assert all(isinstance(value, str) for value in summary.values())
    other = make_policy(fitness=FitnessSpec(label_words=(" bad", " good")))
    assert policy_summary(other)["fitness_sha256"] != summary["fitness_sha256"]
    assert parametrizations_digest(PINNED[::-1]) == summary["parametrizations_sha256"]


def test_a_written_policy_reads_back_equal(tmp_path: Path) -> None:
    policy = make_policy(
        ledger_dir=tmp_path / "ledger", max_drift_l2=3.0, max_epsilon=2.0, delta=1e-6
    )
    path = tmp_path / "policy.toml"
    path.write_text(policy_toml(policy, header="written by a test\nsecond line"), encoding="utf-8")
    assert path.read_text().startswith("# written by a test\n# second line\n")
    assert load_policy(path) == policy
