"""The data holder's policy: what it agrees to answer, checked before any data is touched.

The holder is the trust anchor of its own privacy (DESIGN.md §1): it trusts nobody, so a
coordinator, even a malicious one, may send any run spec and any task. Everything a
question can be bent with is pinned or bounded here: the base model (by fingerprint), the
algorithm and hence the answer kinds, the parametrization kinds, the perturbation sizes,
the minibatch size, and the fitness itself (prompt template, label words, data fields), so
a coordinator cannot craft a question such as "is record X present?".

``check_run`` runs once when the holder joins, ``check_task`` on every task; both raise
:class:`PolicyViolation` with one line naming what is refused and why. The lifetime bit
and (ε, δ) budgets are not here: they are the ledger's job (``client/ledger.py``), and the
log chain check and "can my remaining ε afford this run's noise?" are the holder core's.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import string
import time
import tomllib
from dataclasses import asdict, fields
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import ConfigDict, Field, TypeAdapter, ValidationError, field_validator
from pydantic.dataclasses import dataclass
from pydantic_core import ErrorDetails

from sottovoce.client.ledger import PrivacyLimit
from sottovoce.common.errors import ConfigError, PolicyViolation
from sottovoce.common.messages import (
    MAX_TASK_ID_LENGTH,
    AnswerKind,
    BatchSpec,
    FitnessSpec,
    RunSpec,
    Task,
)
from sottovoce.common.parametrizations.base import ParametrizationKind
from sottovoce.common.steplog import UINT64_MAX

# The holder's own view of which answer kinds each algorithm asks for. It is deliberately
# not imported from the coordinator's code: what an algorithm may ask is part of what the
# holder agrees to, and a holder only allows an algorithm it knows.
ALGORITHM_ANSWER_KINDS: dict[str, frozenset[AnswerKind]] = {
    "bboxer-1+1": frozenset({AnswerKind.COMPARE}),
    "bboxer-1+lambda": frozenset({AnswerKind.BEST_OF}),
    "dpzero": frozenset({AnswerKind.DP_SCALAR}),
}
PARAMETRIZATION_KINDS: tuple[str, ...] = get_args(ParametrizationKind)
BatchMode = Literal["minibatch", "full", "poisson"]

_FINGERPRINT = re.compile(r"sha256:[0-9a-f]{64}")
# Ids end up in the ledger and in the operator's audit lines: printable ASCII, no spaces.
_PRINTABLE_ID = re.compile(r"[\x21-\x7e]+")

_StrictFloat = Annotated[float, Field(strict=True, allow_inf_nan=False)]
_StrictInt = Annotated[int, Field(strict=True)]


@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class HolderPolicy:
    """What one data holder agrees to answer, for one data set, over its whole lifetime.

    Build it from a TOML file with :func:`load_policy`; constructing it directly validates
    the same way (a pydantic ``ValidationError`` instead of a one-line ``ConfigError``).
    """

    max_bits: Annotated[_StrictFloat, Field(gt=0)]
    expected_model_fingerprint: str
    allowed_algorithms: tuple[str, ...]
    allowed_parametrizations: tuple[ParametrizationKind, ...]
    max_lambda: Annotated[_StrictInt, Field(ge=1)]
    max_perturbation_scale: Annotated[_StrictFloat, Field(gt=0)]
    fitness: FitnessSpec
    ledger_dir: Path
    min_batch_size: Annotated[_StrictInt, Field(ge=1)] = 16
    allowed_batch_modes: tuple[BatchMode, ...] = ("minibatch", "full", "poisson")
    max_epsilon: Annotated[_StrictFloat, Field(gt=0)] | None = None
    delta: Annotated[_StrictFloat, Field(gt=0, lt=1)] | None = None
    require_dp: bool = False

    def privacy_limit(self) -> PrivacyLimit | None:
        """The ledger's (ε, δ) limit, or None when the policy sets no max_epsilon."""
        if self.max_epsilon is None or self.delta is None:
            return None
        return PrivacyLimit(self.max_epsilon, self.delta, self.require_dp)

    def __post_init__(self) -> None:
        if (self.max_epsilon is None) != (self.delta is None):
            raise ValueError(
                "max_epsilon: set it together with delta (an epsilon means nothing without "
                "its delta), or neither"
            )
        if self.require_dp and self.max_epsilon is None:
            raise ValueError("require_dp: needs max_epsilon and delta")

    @field_validator("expected_model_fingerprint")
    @classmethod
    def _fingerprint_format(cls, value: str) -> str:
        if not _FINGERPRINT.fullmatch(value):
            raise ValueError("must be 'sha256:' followed by 64 lowercase hex digits")
        return value

    @field_validator("allowed_algorithms")
    @classmethod
    def _known_algorithms(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [name for name in value if name not in ALGORITHM_ANSWER_KINDS]
        if unknown:
            raise ValueError(
                f"unknown algorithm {unknown[0]!r} (known: {sorted(ALGORITHM_ANSWER_KINDS)})"
            )
        return value

    @field_validator("allowed_algorithms", "allowed_parametrizations", "allowed_batch_modes")
    @classmethod
    def _not_empty(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("must list at least one entry (an empty list allows nothing)")
        return value

    @field_validator("fitness")
    @classmethod
    def _sound_fitness(cls, value: FitnessSpec) -> FitnessSpec:
        _check_template(value.prompt_template)
        if value.kind == "classification":
            words = value.label_words
            if len(words) < 2 or len(set(words)) != len(words) or not all(words):
                raise ValueError(
                    "label_words: a classification needs >= 2 distinct, non-empty words"
                )
        for name in ("text_field", "label_field", "target_field"):
            if not getattr(value, name):
                raise ValueError(f"{name}: must not be empty")
        return value


def _check_template(template: str) -> None:
    """Only plain ``{field}`` placeholders: no attribute or index access, no conversions.

    ``{text.__class__}`` or ``{text[3]}`` would let a template compute on the record instead
    of quoting it; pinning the template only means something if it can do nothing else.
    """
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"prompt_template: not a valid format string ({exc})") from exc
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            raise ValueError(
                f"prompt_template: placeholder {{{name}}} must be a plain {{field_name}}"
            )


# -- loading ---------------------------------------------------------------------------------
_POLICY_ADAPTER = TypeAdapter(HolderPolicy)
_POLICY_KEYS = tuple(f.name for f in fields(HolderPolicy))
_FITNESS_KEYS = tuple(f.name for f in fields(FitnessSpec))


def load_policy(path: Path) -> HolderPolicy:
    """Read and validate a policy TOML file; any problem is one ``ConfigError`` line.

    A relative ``ledger_dir`` is resolved against the policy file's folder, so the budget
    stays where the policy is, whatever the working directory of the holder process.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: policy file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read policy file: {exc}") from exc
    try:
        table: dict[str, Any] = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: TOML syntax error: {exc}") from exc
    ledger_dir = table.get("ledger_dir")
    if isinstance(ledger_dir, str) and ledger_dir and not Path(ledger_dir).is_absolute():
        table["ledger_dir"] = str(path.resolve().parent / ledger_dir)
    try:
        return _POLICY_ADAPTER.validate_python(table)
    except ValidationError as exc:
        errors = exc.errors()
        more = f"; and {len(errors) - 1} more problem(s)" if len(errors) > 1 else ""
        raise ConfigError(f"{path}: {_describe(errors[0])}{more}") from None


def _describe(error: ErrorDetails) -> str:
    """One pydantic error as ``field: what is wrong (got value)``."""
    field = _field_name(error["loc"])
    kind, ctx, value = error["type"], error.get("ctx", {}), error.get("input")
    if kind in ("missing", "missing_argument"):
        return f"{field}: is required"
    if kind in ("extra_forbidden", "unexpected_keyword_argument"):
        known = _FITNESS_KEYS if field.startswith("fitness.") else _POLICY_KEYS
        return f"{field}: unknown key (known: {', '.join(known)})"
    messages = {
        "greater_than": f"must be > {_bound(ctx.get('gt'))}",
        "greater_than_equal": f"must be >= {_bound(ctx.get('ge'))}",
        "finite_number": "must be a finite number",
        "float_type": "must be a number",
        "int_type": "must be an integer",
        "string_type": "must be a string",
        "tuple_type": "must be a list",
        "literal_error": f"must be one of {ctx.get('expected')}",
        "dataclass_type": "must be a table",
        "path_type": "must be a path string",
    }
    if kind in messages:
        return f"{field}: {messages[kind]} (got {value!r})"
    message = error["msg"].removeprefix("Value error, ")
    if kind == "value_error" and ": " in message and message.split(": ")[0].isidentifier():
        # A validator that names a sub-field (e.g. fitness's label_words) names it first.
        sub, message = message.split(": ", 1)
        return f"{sub if field == '(top level)' else f'{field}.{sub}'}: {message}"
    got = "" if "(" in message else f" (got {_clip(value)})"  # some name the bad entry already
    return f"{field}: {message}{got}"


def _bound(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _field_name(loc: tuple[int | str, ...]) -> str:
    name = ""
    for part in loc:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name or "(top level)"


# -- checks ----------------------------------------------------------------------------------
def check_run(policy: HolderPolicy, spec: RunSpec, local_fingerprint: str) -> None:
    """Refuse to join a run that the policy does not allow (raises ``PolicyViolation``)."""
    if local_fingerprint != policy.expected_model_fingerprint:
        raise PolicyViolation(
            f"local model fingerprint {_short(local_fingerprint)} is not the policy's "
            f"expected_model_fingerprint {_short(policy.expected_model_fingerprint)}"
        )
    if spec.model_fingerprint != local_fingerprint:
        raise PolicyViolation(
            f"run is for model {_short(spec.model_fingerprint)}; this holder has "
            f"{_short(local_fingerprint)}"
        )
    _check_id("run id", spec.run_id)
    if spec.algorithm not in policy.allowed_algorithms:
        raise PolicyViolation(
            f"run wants algorithm {spec.algorithm!r}; "
            f"policy allows {list(policy.allowed_algorithms)}"
        )
    kinds = ALGORITHM_ANSWER_KINDS[spec.algorithm]
    if spec.answer_kind not in kinds:
        raise PolicyViolation(
            f"run wants answer kind {_kind(spec.answer_kind)!r} but algorithm {spec.algorithm!r} "
            f"only asks for {sorted(k.value for k in kinds)}"
        )
    if spec.parametrization.kind not in policy.allowed_parametrizations:
        raise PolicyViolation(
            f"run wants parametrization {spec.parametrization.kind!r}; "
            f"policy allows {list(policy.allowed_parametrizations)}"
        )
    _check_fitness(policy.fitness, spec.fitness)
    _check_batch_policy(policy, spec.batch, "run")
    _check_dp_shape(policy, spec)


def _check_dp_shape(policy: HolderPolicy, spec: RunSpec) -> None:
    """The DP fields must fit the algorithm; the ε budget itself is checked by the holder."""
    dp = spec.dp
    if spec.answer_kind is AnswerKind.DP_SCALAR:
        if spec.batch.mode != "poisson":
            raise PolicyViolation(
                f"run wants dp-scalar answers on {spec.batch.mode!r} batches; DP accounting "
                "here assumes Poisson subsampling (batch mode 'poisson')"
            )
        if dp.randomized_response_epsilon:
            raise PolicyViolation("run mixes randomized response into dp-scalar answers")
        if policy.require_dp and dp.noise_multiplier <= 0:
            raise PolicyViolation("policy requires DP answers; this DPZero run adds no noise")
        return
    if dp.noise_multiplier or dp.quantization_bits:
        raise PolicyViolation(
            f"run sets DPZero noise or quantization on {_kind(spec.answer_kind)!r}"
        )
    if policy.require_dp and dp.randomized_response_epsilon <= 0:
        raise PolicyViolation(
            "policy requires DP answers; this run's choices have no randomized response"
        )


def _check_batch_policy(policy: HolderPolicy, batch: BatchSpec, who: str) -> None:
    if batch.mode not in policy.allowed_batch_modes:
        raise PolicyViolation(
            f"{who} wants batch mode {batch.mode!r}; "
            f"policy allows {list(policy.allowed_batch_modes)}"
        )
    if batch.mode != "full" and batch.batch_size < policy.min_batch_size:
        raise PolicyViolation(
            f"{who} wants {_batches(batch)}; "
            f"policy needs at least min_batch_size {policy.min_batch_size}"
        )


def _batches(batch: BatchSpec) -> str:
    if batch.mode == "poisson":
        return f"Poisson batches of {batch.batch_size} examples on average"
    return f"minibatches of {batch.batch_size} examples"


def _check_fitness(pinned: FitnessSpec, asked: FitnessSpec) -> None:
    differing = [
        f.name for f in fields(FitnessSpec) if getattr(pinned, f.name) != getattr(asked, f.name)
    ]
    if differing:
        first = differing[0]
        others = f" (also: {', '.join(differing[1:])})" if differing[1:] else ""
        raise PolicyViolation(
            f"run fitness differs from the policy's pinned fitness in {first}: run has "
            f"{_clip(getattr(asked, first))}, policy pins {_clip(getattr(pinned, first))}{others}"
        )


def check_task(
    policy: HolderPolicy,
    spec: RunSpec,
    task: Task,
    data_size: int,
    *,
    now: float | None = None,
) -> None:
    """Refuse a task the policy does not allow (raises ``PolicyViolation``).

    ``spec`` is the run spec already accepted by :func:`check_run`; the task must match it.
    ``data_size`` is the number of training examples this holder has. ``now`` defaults to
    the wall clock (a parameter so tests need not sleep).
    """
    _check_id("task id", task.task_id)
    name = f"task {task.task_id}"
    if task.run_id != spec.run_id:
        raise PolicyViolation(
            f"{name} is for run {task.run_id!r}; this holder joined {spec.run_id!r}"
        )
    if task.answer_kind != spec.answer_kind:
        raise PolicyViolation(
            f"{name} asks for answer kind {_kind(task.answer_kind)!r}; "
            f"run {spec.run_id!r} uses {_kind(spec.answer_kind)!r}"
        )
    if task.batch != spec.batch:
        raise PolicyViolation(
            f"{name} has batch {task.batch}; run {spec.run_id!r} uses {spec.batch}"
        )
    _check_batch_policy(policy, task.batch, name)  # again: do not rely on check_run's caller
    _check_candidates(policy, task, name)
    for index, step in enumerate(task.new_steps):
        if not abs(step.coefficient) <= policy.max_perturbation_scale:
            raise PolicyViolation(
                f"{name} new step {index} has |coefficient| {abs(step.coefficient):g} > "
                f"max_perturbation_scale {policy.max_perturbation_scale:g}"
            )
    _check_batch_size(policy, task, data_size, name)
    clock = time.time() if now is None else now
    if clock > task.deadline_unix:
        raise PolicyViolation(f"{name} deadline passed {clock - task.deadline_unix:.1f} s ago")


def _check_candidates(policy: HolderPolicy, task: Task, name: str) -> None:
    count = len(task.candidates)
    if count == 0:
        raise PolicyViolation(f"{name} has no candidates")
    if count > policy.max_lambda:
        raise PolicyViolation(
            f"{name} has {count} candidates; policy allows at most max_lambda {policy.max_lambda}"
        )
    if task.answer_kind in (AnswerKind.COMPARE, AnswerKind.DP_SCALAR) and count != 1:
        raise PolicyViolation(
            f"{name} is a {_kind(task.answer_kind)} task with {count} candidates (needs exactly 1)"
        )
    for index, candidate in enumerate(task.candidates):
        if not (isinstance(candidate.seed, int) and 0 <= candidate.seed <= UINT64_MAX):
            raise PolicyViolation(
                f"{name} candidate {index} has seed {candidate.seed!r}: not a uint64"
            )
        if not math.isfinite(candidate.scale):
            raise PolicyViolation(
                f"{name} candidate {index} has scale {candidate.scale}: not finite"
            )
        if abs(candidate.scale) > policy.max_perturbation_scale:
            raise PolicyViolation(
                f"{name} candidate {index} has |scale| {abs(candidate.scale):g} > "
                f"max_perturbation_scale {policy.max_perturbation_scale:g}"
            )


def _check_batch_size(policy: HolderPolicy, task: Task, data_size: int, name: str) -> None:
    if task.batch.mode != "full" and task.batch.batch_size > data_size:
        raise PolicyViolation(f"{name} wants {_batches(task.batch)}; this data set has {data_size}")
    if task.batch.mode == "full" and data_size < policy.min_batch_size:
        # A "full" batch of a tiny data set singles out records just like a tiny minibatch.
        raise PolicyViolation(
            f"{name} wants the full data set, which has only {data_size} examples "
            f"(< min_batch_size {policy.min_batch_size})"
        )


def _check_id(what: str, value: str) -> None:
    if not (
        isinstance(value, str)
        and len(value) <= MAX_TASK_ID_LENGTH
        and _PRINTABLE_ID.fullmatch(value)
    ):
        raise PolicyViolation(
            f"{what} {_clip(value)} must be 1-{MAX_TASK_ID_LENGTH} printable ASCII characters"
        )


# -- what the holder tells the coordinator -------------------------------------------------------
def fitness_digest(fitness: FitnessSpec) -> str:
    """A stable hash of a fitness spec, so a coordinator can check it before sending a run."""
    canonical = json.dumps(asdict(fitness), sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def policy_summary(policy: HolderPolicy) -> dict[str, str]:
    """The caps the holder declares at Join (never its ledger state: that is its own)."""
    return {
        "expected_model_fingerprint": policy.expected_model_fingerprint,
        "max_bits": repr(policy.max_bits),
        "allowed_algorithms": ",".join(policy.allowed_algorithms),
        "allowed_parametrizations": ",".join(policy.allowed_parametrizations),
        "max_lambda": str(policy.max_lambda),
        "max_perturbation_scale": repr(policy.max_perturbation_scale),
        "min_batch_size": str(policy.min_batch_size),
        "allowed_batch_modes": ",".join(policy.allowed_batch_modes),
        "fitness_sha256": fitness_digest(policy.fitness),
        "max_epsilon": repr(policy.max_epsilon),
        "delta": repr(policy.delta),
        "require_dp": str(policy.require_dp).lower(),
    }


# -- formatting helpers --------------------------------------------------------------------------
def _short(fingerprint: str) -> str:
    """``sha256:`` and the first 12 hex digits: enough to tell two models apart in a message."""
    text = str(fingerprint)
    return text[:19] + "..." if len(text) > 22 else repr(text)


def _clip(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _kind(kind: object) -> str:
    return kind.value if isinstance(kind, AnswerKind) else str(kind)
