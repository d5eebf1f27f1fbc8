"""The data holder's policy: what it agrees to answer, checked before any data is touched.

The holder is the trust anchor of its own privacy: it trusts nobody, so a coordinator,
even a malicious one, may send any run spec and any task. The coordinator controls
everything the policy does not pin, so the policy pins the whole question:

* the base model (by fingerprint), the algorithms and hence the answer kinds, and the
  answer mechanisms (plain, randomized response, DPZero, chunk votes): a policy can
  require a private one, a smallest number of chunks and a largest ε for any one answer;
* the parametrization, every field of it (kind, patterns, granularity, blocks, dimension,
  projection seed), as one of the exact specs the policy lists;
* the fitness itself (prompt template, label words, data fields), so a coordinator cannot
  craft a question such as "is record X present?";
* the seeds: every candidate and step must be on the run's public seed schedule
  (:mod:`sottovoce.common.protocol.seeds`), so no direction is chosen by the coordinator;
* the size of every perturbation and step, and the model's total drift from the base
  (``||x||_inf`` and ``||x||_2`` in the parametrization's coordinates), the steps a task may
  carry, the steps and rounds of a run, and the batch: all checked before any data is read.

What pins cannot do: make a plain comparison record-private. Inside any pins, an adversary
who knows the rest of the data set can look for a question whose answer flips with one
record; only a DP mechanism bounds that (``answer_mechanisms``, ``require_dp``).

Decisions here depend on the policy, the spec and the task only, never on the data: the
size of the data set enters as the policy's declared ``min_examples``, so a refusal cannot
be used to measure it. ``check_run`` runs once when the holder joins, ``check_task`` and
``check_steps`` on every task; they raise :class:`PolicyViolation` with one line naming what
is refused and why (for the holder's own log) and a reason code (for the coordinator).
The lifetime bit and (ε, δ) budgets are the ledger's job (``client/ledger.py``).
"""

from __future__ import annotations

import hashlib
import math
import time
import tomllib
from collections.abc import Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import tomli_w
from pydantic import ConfigDict, Field, TypeAdapter, ValidationError, field_validator
from pydantic.dataclasses import dataclass
from pydantic_core import ErrorDetails

from sottovoce.common.errors import ConfigError, PolicyViolation, RefusalCode
from sottovoce.common.parametrizations.base import ParametrizationSpec
from sottovoce.common.protocol.answers import (
    ALGORITHM_ANSWER_KINDS,
    ANSWER_MECHANISMS,
    DIVERGENCE_PENALTY_MECHANISMS,
    EXPLICIT_ALGORITHMS,
    Algorithm,
    AnswerKind,
    AnswerMechanism,
)
from sottovoce.common.protocol.limits import (
    FINGERPRINT_PATTERN,
    ID_PATTERN,
    MAX_EXPLICIT_DIMENSION,
    MAX_ID_LENGTH,
    MAX_SUBSPACE_DIMENSION,
    UINT64_MAX,
)
from sottovoce.common.protocol.messages import (
    BatchMode,
    BatchSpec,
    FitnessSpec,
    RunSpec,
    Task,
    check_fitness_spec,
)
from sottovoce.common.protocol.seeds import SeedSchedule
from sottovoce.common.steplog import Step
from sottovoce.common.storage import canonical_json

if TYPE_CHECKING:  # a policy loads without torch or dp-accounting: its errors come at once
    from sottovoce.client.ledger import PrivacyLimit
    from sottovoce.common.accounting import DpEvent
    from sottovoce.common.parametrizations.drift import DriftTracker, PendingDrift

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
    allowed_algorithms: tuple[Algorithm, ...]
    parametrizations: tuple[ParametrizationSpec, ...]
    max_lambda: Annotated[_StrictInt, Field(ge=1)]
    max_perturbation_scale: Annotated[_StrictFloat, Field(gt=0)]
    max_drift_linf: Annotated[_StrictFloat, Field(gt=0)]
    min_examples: Annotated[_StrictInt, Field(ge=1)]
    fitness: FitnessSpec
    ledger_dir: Path
    max_drift_l2: Annotated[_StrictFloat, Field(gt=0)] | None = None
    max_new_steps_per_task: Annotated[_StrictInt, Field(ge=0)] = 1000
    max_steps_per_run: Annotated[_StrictInt, Field(ge=0)] = 10_000
    max_rounds_per_run: Annotated[_StrictInt, Field(ge=1, le=1_000_000)] = 10_000
    answer_mechanisms: tuple[AnswerMechanism, ...] = ANSWER_MECHANISMS
    min_batch_size: Annotated[_StrictInt, Field(ge=1)] = 16
    allowed_batch_modes: tuple[BatchMode, ...] = ("minibatch", "full", "poisson")
    max_epsilon: Annotated[_StrictFloat, Field(gt=0)] | None = None
    delta: Annotated[_StrictFloat, Field(gt=0, lt=1)] | None = None
    require_dp: bool = False
    min_chunks: Annotated[_StrictInt, Field(ge=1)] = 1
    max_answer_epsilon: Annotated[_StrictFloat, Field(gt=0)] | None = None

    @property
    def declared_examples(self) -> int:
        """The data set size every decision assumes: ``min_examples``, the declared floor.

        Never the real count: a refusal or a noise level that depended on it would let a
        coordinator binary-search it with free Joins. Accounting at this size is
        conservative (a smaller n means a larger sampling rate, hence more epsilon).
        """
        return self.min_examples

    def allows_mechanism(self, mechanism: AnswerMechanism) -> bool:
        if self.require_dp and mechanism == "plain":
            return False
        return mechanism in self.answer_mechanisms

    def privacy_limit(self) -> PrivacyLimit | None:
        """The ledger's (ε, δ) limit, or None when the policy sets no max_epsilon."""
        if self.max_epsilon is None or self.delta is None:
            return None
        from sottovoce.client.ledger import PrivacyLimit

        return PrivacyLimit(self.max_epsilon, self.delta, self.require_dp)

    def __post_init__(self) -> None:
        if (self.max_epsilon is None) != (self.delta is None):
            raise ValueError(
                "max_epsilon: set it together with delta (an epsilon means nothing without "
                "its delta), or neither"
            )
        if self.require_dp and self.max_epsilon is None:
            raise ValueError("require_dp: needs max_epsilon and delta")
        if self.max_answer_epsilon is not None and self.delta is None:
            raise ValueError(
                "max_answer_epsilon: needs max_epsilon and delta (an answer's epsilon is "
                "measured at the policy's delta)"
            )
        if self.min_examples < self.min_batch_size:
            raise ValueError(
                f"min_examples: {self.min_examples} is below min_batch_size "
                f"{self.min_batch_size} (a data set smaller than a batch)"
            )
        if len(set(self.parametrizations)) != len(self.parametrizations):
            raise ValueError("parametrizations: lists the same spec twice")
        unpenalizable = [
            m for m in self.answer_mechanisms if m not in DIVERGENCE_PENALTY_MECHANISMS
        ]
        if self.fitness.penalizes_divergence and unpenalizable:
            raise ValueError(
                f"fitness.kl_weight: a divergence penalty reads fixed prompts on every answer, "
                f"which {unpenalizable} accounting does not cover; list only "
                f"{sorted(DIVERGENCE_PENALTY_MECHANISMS)} in answer_mechanisms"
            )

    @field_validator("expected_model_fingerprint")
    @classmethod
    def _fingerprint_format(cls, value: str) -> str:
        if not FINGERPRINT_PATTERN.fullmatch(value):
            raise ValueError("must be 'sha256:' followed by 64 lowercase hex digits")
        return value

    @field_validator(
        "allowed_algorithms", "parametrizations", "allowed_batch_modes", "answer_mechanisms"
    )
    @classmethod
    def _not_empty(cls, value: tuple[Any, ...]) -> tuple[Any, ...]:
        if not value:
            raise ValueError("must list at least one entry (an empty list allows nothing)")
        return value

    @field_validator("parametrizations")
    @classmethod
    def _sound_parametrizations(
        cls, value: tuple[ParametrizationSpec, ...]
    ) -> tuple[ParametrizationSpec, ...]:
        for index, spec in enumerate(value):
            if spec.kind == "subspace" and not 1 <= spec.dimension <= MAX_SUBSPACE_DIMENSION:
                raise ValueError(
                    f"parametrizations[{index}].dimension: a subspace needs 1.."
                    f"{MAX_SUBSPACE_DIMENSION} coordinates (got {spec.dimension})"
                )
            if spec.kind == "full" and (spec.patterns or spec.last_k_blocks is not None):
                raise ValueError(
                    f"parametrizations[{index}]: kind full takes no patterns or last_k_blocks"
                )
        return value

    @field_validator("fitness")
    @classmethod
    def _sound_fitness(cls, value: FitnessSpec) -> FitnessSpec:
        check_fitness_spec(value)
        return value


# -- writing and loading ---------------------------------------------------------------------
def policy_toml(policy: HolderPolicy, *, header: str = "") -> str:
    """The policy as a TOML document that :func:`load_policy` reads back to an equal policy.

    ``header`` (comment lines, without ``#``) says who wrote it and why.
    """
    table = {key: value for key, value in asdict(policy).items() if value is not None}
    table["ledger_dir"] = str(policy.ledger_dir)
    for spec in table["parametrizations"]:
        for key in [k for k, v in spec.items() if v is None]:
            del spec[key]
    comment = "".join(f"# {line}\n" for line in header.splitlines())
    return comment + tomli_w.dumps(table)


# -- loading ---------------------------------------------------------------------------------
_POLICY_ADAPTER = TypeAdapter(HolderPolicy)
_POLICY_KEYS = tuple(f.name for f in fields(HolderPolicy))
_FITNESS_KEYS = tuple(f.name for f in fields(FitnessSpec))
_PARAMETRIZATION_KEYS = tuple(f.name for f in fields(ParametrizationSpec))
_RETIRED_KEYS = {
    "allowed_parametrizations": (
        "replaced by [[parametrizations]] tables, each pinning one spec in full (kind, "
        "patterns, granularity, last_k_blocks, dimension, projection_seed)"
    ),
}


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
    for key, replacement in _RETIRED_KEYS.items():
        if key in table:
            raise ConfigError(f"{path}: {key}: {replacement}")
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
        known = _POLICY_KEYS
        if field.startswith("fitness."):
            known = _FITNESS_KEYS
        elif field.startswith("parametrizations["):
            known = _PARAMETRIZATION_KEYS
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
    named = message.split(": ")[0].split(".")
    if kind == "value_error" and ": " in message and all(part.isidentifier() for part in named):
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
            f"expected_model_fingerprint {_short(policy.expected_model_fingerprint)}",
            RefusalCode.INTERNAL,
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
    kind = ALGORITHM_ANSWER_KINDS[spec.algorithm]
    if spec.answer_kind is not kind:
        raise PolicyViolation(
            f"run wants answer kind {_kind(spec.answer_kind)!r} but algorithm {spec.algorithm!r} "
            f"only asks for {kind.value!r}"
        )
    _check_parametrization(policy, spec.parametrization)
    if spec.max_rounds > policy.max_rounds_per_run:
        raise PolicyViolation(
            f"run wants {spec.max_rounds} rounds; policy allows max_rounds_per_run "
            f"{policy.max_rounds_per_run}"
        )
    _check_fitness(policy.fitness, spec.fitness)
    if spec.fitness.penalizes_divergence and spec.mechanism not in DIVERGENCE_PENALTY_MECHANISMS:
        # The policy cannot pin such a pair; checked again so no later change can let it by.
        raise PolicyViolation(
            f"run's fitness penalizes divergence, which {spec.mechanism!r} answers cannot carry"
        )
    _check_batch_policy(policy, spec.batch, "run")
    _check_dp_shape(policy, spec)
    _check_ranking_shape(policy, spec)
    if not policy.allows_mechanism(spec.mechanism):
        allowed = [m for m in policy.answer_mechanisms if policy.allows_mechanism(m)]
        raise PolicyViolation(
            f"run's answers would be {spec.mechanism!r}; policy allows {allowed}"
            + (" (require_dp)" if policy.require_dp else "")
        )
    from sottovoce.client.privacy_budget import declared_sampling_rate
    from sottovoce.common.accounting import answer_event

    rate = declared_sampling_rate(spec.batch, policy.declared_examples)
    check_answer_epsilon(policy, answer_event(spec.dp, spec.answer_kind, 1, rate), "run")


def check_answer_epsilon(policy: HolderPolicy, event: DpEvent | None, who: str) -> None:
    """Refuse an answer whose own ε (at the policy's delta) passes ``max_answer_epsilon``.

    The lifetime budget bounds what all answers reveal together; this bounds what any
    single one may, so one question can never spend a large share of it (nor be one that
    a membership attacker could read with high confidence).
    """
    if policy.max_answer_epsilon is None or event is None or policy.delta is None:
        return
    from sottovoce.common.accounting import answer_epsilon

    epsilon = answer_epsilon(event, policy.delta)
    if epsilon > policy.max_answer_epsilon * (1 + 1e-9):
        raise PolicyViolation(
            f"{who}'s answers would each cost epsilon {epsilon:.4g} at delta {policy.delta:g}; "
            f"policy allows max_answer_epsilon {policy.max_answer_epsilon:g}"
        )


def _check_parametrization(policy: HolderPolicy, asked: ParametrizationSpec) -> None:
    """The run's parametrization must equal one the policy pins, field for field.

    Patterns, blocks, granularity, dimension and projection seed are as much a part of the
    question as the kind: with them a coordinator chooses which weights it can move.
    """
    if asked in policy.parametrizations:
        return
    closest = min(policy.parametrizations, key=lambda pinned: len(_differing(pinned, asked)))
    differing = _differing(closest, asked)
    first = differing[0]
    others = f" (also: {', '.join(differing[1:])})" if differing[1:] else ""
    raise PolicyViolation(
        f"run's parametrization is not one the policy pins: closest differs in {first}: run "
        f"has {_clip(getattr(asked, first))}, policy pins {_clip(getattr(closest, first))}"
        f"{others}"
    )


def _differing(pinned: object, asked: object) -> list[str]:
    return [
        f.name
        for f in fields(pinned)  # type: ignore[arg-type]
        if getattr(pinned, f.name) != getattr(asked, f.name)
    ]


def _check_ranking_shape(policy: HolderPolicy, spec: RunSpec) -> None:
    """Rank answers: a depth within max_lambda, no randomized response (not implemented
    for rankings), and explicit-coordinate algorithms only on a space of stated size."""
    if spec.answer_kind is not AnswerKind.RANKING:
        if spec.rank_depth:
            raise PolicyViolation(f"run sets rank_depth on {_kind(spec.answer_kind)!r} answers")
        return
    if spec.rank_depth > policy.max_lambda:
        raise PolicyViolation(
            f"run wants rankings of depth {spec.rank_depth}; policy allows max_lambda "
            f"{policy.max_lambda}"
        )
    if spec.dp.randomized_response_epsilon:
        raise PolicyViolation("randomized response is not implemented for ranking answers")
    if spec.dp.chunks:
        raise PolicyViolation("chunk votes are not implemented for ranking answers")
    if spec.algorithm in EXPLICIT_ALGORITHMS and not (
        1 <= spec.parametrization.dimension <= MAX_EXPLICIT_DIMENSION
    ):
        raise PolicyViolation(
            f"algorithm {spec.algorithm!r} searches explicit coordinates: the parametrization "
            f"must state its dimension (1..{MAX_EXPLICIT_DIMENSION})"
        )


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
        if dp.chunks or dp.vote_noise or dp.keep_margin:
            raise PolicyViolation("run mixes chunk votes into dp-scalar answers")
        if policy.require_dp and dp.noise_multiplier <= 0:
            raise PolicyViolation("policy requires DP answers; this DPZero run adds no noise")
        return
    if dp.noise_multiplier or dp.quantization_bits:
        raise PolicyViolation(
            f"run sets DPZero noise or quantization on {_kind(spec.answer_kind)!r}"
        )
    if dp.chunks:
        _check_chunk_votes(policy, spec)
    elif dp.vote_noise or dp.keep_margin:
        raise PolicyViolation(
            "run sets vote noise or a keep margin without chunk votes", RefusalCode.MALFORMED
        )
    private = dp.randomized_response_epsilon > 0 or (dp.chunks > 0 and dp.vote_noise > 0)
    if policy.require_dp and not private:
        raise PolicyViolation(
            "policy requires DP answers; this run's choices have no randomized response and "
            "no noisy chunk votes"
        )


def _check_chunk_votes(policy: HolderPolicy, spec: RunSpec) -> None:
    """Chunk votes partition the whole split into at least ``min_chunks`` chunks."""
    dp = spec.dp
    if dp.randomized_response_epsilon:
        raise PolicyViolation("run mixes randomized response into chunk votes")
    if spec.batch.mode != "full":
        raise PolicyViolation(
            f"run wants chunk votes on {spec.batch.mode!r} batches; the chunks partition the "
            "whole split (batch mode 'full')"
        )
    if dp.chunks < policy.min_chunks:
        raise PolicyViolation(
            f"run wants chunk votes over {dp.chunks} chunks; policy needs at least min_chunks "
            f"{policy.min_chunks}"
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
    if batch.mode != "full" and batch.batch_size > policy.declared_examples:
        # Compared with the declared size, not the real one: "too large for your data" would
        # tell the coordinator how much data there is.
        raise PolicyViolation(
            f"{who} wants {_batches(batch)}; the policy declares min_examples "
            f"{policy.declared_examples}"
        )


def _batches(batch: BatchSpec) -> str:
    if batch.mode == "poisson":
        return f"Poisson batches of {batch.batch_size} examples on average"
    return f"minibatches of {batch.batch_size} examples"


def _check_fitness(pinned: FitnessSpec, asked: FitnessSpec) -> None:
    differing = _differing(pinned, asked)
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
    schedule: SeedSchedule,
    *,
    now: float | None = None,
) -> None:
    """Refuse a task the policy does not allow (raises ``PolicyViolation``).

    ``spec`` is the run spec already accepted by :func:`check_run`; the task must match it.
    ``schedule`` is the run's seed schedule. Only the task's shape is checked here, cheapest
    first, so a huge task costs nothing before it is refused; its steps' seeds and drift are
    :func:`check_steps`' (they need the holder's log). ``now`` defaults to the wall clock.
    """
    _check_id("task id", task.task_id)
    name = f"task {task.task_id}"
    if task.run_id != spec.run_id:
        raise PolicyViolation(
            f"{name} is for run {task.run_id!r}; this holder joined {spec.run_id!r}",
            RefusalCode.MALFORMED,
        )
    if len(task.new_steps) > policy.max_new_steps_per_task:
        raise PolicyViolation(
            f"{name} carries {len(task.new_steps)} new steps; policy allows "
            f"max_new_steps_per_task {policy.max_new_steps_per_task}"
        )
    if task.target_version > policy.max_steps_per_run:
        raise PolicyViolation(
            f"{name} brings the log to {task.target_version} steps; policy allows "
            f"max_steps_per_run {policy.max_steps_per_run}"
        )
    if task.round_index >= spec.max_rounds:
        raise PolicyViolation(
            f"{name} is round {task.round_index} of a run of {spec.max_rounds} rounds",
            RefusalCode.MALFORMED,
        )
    if task.answer_kind != spec.answer_kind:
        raise PolicyViolation(
            f"{name} asks for answer kind {_kind(task.answer_kind)!r}; "
            f"run {spec.run_id!r} uses {_kind(spec.answer_kind)!r}",
            RefusalCode.MALFORMED,
        )
    if task.batch != spec.batch:
        raise PolicyViolation(
            f"{name} has batch {task.batch}; run {spec.run_id!r} uses {spec.batch}",
            RefusalCode.MALFORMED,
        )
    _check_batch_policy(policy, task.batch, name)  # again: do not rely on check_run's caller
    if spec.algorithm in EXPLICIT_ALGORITHMS:
        _check_explicit_candidates(policy, spec, task, name)
    else:
        _check_candidates(policy, task, schedule, name)
    if task.answer_kind is AnswerKind.RANKING and len(task.candidates) < max(2, spec.rank_depth):
        raise PolicyViolation(
            f"{name} asks to rank {len(task.candidates)} candidates (needs >= 2 and >= the "
            f"run's rank_depth {spec.rank_depth})",
            RefusalCode.MALFORMED,
        )
    clock = time.time() if now is None else now
    if clock > task.deadline_unix:
        raise PolicyViolation(
            f"{name} deadline passed {clock - task.deadline_unix:.1f} s ago", RefusalCode.EXPIRED
        )


def _check_explicit_candidates(policy: HolderPolicy, spec: RunSpec, task: Task, name: str) -> None:
    """Explicit candidates (CMA): each a delta of the stated dimension within the scale cap.

    They are the coordinator's choice of direction (no schedule can cover them); what the
    policy bounds is how far each moves any coordinate, in a space it pinned in full.
    """
    if len(task.candidates) > policy.max_lambda:
        raise PolicyViolation(
            f"{name} has {len(task.candidates)} candidates; policy allows at most max_lambda "
            f"{policy.max_lambda}"
        )
    for index, candidate in enumerate(task.candidates):
        delta = candidate.delta
        if delta is None or candidate.seed != 0 or candidate.scale != 1.0:
            raise PolicyViolation(
                f"{name} candidate {index} is not an explicit delta ({spec.algorithm!r} runs "
                "send explicit candidates only)",
                RefusalCode.MALFORMED,
            )
        if len(delta) != spec.parametrization.dimension:
            raise PolicyViolation(
                f"{name} candidate {index} has {len(delta)} coordinates; the parametrization "
                f"has {spec.parametrization.dimension}",
                RefusalCode.MALFORMED,
            )
        largest = max((abs(v) for v in delta), default=0.0)
        if not math.isfinite(largest):
            raise PolicyViolation(f"{name} candidate {index}: not finite", RefusalCode.MALFORMED)
        if largest > policy.max_perturbation_scale:
            raise PolicyViolation(
                f"{name} candidate {index} moves a coordinate by {largest:g} > "
                f"max_perturbation_scale {policy.max_perturbation_scale:g}"
            )


def _check_candidates(policy: HolderPolicy, task: Task, schedule: SeedSchedule, name: str) -> None:
    count = len(task.candidates)
    if count == 0:
        raise PolicyViolation(f"{name} has no candidates", RefusalCode.MALFORMED)
    if count > policy.max_lambda:
        raise PolicyViolation(
            f"{name} has {count} candidates; policy allows at most max_lambda {policy.max_lambda}"
        )
    if task.answer_kind in (AnswerKind.COMPARE, AnswerKind.DP_SCALAR) and count != 1:
        raise PolicyViolation(
            f"{name} is a {_kind(task.answer_kind)} task with {count} candidates (needs exactly 1)",
            RefusalCode.MALFORMED,
        )
    scales: dict[int, list[float]] = {}
    for index, candidate in enumerate(task.candidates):
        if candidate.delta is not None:
            raise PolicyViolation(
                f"{name} candidate {index} is an explicit delta; this run's algorithm uses "
                "seeded candidates only",
                RefusalCode.MALFORMED,
            )
        if not (isinstance(candidate.seed, int) and 0 <= candidate.seed <= UINT64_MAX):
            raise PolicyViolation(
                f"{name} candidate {index} has seed {candidate.seed!r}: not a uint64",
                RefusalCode.MALFORMED,
            )
        if not math.isfinite(candidate.scale):
            raise PolicyViolation(
                f"{name} candidate {index} has scale {candidate.scale}: not finite",
                RefusalCode.MALFORMED,
            )
        if abs(candidate.scale) > policy.max_perturbation_scale:
            raise PolicyViolation(
                f"{name} candidate {index} has |scale| {abs(candidate.scale):g} > "
                f"max_perturbation_scale {policy.max_perturbation_scale:g}"
            )
        if schedule.lane_of(candidate.seed, task.round_index) is None:
            raise PolicyViolation(
                f"{name} candidate {index} has seed {candidate.seed}, which is not on the "
                f"run's seed schedule for round {task.round_index} (lanes 0.."
                f"{schedule.lanes - 1})"
            )
        scales.setdefault(candidate.seed, []).append(candidate.scale)
    for seed, used in scales.items():
        # A seed twice is a mirrored pair (+s z, -s z); anything else spends one direction
        # on several questions.
        if len(used) > 2 or (len(used) == 2 and used[0] != -used[1]):
            raise PolicyViolation(
                f"{name} uses seed {seed} {len(used)} times with scales {used}; a seed may "
                "appear once, or twice as a mirrored pair (+s, -s)"
            )


def check_steps(
    policy: HolderPolicy,
    steps: Sequence[Step],
    schedule: SeedSchedule,
    *,
    last_round: int,
    before_round: int,
    drift: DriftTracker,
    name: str,
    algorithm: str = "",
    last_round_seeds: frozenset[int] = frozenset(),
) -> tuple[list[int], PendingDrift]:
    """Check new log steps before they are applied: size, seeds, and the total drift.

    Each step must be a candidate of some round of the seed schedule, later than the round
    of the step before it (``last_round``) and earlier than ``before_round``; each
    ``|coefficient|`` at most ``max_perturbation_scale``; and x after them within the drift
    caps. Returns the steps' rounds and the drift to commit once they are applied.

    Rank-answer algorithms take several steps a round: ``es-mu-lambda`` logs each of a
    round's mu best seeds, so its steps may share a round, each seed once
    (``last_round_seeds``: those already logged for ``last_round``). CMA's explicit steps
    (``x += delta``, whose direction no schedule covers) come one a round, each of the
    parametrization's dimension, every ``|delta_i|`` within ``max_perturbation_scale``.
    """
    rounds: list[int] = []
    previous = last_round
    shared_rounds = ALGORITHM_ANSWER_KINDS.get(algorithm) is AnswerKind.RANKING
    used = set(last_round_seeds)
    for index, step in enumerate(steps):
        if step.delta is not None:
            found = _explicit_step_round(policy, step, algorithm, drift, previous, name, index)
        else:
            if not abs(step.coefficient) <= policy.max_perturbation_scale:
                raise PolicyViolation(
                    f"{name} new step {index} has |coefficient| {abs(step.coefficient):g} > "
                    f"max_perturbation_scale {policy.max_perturbation_scale:g}"
                )
            if algorithm in EXPLICIT_ALGORITHMS:
                raise PolicyViolation(
                    f"{name} new step {index} is seeded; {algorithm!r} logs explicit steps"
                )
            after = previous - 1 if shared_rounds else previous
            scheduled = schedule.first_round_of(step.seed, after, before_round)
            if scheduled == previous and step.seed in used:  # a seed once a round
                scheduled = schedule.first_round_of(step.seed, previous, before_round)
            if scheduled is None:
                raise PolicyViolation(
                    f"{name} new step {index} has seed {step.seed}, which is not a candidate of "
                    f"any round {after + 1}..{before_round - 1} of the run's seed schedule"
                    + (" (each seed once a round)" if shared_rounds else "")
                )
            found = scheduled
        if found >= before_round:
            raise PolicyViolation(
                f"{name} new step {index} would belong to round {found}, not before round "
                f"{before_round}"
            )
        if found != previous:
            used = set()
        used.add(step.seed)
        rounds.append(found)
        previous = found
    pending = drift.preview(steps)
    moved = pending.drift
    bound = "" if moved.exact else " (upper bound: sum of |coefficients|)"
    if moved.linf > policy.max_drift_linf:
        raise PolicyViolation(
            f"{name}: its steps would move x by {moved.linf:.4g} in some coordinate{bound}; "
            f"policy allows max_drift_linf {policy.max_drift_linf:g}"
        )
    if policy.max_drift_l2 is not None and moved.l2 > policy.max_drift_l2:
        raise PolicyViolation(
            f"{name}: its steps would move x by {moved.l2:.4g} in L2 norm{bound}; "
            f"policy allows max_drift_l2 {policy.max_drift_l2:g}"
        )
    return rounds, pending


def _explicit_step_round(
    policy: HolderPolicy,
    step: Step,
    algorithm: str,
    drift: DriftTracker,
    previous: int,
    name: str,
    index: int,
) -> int:
    """The round of an explicit step (the one after ``previous``), once it is checked."""
    assert step.delta is not None
    if algorithm not in EXPLICIT_ALGORITHMS:
        raise PolicyViolation(
            f"{name} new step {index} is an explicit delta; algorithm {algorithm!r} logs "
            "seeded steps only"
        )
    if len(step.delta) != drift.dimension:
        raise PolicyViolation(
            f"{name} new step {index} has {len(step.delta)} coordinates, x has {drift.dimension}",
            RefusalCode.MALFORMED,
        )
    largest = max(abs(value) for value in step.delta)
    if largest > policy.max_perturbation_scale:
        raise PolicyViolation(
            f"{name} new step {index} moves a coordinate by {largest:g} > "
            f"max_perturbation_scale {policy.max_perturbation_scale:g}"
        )
    return previous + 1


def _check_id(what: str, value: str) -> None:
    """Ids end up in the ledger and the operator's audit lines: the protocol's id pattern."""
    if not (isinstance(value, str) and ID_PATTERN.fullmatch(value)):
        raise PolicyViolation(
            f"{what} {_clip(value)} must be 1-{MAX_ID_LENGTH} characters of [A-Za-z0-9._:-]"
        )


# -- what the holder tells the coordinator -------------------------------------------------------
def fitness_digest(fitness: FitnessSpec) -> str:
    """A stable hash of a fitness spec, so a coordinator can check it before sending a run."""
    return _digest(asdict(fitness))


def parametrizations_digest(specs: Sequence[ParametrizationSpec]) -> str:
    """A stable hash of the pinned parametrization specs (order does not matter)."""
    return _digest(sorted(spec.canonical_id() for spec in specs))


def _digest(value: object) -> str:
    canonical = canonical_json(value)
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def policy_summary(policy: HolderPolicy) -> dict[str, str]:
    """The caps the holder declares at Join (never its ledger state or its data's size)."""
    return {
        "expected_model_fingerprint": policy.expected_model_fingerprint,
        "max_bits": repr(policy.max_bits),
        "allowed_algorithms": ",".join(policy.allowed_algorithms),
        "parametrizations_sha256": parametrizations_digest(policy.parametrizations),
        "max_lambda": str(policy.max_lambda),
        "max_perturbation_scale": repr(policy.max_perturbation_scale),
        "max_drift_linf": repr(policy.max_drift_linf),
        "max_drift_l2": repr(policy.max_drift_l2),
        "max_new_steps_per_task": str(policy.max_new_steps_per_task),
        "max_steps_per_run": str(policy.max_steps_per_run),
        "max_rounds_per_run": str(policy.max_rounds_per_run),
        "answer_mechanisms": ",".join(
            m for m in policy.answer_mechanisms if policy.allows_mechanism(m)
        ),
        "min_batch_size": str(policy.min_batch_size),
        "min_examples": str(policy.declared_examples),
        "allowed_batch_modes": ",".join(policy.allowed_batch_modes),
        "fitness_sha256": fitness_digest(policy.fitness),
        "max_epsilon": repr(policy.max_epsilon),
        "delta": repr(policy.delta),
        "require_dp": str(policy.require_dp).lower(),
        "min_chunks": str(policy.min_chunks),
        "max_answer_epsilon": repr(policy.max_answer_epsilon),
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
