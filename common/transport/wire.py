"""Conversion between the protocol's dataclasses and their protobuf messages, with bounds.

Everything that crosses the wire is untrusted: a holder must not be steered by a malformed
task from a malicious coordinator, and the coordinator must not be crashed or have its
state changed by a malformed request. So every field of every message is checked here, in
both directions, against explicit bounds (lengths, ranges, finiteness, known enum values),
and any violation raises :class:`WireError` with one line naming the message and field.
Encoding checks too, so a bug on the sending side is caught before it reaches a peer.

The dataclasses live in :mod:`sottovoce.common.protocol.messages`; the call envelopes (holder id
and session token around a payload) are the small dataclasses defined below.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence, Sized
from dataclasses import dataclass
from typing import NoReturn, TypeVar

import numpy as np
from google.protobuf.message import Message

from sottovoce.common.errors import RefusalCode, SottovoceError
from sottovoce.common.parametrizations.base import (
    MAX_RANK,
    Granularity,
    ParametrizationKind,
    ParametrizationSpec,
)
from sottovoce.common.proto import sottovoce_pb2 as pb
from sottovoce.common.protocol.answers import AnswerKind
from sottovoce.common.protocol.limits import (
    FINGERPRINT_PATTERN,
    HASH_PATTERN,
    ID_PATTERN,
    MAX_ABS_SCALE,
    MAX_BATCH_SIZE,
    MAX_BITS,
    MAX_CHOICE,
    MAX_CHUNKS,
    MAX_COUNT,
    MAX_DEADLINE_UNIX,
    MAX_DELTA_FLOATS,
    MAX_EPSILON,
    MAX_EXPLICIT_DIMENSION,
    MAX_ID_LENGTH,
    MAX_KEEP_MARGIN,
    MAX_KL_PROMPTS,
    MAX_KL_WEIGHT,
    MAX_LABEL_WORD_LENGTH,
    MAX_LABEL_WORDS,
    MAX_LAMBDA,
    MAX_LAST_K_BLOCKS,
    MAX_NAME_LENGTH,
    MAX_NEW_STEPS,
    MAX_NOISE_MULTIPLIER,
    MAX_PATTERNS,
    MAX_POLICY_ENTRIES,
    MAX_QUANTIZATION_BITS,
    MAX_RANDOMIZED_RESPONSE_EPSILON,
    MAX_REASON_LENGTH,
    MAX_SUBSPACE_DIMENSION,
    MAX_TEXT_LENGTH,
    MAX_VOTE_NOISE,
    MAX_WAIT_MS,
    SESSION_PATTERN,
    UINT64_MAX,
)
from sottovoce.common.protocol.messages import (
    MAX_NEW_TOKENS,
    Answer,
    BatchMode,
    BatchSpec,
    Candidate,
    DpSpec,
    FitnessKind,
    FitnessSpec,
    JoinRequest,
    RunFinished,
    RunSpec,
    Task,
)
from sottovoce.common.steplog import Step

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_CONTROL_EXCEPT_NEWLINE_TAB = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


class WireError(SottovoceError):
    """A message (received or about to be sent) breaks the protocol's bounds."""


# -- call envelopes ----------------------------------------------------------------------
@dataclass(frozen=True)
class Credentials:
    """Who is calling: the holder id and the session token its Join returned."""

    holder_id: str
    session: str


@dataclass(frozen=True)
class PullTaskCall:
    """A decoded PullTask request."""

    credentials: Credentials
    have_version: int
    have_head: str
    wait_s: float


@dataclass(frozen=True)
class PushAnswerCall:
    """A decoded PushAnswer request."""

    credentials: Credentials
    answer: Answer


# -- enums -------------------------------------------------------------------------------
E = TypeVar("E")
P = TypeVar("P", bound=int)

_ANSWER_KINDS: dict[AnswerKind, pb.AnswerKind.ValueType] = {
    AnswerKind.COMPARE: pb.ANSWER_KIND_COMPARE,
    AnswerKind.BEST_OF: pb.ANSWER_KIND_BEST_OF,
    AnswerKind.DP_SCALAR: pb.ANSWER_KIND_DP_SCALAR,
    AnswerKind.RANKING: pb.ANSWER_KIND_RANKING,
}
_PARAMETRIZATION_KINDS: dict[ParametrizationKind, pb.ParametrizationKind.ValueType] = {
    "full": pb.PARAMETRIZATION_KIND_FULL,
    "select": pb.PARAMETRIZATION_KIND_SELECT,
    "subspace": pb.PARAMETRIZATION_KIND_SUBSPACE,
    "scale": pb.PARAMETRIZATION_KIND_SCALE,
    "lowrank": pb.PARAMETRIZATION_KIND_LOWRANK,
    "lora": pb.PARAMETRIZATION_KIND_LORA,
}
_GRANULARITIES: dict[Granularity, pb.Granularity.ValueType] = {
    "tensor": pb.GRANULARITY_TENSOR,
    "channel": pb.GRANULARITY_CHANNEL,
}
_FITNESS_KINDS: dict[FitnessKind, pb.FitnessKind.ValueType] = {
    "classification": pb.FITNESS_KIND_CLASSIFICATION,
    "completion": pb.FITNESS_KIND_COMPLETION,
    "generation": pb.FITNESS_KIND_GENERATION,
}
_BATCH_MODES: dict[BatchMode, pb.BatchMode.ValueType] = {
    "minibatch": pb.BATCH_MODE_MINIBATCH,
    "full": pb.BATCH_MODE_FULL,
    "poisson": pb.BATCH_MODE_POISSON,
}


def _enum_to_proto(where: str, table: Mapping[E, P], value: object) -> P:
    for python_value, proto_value in table.items():
        if type(value) in (str, type(python_value)) and value == python_value:
            return proto_value
    _fail(where, f"unknown value {_show(value)}, expected one of {_names(table)}")


def _enum_from_proto(where: str, table: Mapping[E, P], value: int) -> E:
    for python_value, proto_value in table.items():
        if proto_value == value:
            return python_value
    _fail(where, f"unknown or unset enum value {value}")


def _names(table: Mapping[E, P]) -> str:
    return "/".join(str(getattr(key, "value", key)) for key in table)


# -- scalar checks (each returns the checked value) --------------------------------------
def _fail(where: str, problem: str) -> NoReturn:
    raise WireError(f"invalid {where}: {problem}")


def _show(value: object) -> str:
    """A short, one-line rendering of an offending value (untrusted input may be huge)."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_str(where: str, value: object) -> str:
    if not isinstance(value, str):
        _fail(where, f"expected a string, got {type(value).__name__}")
    return value


def _check_id(where: str, value: object) -> str:
    text = _check_str(where, value)
    if not 1 <= len(text) <= MAX_ID_LENGTH:
        _fail(where, f"{len(text)} chars, expected 1..{MAX_ID_LENGTH} chars of [A-Za-z0-9._:-]")
    if not ID_PATTERN.fullmatch(text):
        _fail(where, f"{_show(text)} has a character outside [A-Za-z0-9._:-]")
    return text


def _check_session(where: str, value: object) -> str:
    text = _check_str(where, value)
    if not SESSION_PATTERN.fullmatch(text):
        _fail(where, "is not a session token (16..64 chars of [A-Za-z0-9_-])")
    return text


def _check_hash(where: str, value: object) -> str:
    text = _check_str(where, value)
    if not HASH_PATTERN.fullmatch(text):
        _fail(where, f"{_show(text)} is not 64 lowercase hex chars")
    return text


def _check_fingerprint(where: str, value: object) -> str:
    text = _check_str(where, value)
    if not FINGERPRINT_PATTERN.fullmatch(text):
        _fail(where, f"{_show(text)} is not 'sha256:' + 64 lowercase hex chars")
    return text


def _check_text(
    where: str, value: object, *, max_len: int, min_len: int = 0, one_line: bool = True
) -> str:
    text = _check_str(where, value)
    if not min_len <= len(text) <= max_len:
        _fail(where, f"{len(text)} chars, expected {min_len}..{max_len}")
    forbidden = _CONTROL if one_line else _CONTROL_EXCEPT_NEWLINE_TAB
    if forbidden.search(text):
        kind = "a control character" if not one_line else "a line break or control character"
        _fail(where, f"contains {kind}")
    return text


def _check_int(where: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        _fail(where, f"expected an integer, got {type(value).__name__}")
    number = int(value)
    if not low <= number <= high:
        _fail(where, f"{number} is outside {low}..{high}")
    return number


def _check_real(where: str, value: object, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        _fail(where, f"expected a number, got {type(value).__name__}")
    number = float(value)
    if not math.isfinite(number):
        _fail(where, f"{number} is not finite")
    if not low <= number <= high:
        _fail(where, f"{number} is outside {low:g}..{high:g}")
    return number


def _check_float32(where: str, value: object) -> float:
    """A finite float32 with |x| <= MAX_ABS_SCALE: what a proto ``float`` carries exactly."""
    number = _check_real(where, value, -MAX_ABS_SCALE, MAX_ABS_SCALE)
    if float(np.float32(number)) != number:
        _fail(where, f"{number!r} is not exactly a float32 (round it with as_float32)")
    return number


def _check_length(where: str, items: Sized, low: int, high: int) -> None:
    if not low <= len(items) <= high:
        _fail(where, f"{len(items)} items, expected {low}..{high}")


def _required(where: str, message: Message, name: str) -> None:
    if not message.HasField(name):
        _fail(f"{where}.{name}", "is missing")


# -- ParametrizationSpec -----------------------------------------------------------------
def check_parametrization(where: str, spec: ParametrizationSpec) -> None:
    _enum_to_proto(f"{where}.kind", _PARAMETRIZATION_KINDS, spec.kind)
    _check_length(f"{where}.patterns", spec.patterns, 0, MAX_PATTERNS)
    for i, pattern in enumerate(spec.patterns):
        _check_text(f"{where}.patterns[{i}]", pattern, min_len=1, max_len=MAX_TEXT_LENGTH)
    if spec.last_k_blocks is not None:
        _check_int(f"{where}.last_k_blocks", spec.last_k_blocks, 0, MAX_LAST_K_BLOCKS)
    _check_int(f"{where}.dimension", spec.dimension, 0, MAX_SUBSPACE_DIMENSION)
    _check_int(f"{where}.projection_seed", spec.projection_seed, 0, UINT64_MAX)
    _enum_to_proto(f"{where}.granularity", _GRANULARITIES, spec.granularity)
    _check_int(f"{where}.rank", spec.rank, 0, MAX_RANK)


def parametrization_to_proto(
    spec: ParametrizationSpec, where: str = "ParametrizationSpec"
) -> pb.ParametrizationSpec:
    check_parametrization(where, spec)
    message = pb.ParametrizationSpec(
        kind=_PARAMETRIZATION_KINDS[spec.kind],
        patterns=list(spec.patterns),
        dimension=int(spec.dimension),
        projection_seed=int(spec.projection_seed),
        granularity=_GRANULARITIES[spec.granularity],
        rank=int(spec.rank),
    )
    if spec.last_k_blocks is not None:
        message.last_k_blocks = int(spec.last_k_blocks)
    return message


def parametrization_from_proto(
    message: pb.ParametrizationSpec, where: str = "ParametrizationSpec"
) -> ParametrizationSpec:
    spec = ParametrizationSpec(
        kind=_enum_from_proto(f"{where}.kind", _PARAMETRIZATION_KINDS, message.kind),
        patterns=tuple(message.patterns),
        last_k_blocks=message.last_k_blocks if message.HasField("last_k_blocks") else None,
        dimension=message.dimension,
        projection_seed=message.projection_seed,
        granularity=_enum_from_proto(f"{where}.granularity", _GRANULARITIES, message.granularity),
        rank=message.rank,
    )
    check_parametrization(where, spec)
    return spec


# -- FitnessSpec -------------------------------------------------------------------------
def check_fitness(where: str, spec: FitnessSpec) -> None:
    _enum_to_proto(f"{where}.kind", _FITNESS_KINDS, spec.kind)
    _check_text(
        f"{where}.prompt_template", spec.prompt_template, max_len=MAX_TEXT_LENGTH, one_line=False
    )
    _check_length(f"{where}.label_words", spec.label_words, 0, MAX_LABEL_WORDS)
    for i, word in enumerate(spec.label_words):
        _check_text(f"{where}.label_words[{i}]", word, min_len=1, max_len=MAX_LABEL_WORD_LENGTH)
    for name in ("text_field", "label_field", "target_field"):
        _check_text(f"{where}.{name}", getattr(spec, name), min_len=1, max_len=MAX_NAME_LENGTH)
    _check_int(f"{where}.max_new_tokens", spec.max_new_tokens, 0, MAX_NEW_TOKENS)
    for name in ("answer_extractor", "answer_match"):
        _check_text(f"{where}.{name}", getattr(spec, name), max_len=MAX_NAME_LENGTH)
    _check_real(f"{where}.kl_weight", spec.kl_weight, 0.0, MAX_KL_WEIGHT)
    _check_int(f"{where}.kl_prompts", spec.kl_prompts, 0, MAX_KL_PROMPTS)


def fitness_to_proto(spec: FitnessSpec, where: str = "FitnessSpec") -> pb.FitnessSpec:
    check_fitness(where, spec)
    return pb.FitnessSpec(
        kind=_FITNESS_KINDS[spec.kind],
        prompt_template=spec.prompt_template,
        label_words=list(spec.label_words),
        text_field=spec.text_field,
        label_field=spec.label_field,
        target_field=spec.target_field,
        max_new_tokens=int(spec.max_new_tokens),
        answer_extractor=spec.answer_extractor,
        answer_match=spec.answer_match,
        kl_weight=spec.kl_weight,
        kl_prompts=spec.kl_prompts,
    )


def fitness_from_proto(message: pb.FitnessSpec, where: str = "FitnessSpec") -> FitnessSpec:
    spec = FitnessSpec(
        kind=_enum_from_proto(f"{where}.kind", _FITNESS_KINDS, message.kind),
        prompt_template=message.prompt_template,
        label_words=tuple(message.label_words),
        text_field=message.text_field,
        label_field=message.label_field,
        target_field=message.target_field,
        max_new_tokens=message.max_new_tokens,
        answer_extractor=message.answer_extractor,
        answer_match=message.answer_match,
        kl_weight=message.kl_weight,
        kl_prompts=message.kl_prompts,
    )
    check_fitness(where, spec)
    return spec


# -- BatchSpec ---------------------------------------------------------------------------
def check_batch(where: str, spec: BatchSpec) -> None:
    _enum_to_proto(f"{where}.mode", _BATCH_MODES, spec.mode)
    _check_int(f"{where}.batch_size", spec.batch_size, 1, MAX_BATCH_SIZE)


def batch_to_proto(spec: BatchSpec, where: str = "BatchSpec") -> pb.BatchSpec:
    check_batch(where, spec)
    return pb.BatchSpec(mode=_BATCH_MODES[spec.mode], batch_size=int(spec.batch_size))


def batch_from_proto(message: pb.BatchSpec, where: str = "BatchSpec") -> BatchSpec:
    spec = BatchSpec(
        mode=_enum_from_proto(f"{where}.mode", _BATCH_MODES, message.mode),
        batch_size=message.batch_size,
    )
    check_batch(where, spec)
    return spec


# -- DpSpec ------------------------------------------------------------------------------
def _check_dp(where: str, spec: DpSpec) -> None:
    _check_real(f"{where}.epsilon", spec.epsilon, 0.0, MAX_EPSILON)
    _check_real(f"{where}.delta", spec.delta, 0.0, 1.0)
    if spec.delta >= 1.0:
        _fail(f"{where}.delta", f"must be < 1 (got {_show(spec.delta)})")
    _check_real(f"{where}.noise_multiplier", spec.noise_multiplier, 0.0, MAX_NOISE_MULTIPLIER)
    _check_real(f"{where}.clip", spec.clip, 0.0, MAX_ABS_SCALE)
    if spec.clip <= 0:
        _fail(f"{where}.clip", f"must be > 0 (got {_show(spec.clip)})")
    _check_int(f"{where}.quantization_bits", spec.quantization_bits, 0, MAX_QUANTIZATION_BITS)
    _check_real(f"{where}.quantization_range", spec.quantization_range, 0.0, MAX_ABS_SCALE)
    if spec.quantization_range <= 0:
        _fail(f"{where}.quantization_range", f"must be > 0 (got {_show(spec.quantization_range)})")
    _check_real(
        f"{where}.randomized_response_epsilon",
        spec.randomized_response_epsilon,
        0.0,
        MAX_RANDOMIZED_RESPONSE_EPSILON,
    )
    _check_int(f"{where}.chunks", spec.chunks, 0, MAX_CHUNKS)
    _check_real(f"{where}.vote_noise", spec.vote_noise, 0.0, MAX_VOTE_NOISE)
    _check_real(f"{where}.keep_margin", spec.keep_margin, 0.0, MAX_KEEP_MARGIN)


def dp_to_proto(spec: DpSpec, where: str = "DpSpec") -> pb.DpSpec:
    _check_dp(where, spec)
    return pb.DpSpec(
        epsilon=float(spec.epsilon),
        delta=float(spec.delta),
        noise_multiplier=float(spec.noise_multiplier),
        clip=float(spec.clip),
        quantization_bits=int(spec.quantization_bits),
        quantization_range=float(spec.quantization_range),
        randomized_response_epsilon=float(spec.randomized_response_epsilon),
        chunks=int(spec.chunks),
        vote_noise=float(spec.vote_noise),
        keep_margin=float(spec.keep_margin),
    )


def dp_from_proto(message: pb.DpSpec, where: str = "DpSpec") -> DpSpec:
    spec = DpSpec(
        epsilon=message.epsilon,
        delta=message.delta,
        noise_multiplier=message.noise_multiplier,
        clip=message.clip,
        quantization_bits=message.quantization_bits,
        quantization_range=message.quantization_range,
        randomized_response_epsilon=message.randomized_response_epsilon,
        chunks=message.chunks,
        vote_noise=message.vote_noise,
        keep_margin=message.keep_margin,
    )
    _check_dp(where, spec)
    return spec


# -- RunSpec -----------------------------------------------------------------------------
def _check_run_spec_scalars(where: str, spec: RunSpec) -> None:
    _check_id(f"{where}.run_id", spec.run_id)
    _check_text(f"{where}.algorithm", spec.algorithm, min_len=1, max_len=MAX_NAME_LENGTH)
    _check_fingerprint(f"{where}.model_fingerprint", spec.model_fingerprint)
    _enum_to_proto(f"{where}.answer_kind", _ANSWER_KINDS, spec.answer_kind)
    _check_real(f"{where}.bit_budget", spec.bit_budget, 0.0, MAX_BITS)
    _check_int(f"{where}.max_rounds", spec.max_rounds, 0, MAX_COUNT)
    _check_hash(f"{where}.log_genesis", spec.log_genesis)
    _check_int(f"{where}.direction_seed", spec.direction_seed, 0, UINT64_MAX)
    _check_int(f"{where}.rank_depth", spec.rank_depth, 0, MAX_LAMBDA)


def run_spec_to_proto(spec: RunSpec, where: str = "RunSpec") -> pb.RunSpec:
    _check_run_spec_scalars(where, spec)
    return pb.RunSpec(
        run_id=spec.run_id,
        algorithm=spec.algorithm,
        model_fingerprint=spec.model_fingerprint,
        parametrization=parametrization_to_proto(spec.parametrization, f"{where}.parametrization"),
        fitness=fitness_to_proto(spec.fitness, f"{where}.fitness"),
        batch=batch_to_proto(spec.batch, f"{where}.batch"),
        answer_kind=_ANSWER_KINDS[spec.answer_kind],
        bit_budget=float(spec.bit_budget),
        max_rounds=int(spec.max_rounds),
        log_genesis=spec.log_genesis,
        dp=dp_to_proto(spec.dp, f"{where}.dp"),
        direction_seed=int(spec.direction_seed),
        rank_depth=int(spec.rank_depth),
    )


def run_spec_from_proto(message: pb.RunSpec, where: str = "RunSpec") -> RunSpec:
    for name in ("parametrization", "fitness", "batch", "dp"):
        _required(where, message, name)
    spec = RunSpec(
        run_id=message.run_id,
        algorithm=message.algorithm,
        model_fingerprint=message.model_fingerprint,
        parametrization=parametrization_from_proto(
            message.parametrization, f"{where}.parametrization"
        ),
        fitness=fitness_from_proto(message.fitness, f"{where}.fitness"),
        batch=batch_from_proto(message.batch, f"{where}.batch"),
        answer_kind=_enum_from_proto(f"{where}.answer_kind", _ANSWER_KINDS, message.answer_kind),
        bit_budget=message.bit_budget,
        max_rounds=message.max_rounds,
        log_genesis=message.log_genesis,
        dp=dp_from_proto(message.dp, f"{where}.dp"),
        direction_seed=message.direction_seed,
        rank_depth=message.rank_depth,
    )
    _check_run_spec_scalars(where, spec)
    return spec


# -- Step and Candidate ------------------------------------------------------------------
def _check_seeded(where: str, seed: object, factor: object, factor_name: str) -> None:
    _check_int(f"{where}.seed", seed, 0, UINT64_MAX)
    _check_float32(f"{where}.{factor_name}", factor)


def _check_delta(
    where: str, delta: Sequence[object] | None, seed: object, factor: object, factor_name: str
) -> tuple[float, ...] | None:
    """An explicit delta (CMA): seed 0, factor 1, 1..MAX_EXPLICIT_DIMENSION finite float32s."""
    if delta is None or not len(delta):
        return None
    _check_length(f"{where}.delta", delta, 1, MAX_EXPLICIT_DIMENSION)
    if seed != 0 or factor != 1.0:
        _fail(where, f"an explicit delta needs seed 0 and {factor_name} 1")
    values = []
    for i, raw in enumerate(delta):
        if isinstance(raw, bool) or not isinstance(raw, float | int | np.floating):
            _fail(f"{where}.delta[{i}]", f"{_show(raw)} is not a number")
        value = float(np.float32(raw))  # what a proto float carries
        if not math.isfinite(value):
            _fail(f"{where}.delta[{i}]", f"{_show(raw)} is not a finite float32")
        values.append(value)
        if float(raw) != value:
            _fail(f"{where}.delta[{i}]", f"{_show(raw)} is not exactly a float32")
    return tuple(values)


def _check_delta_total(where: str, items: Sequence[Step] | Sequence[Candidate]) -> None:
    """Explicit deltas in one message stay within MAX_DELTA_FLOATS (a few MiB)."""
    total = sum(len(item.delta or ()) for item in items)
    if total > MAX_DELTA_FLOATS:
        _fail(where, f"{total} explicit delta floats, expected <= {MAX_DELTA_FLOATS}")


def _proto_delta_total(where: str, *groups: Sequence[pb.Step] | Sequence[pb.Candidate]) -> None:
    total = sum(len(item.delta) for group in groups for item in group)
    if total > MAX_DELTA_FLOATS:
        _fail(where, f"{total} explicit delta floats, expected <= {MAX_DELTA_FLOATS}")


def step_to_proto(step: Step, where: str = "Step") -> pb.Step:
    _check_seeded(where, step.seed, step.coefficient, "coefficient")
    delta = _check_delta(where, step.delta, step.seed, step.coefficient, "coefficient")
    return pb.Step(seed=int(step.seed), coefficient=float(step.coefficient), delta=delta or ())


def step_from_proto(message: pb.Step, where: str = "Step") -> Step:
    # Checked before construction: Step's own check would raise a LogIntegrityError.
    _check_seeded(where, message.seed, message.coefficient, "coefficient")
    delta = _check_delta(where, message.delta, message.seed, message.coefficient, "coefficient")
    return Step(seed=message.seed, coefficient=message.coefficient, delta=delta)


def candidate_to_proto(candidate: Candidate, where: str = "Candidate") -> pb.Candidate:
    _check_seeded(where, candidate.seed, candidate.scale, "scale")
    delta = _check_delta(where, candidate.delta, candidate.seed, candidate.scale, "scale")
    return pb.Candidate(seed=int(candidate.seed), scale=float(candidate.scale), delta=delta or ())


def candidate_from_proto(message: pb.Candidate, where: str = "Candidate") -> Candidate:
    _check_seeded(where, message.seed, message.scale, "scale")
    delta = _check_delta(where, message.delta, message.seed, message.scale, "scale")
    return Candidate(seed=message.seed, scale=message.scale, delta=delta)


# -- Task --------------------------------------------------------------------------------
def _check_task_scalars(where: str, task: Task, n_steps: int, n_candidates: int) -> None:
    _check_id(f"{where}.task_id", task.task_id)
    _check_id(f"{where}.run_id", task.run_id)
    _check_int(f"{where}.round_index", task.round_index, 0, MAX_COUNT)
    _check_int(f"{where}.base_version", task.base_version, 0, MAX_COUNT - n_steps)
    _check_hash(f"{where}.log_head", task.log_head)
    kind = task.answer_kind
    _enum_to_proto(f"{where}.answer_kind", _ANSWER_KINDS, kind)
    if kind is AnswerKind.COMPARE and n_candidates != 1:
        _fail(f"{where}.candidates", f"a compare task has exactly 1 candidate, not {n_candidates}")
    _check_real(f"{where}.deadline_unix", task.deadline_unix, 0.0, MAX_DEADLINE_UNIX)
    explicit = {candidate.delta is not None for candidate in task.candidates}
    if len(explicit) > 1:
        _fail(f"{where}.candidates", "mixes explicit and seeded candidates")
    _check_delta_total(f"{where}.new_steps", task.new_steps)
    _check_delta_total(f"{where}.candidates", task.candidates)
    if kind is AnswerKind.RANKING and n_candidates < 2:
        _fail(f"{where}.candidates", "a ranking task has >= 2 candidates")


def _check_task_lengths(where: str, steps: Sized, candidates: Sized) -> None:
    """Checked first, so an oversized message is rejected before any per-item work."""
    _check_length(f"{where}.new_steps", steps, 0, MAX_NEW_STEPS)
    _check_length(f"{where}.candidates", candidates, 1, MAX_LAMBDA)


def task_to_proto(task: Task, where: str = "Task") -> pb.Task:
    _check_task_lengths(where, task.new_steps, task.candidates)
    _check_task_scalars(where, task, len(task.new_steps), len(task.candidates))
    return pb.Task(
        task_id=task.task_id,
        run_id=task.run_id,
        round_index=int(task.round_index),
        base_version=int(task.base_version),
        new_steps=[
            step_to_proto(s, f"{where}.new_steps[{i}]") for i, s in enumerate(task.new_steps)
        ],
        log_head=task.log_head,
        candidates=[
            candidate_to_proto(c, f"{where}.candidates[{i}]") for i, c in enumerate(task.candidates)
        ],
        answer_kind=_ANSWER_KINDS[task.answer_kind],
        batch=batch_to_proto(task.batch, f"{where}.batch"),
        deadline_unix=float(task.deadline_unix),
    )


def task_from_proto(message: pb.Task, where: str = "Task") -> Task:
    _check_task_lengths(where, message.new_steps, message.candidates)
    _proto_delta_total(where, message.new_steps, message.candidates)
    _required(where, message, "batch")
    task = Task(
        task_id=message.task_id,
        run_id=message.run_id,
        round_index=message.round_index,
        base_version=message.base_version,
        new_steps=tuple(
            step_from_proto(s, f"{where}.new_steps[{i}]") for i, s in enumerate(message.new_steps)
        ),
        log_head=message.log_head,
        candidates=tuple(
            candidate_from_proto(c, f"{where}.candidates[{i}]")
            for i, c in enumerate(message.candidates)
        ),
        answer_kind=_enum_from_proto(f"{where}.answer_kind", _ANSWER_KINDS, message.answer_kind),
        batch=batch_from_proto(message.batch, f"{where}.batch"),
        deadline_unix=message.deadline_unix,
    )
    _check_task_scalars(where, task, len(task.new_steps), len(task.candidates))
    return task


# -- Answer ------------------------------------------------------------------------------
def _check_answer(where: str, answer: Answer) -> None:
    _check_id(f"{where}.task_id", answer.task_id)
    outcomes = [
        x is not None for x in (answer.choice, answer.value, answer.refusal, answer.ranking)
    ]
    if sum(outcomes) != 1:
        _fail(where, "exactly one of choice, value, ranking and refusal must be set")
    if answer.choice is not None:
        _check_int(f"{where}.choice", answer.choice, 0, MAX_CHOICE)
    elif answer.value is not None:
        _check_float32(f"{where}.value", answer.value)
    elif answer.ranking is not None:
        _check_ranking(f"{where}.ranking", answer.ranking)
    else:
        _check_refusal(f"{where}.refusal", answer.refusal)


def _check_ranking(where: str, ranking: Sequence[object]) -> None:
    """1..MAX_LAMBDA distinct candidate indexes below MAX_LAMBDA (the task checks the rest)."""
    _check_length(where, ranking, 1, MAX_LAMBDA)
    for i, index in enumerate(ranking):
        _check_int(f"{where}[{i}]", index, 0, MAX_LAMBDA - 1)
    if len(set(ranking)) != len(ranking):
        _fail(where, "names a candidate twice")


def _check_refusal(where: str, value: object) -> RefusalCode:
    """A refusal is one of the reason codes, nothing else: free text could carry data."""
    text = _check_str(where, value)
    try:
        return RefusalCode(text)
    except ValueError:
        _fail(where, f"{_show(text)} is not a reason code ({_names_of(RefusalCode)})")


def _names_of(codes: type[RefusalCode]) -> str:
    return "/".join(code.value for code in codes)


def answer_to_proto(answer: Answer, where: str = "Answer") -> pb.Answer:
    _check_answer(where, answer)
    if answer.choice is not None:
        return pb.Answer(task_id=answer.task_id, choice=int(answer.choice))
    if answer.value is not None:
        return pb.Answer(task_id=answer.task_id, value=float(answer.value))
    if answer.ranking is not None:
        ranking = pb.Ranking(order=[int(i) for i in answer.ranking])
        return pb.Answer(task_id=answer.task_id, ranking=ranking)
    return pb.Answer(task_id=answer.task_id, refusal=str(answer.refusal))


def answer_from_proto(message: pb.Answer, where: str = "Answer") -> Answer:
    outcome = message.WhichOneof("outcome")
    if outcome is None:
        _fail(where, "none of choice, value and refusal is set")
    if outcome == "choice":
        answer = Answer(task_id=message.task_id, choice=message.choice)
    elif outcome == "value":
        answer = Answer(task_id=message.task_id, choice=None, value=message.value)
    elif outcome == "ranking":
        _check_length(f"{where}.ranking.order", message.ranking.order, 1, MAX_LAMBDA)
        ranking = tuple(message.ranking.order)
        answer = Answer(task_id=message.task_id, choice=None, ranking=ranking)
    else:
        code = _check_refusal(f"{where}.refusal", message.refusal)
        answer = Answer(task_id=message.task_id, choice=None, refusal=code)
    _check_answer(where, answer)
    return answer


# -- RunFinished -------------------------------------------------------------------------
def _check_run_finished(where: str, finished: RunFinished) -> None:
    _check_id(f"{where}.run_id", finished.run_id)
    _check_text(f"{where}.reason", finished.reason, max_len=MAX_REASON_LENGTH)
    _check_int(f"{where}.final_version", finished.final_version, 0, MAX_COUNT)
    _check_hash(f"{where}.log_head", finished.log_head)
    _check_real(f"{where}.bits_spent_total", finished.bits_spent_total, 0.0, MAX_BITS)
    _check_int(f"{where}.base_version", finished.base_version, 0, MAX_COUNT)
    _check_delta_total(f"{where}.new_steps", finished.new_steps)
    if finished.base_version + len(finished.new_steps) != finished.final_version:
        _fail(
            f"{where}.new_steps",
            f"{len(finished.new_steps)} steps from version {finished.base_version} "
            f"do not reach final_version {finished.final_version}",
        )


def run_finished_to_proto(finished: RunFinished, where: str = "RunFinished") -> pb.RunFinished:
    _check_length(f"{where}.new_steps", finished.new_steps, 0, MAX_NEW_STEPS)
    _check_run_finished(where, finished)
    return pb.RunFinished(
        run_id=finished.run_id,
        reason=finished.reason,
        final_version=int(finished.final_version),
        log_head=finished.log_head,
        bits_spent_total=float(finished.bits_spent_total),
        base_version=int(finished.base_version),
        new_steps=[
            step_to_proto(s, f"{where}.new_steps[{i}]") for i, s in enumerate(finished.new_steps)
        ],
    )


def run_finished_from_proto(message: pb.RunFinished, where: str = "RunFinished") -> RunFinished:
    _check_length(f"{where}.new_steps", message.new_steps, 0, MAX_NEW_STEPS)
    _proto_delta_total(where, message.new_steps)
    finished = RunFinished(
        run_id=message.run_id,
        reason=message.reason,
        final_version=message.final_version,
        log_head=message.log_head,
        bits_spent_total=message.bits_spent_total,
        base_version=message.base_version,
        new_steps=tuple(
            step_from_proto(s, f"{where}.new_steps[{i}]") for i, s in enumerate(message.new_steps)
        ),
    )
    _check_run_finished(where, finished)
    return finished


# -- JoinRequest -------------------------------------------------------------------------
def _check_join_request(where: str, request: JoinRequest) -> None:
    _check_id(f"{where}.holder_id", request.holder_id)
    _check_fingerprint(f"{where}.model_fingerprint", request.model_fingerprint)
    summary = request.policy_summary
    if not isinstance(summary, Mapping):
        _fail(f"{where}.policy_summary", f"expected a mapping, got {type(summary).__name__}")
    if len(summary) > MAX_POLICY_ENTRIES:
        _fail(
            f"{where}.policy_summary", f"{len(summary)} entries, expected <= {MAX_POLICY_ENTRIES}"
        )
    for key, value in summary.items():
        key_where = f"{where}.policy_summary key"
        _check_text(key_where, key, min_len=1, max_len=MAX_NAME_LENGTH)
        _check_text(f"{where}.policy_summary[{key!r}]", value, max_len=MAX_TEXT_LENGTH)


def join_request_to_proto(request: JoinRequest, where: str = "JoinRequest") -> pb.JoinRequest:
    _check_join_request(where, request)
    return pb.JoinRequest(
        holder_id=request.holder_id,
        model_fingerprint=request.model_fingerprint,
        policy_summary=dict(request.policy_summary),
    )


def join_request_from_proto(message: pb.JoinRequest, where: str = "JoinRequest") -> JoinRequest:
    if len(message.policy_summary) > MAX_POLICY_ENTRIES:
        _fail(f"{where}.policy_summary", f"more than {MAX_POLICY_ENTRIES} entries")
    request = JoinRequest(
        holder_id=message.holder_id,
        model_fingerprint=message.model_fingerprint,
        policy_summary=dict(message.policy_summary),
    )
    _check_join_request(where, request)
    return request


# -- call envelopes ----------------------------------------------------------------------
def _check_credentials(where: str, credentials: Credentials) -> None:
    _check_id(f"{where}.holder_id", credentials.holder_id)
    _check_session(f"{where}.session", credentials.session)


def join_reply_to_proto(spec: RunSpec, session: str) -> pb.JoinReply:
    _check_session("JoinReply.session", session)
    return pb.JoinReply(spec=run_spec_to_proto(spec, "JoinReply.spec"), session=session)


def join_reply_from_proto(message: pb.JoinReply) -> tuple[RunSpec, str]:
    """The run the holder is asked to join and the session token for its later calls."""
    _required("JoinReply", message, "spec")
    spec = run_spec_from_proto(message.spec, "JoinReply.spec")
    return spec, _check_session("JoinReply.session", message.session)


def pull_task_request_to_proto(call: PullTaskCall) -> pb.PullTaskRequest:
    where = "PullTaskRequest"
    _check_credentials(where, call.credentials)
    _check_int(f"{where}.have_version", call.have_version, 0, MAX_COUNT)
    _check_hash(f"{where}.have_head", call.have_head)
    wait_ms = round(_check_real(f"{where}.wait_s", call.wait_s, 0.0, MAX_WAIT_MS / 1000) * 1000)
    return pb.PullTaskRequest(
        holder_id=call.credentials.holder_id,
        session=call.credentials.session,
        have_version=int(call.have_version),
        have_head=call.have_head,
        wait_ms=wait_ms,
    )


def pull_task_request_from_proto(message: pb.PullTaskRequest) -> PullTaskCall:
    where = "PullTaskRequest"
    credentials = Credentials(holder_id=message.holder_id, session=message.session)
    _check_credentials(where, credentials)
    return PullTaskCall(
        credentials=credentials,
        have_version=_check_int(f"{where}.have_version", message.have_version, 0, MAX_COUNT),
        have_head=_check_hash(f"{where}.have_head", message.have_head),
        wait_s=_check_int(f"{where}.wait_ms", message.wait_ms, 0, MAX_WAIT_MS) / 1000,
    )


def pull_task_reply_to_proto(result: Task | RunFinished | None) -> pb.PullTaskReply:
    """The coordinator's answer to a PullTask: a task, the end of the run, or nothing yet."""
    if result is None:
        return pb.PullTaskReply(nothing=pb.NoTask())
    if isinstance(result, Task):
        return pb.PullTaskReply(task=task_to_proto(result, "PullTaskReply.task"))
    if isinstance(result, RunFinished):
        return pb.PullTaskReply(finished=run_finished_to_proto(result, "PullTaskReply.finished"))
    _fail("PullTaskReply", f"cannot carry a {type(result).__name__}")


class TaskReplies:
    """Encoded PullTask replies, by everything their task says but its id.

    A round's task differs from one holder to the next only by its id (holders at the same
    log version get the same steps, candidates, batch and deadline), so at 1,000 holders the
    whole task is bounds-checked and encoded once per round and version, and each holder's
    copy gets its own (checked) id: about 2 us a holder instead of 17. Only the last few
    tasks are kept.
    """

    def __init__(self, size: int = 8):
        self._size = size
        self._encoded: dict[tuple[object, ...], pb.PullTaskReply] = {}

    def encode(self, result: Task | RunFinished | None) -> pb.PullTaskReply:
        """What :func:`pull_task_reply_to_proto` returns for ``result``."""
        if not isinstance(result, Task):
            return pull_task_reply_to_proto(result)
        key = tuple(getattr(result, name) for name in _TASK_FIELDS_BUT_ID)
        encoded = self._encoded.get(key)
        if encoded is None:
            encoded = pull_task_reply_to_proto(result)
            if len(self._encoded) >= self._size:
                self._encoded.pop(next(iter(self._encoded)))  # the oldest
            self._encoded[key] = encoded
            return encoded
        reply = pb.PullTaskReply()
        reply.CopyFrom(encoded)
        reply.task.task_id = _check_id("PullTaskReply.task.task_id", result.task_id)
        return reply


_TASK_FIELDS_BUT_ID = tuple(f.name for f in dataclasses.fields(Task) if f.name != "task_id")


def pull_task_reply_from_proto(message: pb.PullTaskReply) -> Task | RunFinished | None:
    which = message.WhichOneof("reply")
    if which == "task":
        return task_from_proto(message.task, "PullTaskReply.task")
    if which == "finished":
        return run_finished_from_proto(message.finished, "PullTaskReply.finished")
    if which == "nothing":
        return None
    _fail("PullTaskReply.reply", "none of task, finished, nothing is set")


def push_answer_request_to_proto(call: PushAnswerCall) -> pb.PushAnswerRequest:
    _check_credentials("PushAnswerRequest", call.credentials)
    return pb.PushAnswerRequest(
        holder_id=call.credentials.holder_id,
        session=call.credentials.session,
        answer=answer_to_proto(call.answer, "PushAnswerRequest.answer"),
    )


def push_answer_request_from_proto(message: pb.PushAnswerRequest) -> PushAnswerCall:
    credentials = Credentials(holder_id=message.holder_id, session=message.session)
    _check_credentials("PushAnswerRequest", credentials)
    _required("PushAnswerRequest", message, "answer")
    answer = answer_from_proto(message.answer, "PushAnswerRequest.answer")
    return PushAnswerCall(credentials=credentials, answer=answer)


def leave_request_to_proto(credentials: Credentials) -> pb.LeaveRequest:
    _check_credentials("LeaveRequest", credentials)
    return pb.LeaveRequest(holder_id=credentials.holder_id, session=credentials.session)


def leave_request_from_proto(message: pb.LeaveRequest) -> Credentials:
    credentials = Credentials(holder_id=message.holder_id, session=message.session)
    _check_credentials("LeaveRequest", credentials)
    return credentials


# -- the Session stream: PullTask and PushAnswer exchanges as messages -------------------
_NO_CALL = "carries no call (neither push nor pull is set)"


def session_request(
    *, push: pb.PushAnswerRequest | None = None, pull: pb.PullTaskRequest | None = None
) -> pb.SessionRequest:
    """One message of a Session stream: an encoded PushAnswer, PullTask, or both (the
    answer, then the wait for the next task)."""
    if push is None and pull is None:
        _fail("SessionRequest", _NO_CALL)
    return pb.SessionRequest(push=push, pull=pull)


def session_calls(message: pb.SessionRequest) -> list[tuple[str, Message]]:
    """The calls one Session message carries, in the order they are served (an answer
    before the wait for the next task): [(unary method name, its request)], at least one."""
    calls: list[tuple[str, Message]] = []
    if message.HasField("push"):
        calls.append(("PushAnswer", message.push))
    if message.HasField("pull"):
        calls.append(("PullTask", message.pull))
    if not calls:
        _fail("SessionRequest", _NO_CALL)
    return calls


def session_reply(replies: Sequence[tuple[str, Message]]) -> pb.SessionReply:
    """The Session message that answers a request: the reply of each call it carried."""
    wrapped = pb.SessionReply()
    for method, reply in replies:
        if isinstance(reply, pb.PushAnswerReply) and method == "PushAnswer":
            wrapped.pushed.CopyFrom(reply)
        elif isinstance(reply, pb.PullTaskReply) and method == "PullTask":
            wrapped.pulled.CopyFrom(reply)
        else:
            _fail("SessionReply", f"cannot carry a {type(reply).__name__} for {method}")
    return wrapped


def session_replies(
    message: pb.SessionReply, request: pb.SessionRequest
) -> tuple[pb.PushAnswerReply | None, pb.PullTaskReply | None]:
    """(the PushAnswer reply, the PullTask reply) a Session message brings for ``request``:
    exactly the replies of the calls it carried (a coordinator that answers with any other
    set breaks the protocol)."""
    asked = _replies_named(request.HasField("push"), request.HasField("pull"))
    given = _replies_named(message.HasField("pushed"), message.HasField("pulled"))
    if given != asked:
        _fail(
            "SessionReply",
            f"carries {' and '.join(given) or 'nothing'} for a request that asked for "
            f"{' and '.join(asked)}",
        )
    pushed = message.pushed if message.HasField("pushed") else None
    pulled = message.pulled if message.HasField("pulled") else None
    return pushed, pulled


def _replies_named(push: bool, pull: bool) -> list[str]:
    """The replies a Session message carries (or its request asks for), in words."""
    return [
        name
        for name, present in (("a PushAnswer reply", push), ("a PullTask reply", pull))
        if present
    ]
