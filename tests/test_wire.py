"""Wire conversions: every message round-trips through bytes, and every bound is enforced."""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest

from sottovoce.common.errors import RefusalCode
from sottovoce.common.parametrizations.base import ParametrizationSpec
from sottovoce.common.proto import sottovoce_pb2 as pb
from sottovoce.common.protocol.answers import AnswerKind
from sottovoce.common.protocol.limits import (
    MAX_CHOICE,
    MAX_LAMBDA,
    MAX_MESSAGE_BYTES,
    MAX_NEW_STEPS,
    UINT64_MAX,
)
from sottovoce.common.protocol.messages import (
    Answer,
    BatchSpec,
    Candidate,
    DpSpec,
    FitnessSpec,
    JoinRequest,
    RunFinished,
    RunSpec,
    Task,
)
from sottovoce.common.steplog import Step, as_float32, extend_chain, genesis_hash
from sottovoce.common.transport import wire
from sottovoce.common.transport.wire import Credentials, PullTaskCall, PushAnswerCall, WireError

FINGERPRINT = "sha256:" + "ab" * 32
GENESIS = genesis_hash(FINGERPRINT, ParametrizationSpec().canonical_id())
SESSION = secrets.token_urlsafe(24)  # what the server's Join hands out
CREDENTIALS = Credentials(holder_id="holder-1", session=SESSION)

STEPS = (Step(seed=UINT64_MAX, coefficient=0.5), Step(seed=0, coefficient=-1.25))
HEAD = extend_chain(GENESIS, 7, STEPS)

SPEC = RunSpec(
    run_id="run.2024-01:a",
    algorithm="bboxer-1+1",
    model_fingerprint=FINGERPRINT,
    parametrization=ParametrizationSpec(
        kind="select", patterns=("*.norm.weight", "lm_head.*"), last_k_blocks=2
    ),
    fitness=FitnessSpec(prompt_template="Q: {text}\n\tA:", label_words=(" no", " yes")),
    batch=BatchSpec(mode="full", batch_size=1),
    answer_kind=AnswerKind.COMPARE,
    bit_budget=300.0,
    max_rounds=300,
    log_genesis=GENESIS,
    direction_seed=UINT64_MAX - 5,
)
TASK = Task(
    task_id="run.2024-01:a:r9:holder-1",
    run_id=SPEC.run_id,
    round_index=9,
    base_version=7,
    new_steps=STEPS,
    log_head=HEAD,
    candidates=(Candidate(seed=2**63 + 5, scale=as_float32(0.001)),),
    answer_kind=AnswerKind.COMPARE,
    batch=BatchSpec(),
    deadline_unix=1.7e9,
)
BEST_OF_TASK = replace(
    TASK,
    answer_kind=AnswerKind.BEST_OF,
    candidates=tuple(Candidate(seed=i, scale=-0.125) for i in range(MAX_LAMBDA)),
    new_steps=(),
    base_version=0,
    log_head=GENESIS,
)
ANSWER = Answer(task_id=TASK.task_id, choice=1)
REFUSAL = Answer(task_id=TASK.task_id, choice=None, refusal=RefusalCode.POLICY)
FINISHED = RunFinished(
    run_id=SPEC.run_id,
    reason="bit budget spent",
    final_version=9,
    log_head=HEAD,
    bits_spent_total=300,
    base_version=7,
    new_steps=(Step(seed=3, coefficient=0.25), Step(seed=2**64 - 1, coefficient=-0.5)),
)
JOIN = JoinRequest(
    holder_id="holder-1", model_fingerprint=FINGERPRINT, policy_summary={"max_bits": "300"}
)


def through_bytes(message: Any) -> Any:
    """What the peer parses: the message serialized and read back."""
    return type(message).FromString(message.SerializeToString())


# -- round trips -------------------------------------------------------------------------
Codec = tuple[Callable[[Any], Any], Callable[[Any], Any]]
PARAMETRIZATION: Codec = (wire.parametrization_to_proto, wire.parametrization_from_proto)
FITNESS: Codec = (wire.fitness_to_proto, wire.fitness_from_proto)
BATCH: Codec = (wire.batch_to_proto, wire.batch_from_proto)
RUN_SPEC: Codec = (wire.run_spec_to_proto, wire.run_spec_from_proto)
STEP: Codec = (wire.step_to_proto, wire.step_from_proto)
CANDIDATE: Codec = (wire.candidate_to_proto, wire.candidate_from_proto)
TASK_CODEC: Codec = (wire.task_to_proto, wire.task_from_proto)
ANSWER_CODEC: Codec = (wire.answer_to_proto, wire.answer_from_proto)
FINISHED_CODEC: Codec = (wire.run_finished_to_proto, wire.run_finished_from_proto)
JOIN_CODEC: Codec = (wire.join_request_to_proto, wire.join_request_from_proto)
PULL: Codec = (wire.pull_task_request_to_proto, wire.pull_task_request_from_proto)
PULL_REPLY: Codec = (wire.pull_task_reply_to_proto, wire.pull_task_reply_from_proto)
PUSH: Codec = (wire.push_answer_request_to_proto, wire.push_answer_request_from_proto)
LEAVE: Codec = (wire.leave_request_to_proto, wire.leave_request_from_proto)

SUBSPACE = ParametrizationSpec(
    kind="subspace",
    dimension=4096,
    projection_seed=UINT64_MAX,
    granularity="tensor",
    last_k_blocks=0,
)
ROUND_TRIPS: dict[str, tuple[object, Codec]] = {
    "parametrization": (SPEC.parametrization, PARAMETRIZATION),
    "parametrization-defaults": (ParametrizationSpec(), PARAMETRIZATION),
    "parametrization-subspace": (SUBSPACE, PARAMETRIZATION),
    "fitness": (SPEC.fitness, FITNESS),
    "fitness-completion": (FitnessSpec(kind="completion", label_words=()), FITNESS),
    "fitness-generation": (
        FitnessSpec(
            kind="generation",
            label_words=(),
            max_new_tokens=256,
            answer_extractor="gsm8k",
            answer_match="numeric",
        ),
        FITNESS,
    ),
    "parametrization-lora": (
        ParametrizationSpec(kind="lora", patterns=("*o_proj*",), rank=1, dimension=64),
        PARAMETRIZATION,
    ),
    "run-spec-ranking": (
        replace(SPEC, algorithm="es-mu-lambda", answer_kind=AnswerKind.RANKING, rank_depth=3),
        RUN_SPEC,
    ),
    "step-explicit": (Step.explicit((0.5, -0.25, 0.0)), STEP),
    "candidate-explicit": (Candidate.explicit((0.125, 1.5)), CANDIDATE),
    "answer-ranking": (Answer(task_id="t", choice=None, ranking=(2, 0, 1)), ANSWER_CODEC),
    "fitness-penalized": (FitnessSpec(kl_weight=0.25, kl_prompts=16), FITNESS),
    "batch": (BatchSpec(mode="minibatch", batch_size=1_000_000), BATCH),
    "run-spec": (SPEC, RUN_SPEC),
    "step": (STEPS[0], STEP),
    "candidate": (TASK.candidates[0], CANDIDATE),
    "task-compare": (TASK, TASK_CODEC),
    "task-best-of": (BEST_OF_TASK, TASK_CODEC),
    "answer": (ANSWER, ANSWER_CODEC),
    "answer-zero": (Answer(task_id="t", choice=0), ANSWER_CODEC),
    "answer-dp-scalar": (Answer(task_id="t", choice=None, value=-0.375), ANSWER_CODEC),
    "answer-quantized-level": (Answer(task_id="t", choice=MAX_CHOICE), ANSWER_CODEC),
    "run-spec-dp": (
        replace(
            SPEC,
            algorithm="dpzero",
            answer_kind=AnswerKind.DP_SCALAR,
            batch=BatchSpec(mode="poisson", batch_size=16),
            dp=DpSpec(
                epsilon=2.0, delta=1e-5, noise_multiplier=3.25, clip=2.0, quantization_bits=4
            ),
        ),
        RUN_SPEC,
    ),
    "run-spec-randomized-response": (
        replace(SPEC, dp=DpSpec(delta=1e-6, randomized_response_epsilon=0.5)),
        RUN_SPEC,
    ),
    "run-spec-chunk-votes": (
        replace(
            SPEC,
            dp=DpSpec(epsilon=6.0, delta=1e-5, chunks=256, vote_noise=14.25, keep_margin=7.5),
        ),
        RUN_SPEC,
    ),
    "refusal": (REFUSAL, ANSWER_CODEC),
    "run-finished": (FINISHED, FINISHED_CODEC),
    "join-request": (JOIN, JOIN_CODEC),
    "pull-task-request": (PullTaskCall(CREDENTIALS, 7, HEAD, wait_s=20.0), PULL),
    "pull-task-reply-task": (TASK, PULL_REPLY),
    "pull-task-reply-finished": (FINISHED, PULL_REPLY),
    "pull-task-reply-nothing": (None, PULL_REPLY),
    "push-answer-request": (PushAnswerCall(credentials=CREDENTIALS, answer=REFUSAL), PUSH),
    "leave-request": (CREDENTIALS, LEAVE),
}


@pytest.mark.parametrize(("value", "codec"), ROUND_TRIPS.values(), ids=ROUND_TRIPS.keys())
def test_round_trip(value: object, codec: Codec) -> None:
    encode, decode = codec
    assert decode(through_bytes(encode(value))) == value


def test_join_reply_round_trip() -> None:
    message = through_bytes(wire.join_reply_to_proto(SPEC, SESSION))
    assert wire.join_reply_from_proto(message) == (SPEC, SESSION)


def test_step_coefficient_keeps_its_float32_bits() -> None:
    coefficient = float.fromhex("0x1.fffffep-3")  # not representable in fewer bits
    step = Step(seed=3, coefficient=coefficient)
    assert wire.step_from_proto(through_bytes(wire.step_to_proto(step))).payload() == step.payload()


def test_seeds_cross_as_full_uint64() -> None:
    message = through_bytes(wire.task_to_proto(TASK))
    assert message.new_steps[0].seed == UINT64_MAX
    assert message.candidates[0].seed == 2**63 + 5


# -- answers stay tiny (<= 200 bytes per answer) ------------------------------------------
def push_bytes(holder_id: str, task_id: str, choice: int) -> int:
    call = PushAnswerCall(
        credentials=Credentials(holder_id=holder_id, session=SESSION),
        answer=Answer(task_id=task_id, choice=choice),
    )
    return len(wire.push_answer_request_to_proto(call).SerializeToString())


def test_push_answer_request_is_at_most_200_bytes_even_with_longest_ids() -> None:
    typical = push_bytes("holder-1", "run-1:r123:holder-1", 1)
    worst = push_bytes("h" * 64, "t" * 64, MAX_CHOICE)
    print(f"PushAnswerRequest: typical {typical} B, longest ids {worst} B")
    assert typical <= 80
    assert worst <= 200


def test_largest_task_fits_the_message_limit() -> None:
    steps = tuple(Step(seed=UINT64_MAX - i, coefficient=-1000.0) for i in range(MAX_NEW_STEPS))
    task = replace(BEST_OF_TASK, new_steps=steps, task_id="t" * 64, run_id="r" * 64)
    size = len(wire.pull_task_reply_to_proto(task).SerializeToString())
    assert size < MAX_MESSAGE_BYTES


# -- bounds, encoding side (the sender catches its own bugs) -------------------------------
def _fitness(**changes: Any) -> RunSpec:
    return replace(SPEC, fitness=replace(SPEC.fitness, **changes))


def _param(**changes: Any) -> RunSpec:
    return replace(SPEC, parametrization=replace(SPEC.parametrization, **changes))


def _candidate(**changes: Any) -> Task:
    return replace(TASK, candidates=(replace(TASK.candidates[0], **changes),))


def _push(**changes: Any) -> PushAnswerCall:
    return PushAnswerCall(credentials=CREDENTIALS, answer=replace(ANSWER, **changes))


def _pull(**changes: Any) -> PullTaskCall:
    call = PullTaskCall(credentials=CREDENTIALS, have_version=0, have_head=GENESIS, wait_s=1.0)
    return replace(call, **changes)


def _join(**changes: Any) -> JoinRequest:
    return replace(JOIN, **changes)


TASK_BAD: list[tuple[str, Task]] = [
    ("task_id", replace(TASK, task_id="t" * 65)),
    ("task_id", replace(TASK, task_id="")),
    ("task_id", replace(TASK, task_id="a b")),
    ("run_id", replace(TASK, run_id="rün")),
    ("round_index", replace(TASK, round_index=-1)),
    ("round_index", replace(TASK, round_index=True)),
    ("base_version", replace(TASK, base_version=2**41)),
    ("new_steps", replace(TASK, new_steps=(STEPS[0],) * 100_001)),
    ("new_steps[0].coefficient", replace(TASK, new_steps=(Step(1, 1024.0),))),
    ("log_head", replace(TASK, log_head=HEAD.upper())),
    ("log_head", replace(TASK, log_head=HEAD[:63])),
    ("candidates", replace(BEST_OF_TASK, candidates=())),
    ("candidates", replace(BEST_OF_TASK, candidates=(TASK.candidates[0],) * 65)),
    ("candidates", replace(TASK, candidates=TASK.candidates * 2)),  # compare: exactly 1
    ("candidates[0].seed", _candidate(seed=-1)),
    ("candidates[0].seed", _candidate(seed=2**64)),
    ("candidates[0].scale", _candidate(scale=math.nan)),
    ("candidates[0].scale", _candidate(scale=-math.inf)),
    ("candidates[0].scale", _candidate(scale=1024.0)),
    ("candidates[0].scale", _candidate(scale=0.1)),  # not exactly a float32
    ("answer_kind", replace(TASK, answer_kind="rank")),
    ("batch.batch_size", replace(TASK, batch=BatchSpec(batch_size=0))),
    ("batch.batch_size", replace(TASK, batch=BatchSpec(batch_size=1_000_001))),
    ("batch.mode", replace(TASK, batch=BatchSpec(mode="all"))),  # type: ignore[arg-type]
    ("deadline_unix", replace(TASK, deadline_unix=math.nan)),
    ("deadline_unix", replace(TASK, deadline_unix=-1.0)),
]
SPEC_BAD: list[tuple[str, RunSpec]] = [
    ("run_id", replace(SPEC, run_id="run/1")),
    ("algorithm", replace(SPEC, algorithm="")),
    ("algorithm", replace(SPEC, algorithm="a\nb")),
    ("model_fingerprint", replace(SPEC, model_fingerprint="ab" * 32)),
    ("model_fingerprint", replace(SPEC, model_fingerprint="sha256:" + "g" * 64)),
    ("answer_kind", replace(SPEC, answer_kind="vote")),
    ("bit_budget", replace(SPEC, bit_budget=-1.0)),
    ("bit_budget", replace(SPEC, bit_budget=math.inf)),
    ("max_rounds", replace(SPEC, max_rounds=-3)),
    ("log_genesis", replace(SPEC, log_genesis="abc")),
    ("parametrization.kind", _param(kind="adapter")),
    ("parametrization.patterns", _param(patterns=("*",) * 257)),
    ("parametrization.patterns[0]", _param(patterns=("*" * 4097,))),
    ("parametrization.patterns[0]", _param(patterns=("",))),
    ("parametrization.last_k_blocks", _param(last_k_blocks=-1)),
    ("parametrization.dimension", _param(dimension=-1)),
    ("parametrization.projection_seed", _param(projection_seed=2**64)),
    ("parametrization.granularity", _param(granularity="row")),
    ("fitness.kind", _fitness(kind="regression")),
    ("fitness.prompt_template", _fitness(prompt_template="x" * 4097)),
    ("fitness.prompt_template", _fitness(prompt_template="a\x00b")),
    ("fitness.label_words", _fitness(label_words=("a",) * 17)),
    ("fitness.label_words[1]", _fitness(label_words=("a", "b" * 65))),
    ("fitness.label_words[0]", _fitness(label_words=("",))),
    ("fitness.text_field", _fitness(text_field="")),
    ("fitness.target_field", _fitness(target_field="x" * 65)),
    ("dp.chunks", replace(SPEC, dp=DpSpec(chunks=2**20 + 1))),
    ("dp.chunks", replace(SPEC, dp=DpSpec(chunks=-1))),
    ("dp.vote_noise", replace(SPEC, dp=DpSpec(chunks=8, vote_noise=math.nan))),
    ("dp.vote_noise", replace(SPEC, dp=DpSpec(chunks=8, vote_noise=-1.0))),
    ("dp.vote_noise", replace(SPEC, dp=DpSpec(chunks=8, vote_noise=2e6))),
    ("dp.keep_margin", replace(SPEC, dp=DpSpec(chunks=8, keep_margin=-1.0))),
    ("dp.keep_margin", replace(SPEC, dp=DpSpec(chunks=8, keep_margin=math.inf))),
]
PUSH_BAD: list[tuple[str, PushAnswerCall]] = [
    ("answer.task_id", _push(task_id="t" * 200)),
    ("answer.choice", _push(choice=-1)),
    ("answer.choice", _push(choice=MAX_CHOICE + 1)),
    ("answer", _push(choice=None)),  # neither choice nor refusal
    ("answer", _push(refusal="no")),  # both
    ("answer.refusal", _push(choice=None, refusal="x" * 513)),
    ("answer.refusal", _push(choice=None, refusal="a\nb")),
    ("answer.refusal", _push(choice=None, refusal="")),
    # Free text where a code belongs: it could carry what the holder knows.
    ("answer.refusal", _push(choice=None, refusal="over-budget: 0.3 of 100 bits left")),
    ("answer.value", _push(choice=None, value=float("nan"))),
    ("answer.value", _push(choice=None, value=0.1)),  # not exactly a float32
    ("answer", _push(choice=1, value=0.5)),  # two outcomes at once
    ("holder_id", PushAnswerCall(Credentials("a b", SESSION), ANSWER)),
    ("session", PushAnswerCall(Credentials("h", "short"), ANSWER)),
]
PULL_BAD: list[tuple[str, PullTaskCall]] = [
    ("have_version", _pull(have_version=-1)),
    ("have_head", _pull(have_head="0x" + "0" * 62)),
    ("wait_s", _pull(wait_s=-1.0)),
    ("wait_s", _pull(wait_s=601.0)),
]
JOIN_BAD: list[tuple[str, JoinRequest]] = [
    ("holder_id", _join(holder_id="h" * 65)),
    ("model_fingerprint", _join(model_fingerprint="sha256:" + "AB" * 32)),
    ("policy_summary", _join(policy_summary={str(i): "" for i in range(65)})),
    ("policy_summary key", _join(policy_summary={"": "x"})),
    ("policy_summary['k']", _join(policy_summary={"k": "v" * 4097})),
]
FINISHED_BAD: list[tuple[str, RunFinished]] = [
    ("reason", replace(FINISHED, reason="x" * 513)),
    ("reason", replace(FINISHED, reason="done\r\nSet-Cookie: x")),
    ("final_version", replace(FINISHED, final_version=-1)),
    ("log_head", replace(FINISHED, log_head="")),
    ("bits_spent_total", replace(FINISHED, bits_spent_total=math.nan)),
    ("new_steps", replace(FINISHED, base_version=3)),
]
ENCODE_VIOLATIONS: list[tuple[Callable[[Any], Any], object, str]] = [
    *[(wire.task_to_proto, value, f"Task.{field}") for field, value in TASK_BAD],
    *[(wire.run_spec_to_proto, value, f"RunSpec.{field}") for field, value in SPEC_BAD],
    *[(PUSH[0], value, f"PushAnswerRequest.{field}") for field, value in PUSH_BAD],
    *[(PULL[0], value, f"PullTaskRequest.{field}") for field, value in PULL_BAD],
    *[(JOIN_CODEC[0], value, f"JoinRequest.{field}") for field, value in JOIN_BAD],
    *[(FINISHED_CODEC[0], value, f"RunFinished.{field}") for field, value in FINISHED_BAD],
]


def assert_wire_error(action: Callable[[], object], where: str) -> str:
    with pytest.raises(WireError) as caught:
        action()
    message = str(caught.value)
    assert message.startswith(f"invalid {where}: "), message
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    ("encode", "value", "where"),
    ENCODE_VIOLATIONS,
    ids=[f"{where}-{i}" for i, (_, _, where) in enumerate(ENCODE_VIOLATIONS)],
)
def test_encoding_rejects(encode: Callable[[Any], Any], value: object, where: str) -> None:
    assert_wire_error(lambda: encode(value), where)


def test_error_message_says_what_is_wrong() -> None:
    message = assert_wire_error(
        lambda: wire.task_to_proto(replace(TASK, task_id="t" * 200)), "Task.task_id"
    )
    assert "200 chars, expected 1..64" in message
    message = assert_wire_error(
        lambda: wire.task_to_proto(_candidate(scale=math.nan)), "Task.candidates[0].scale"
    )
    assert "nan is not finite" in message
    message = assert_wire_error(
        lambda: wire.task_to_proto(_candidate(scale=0.1)), "Task.candidates[0].scale"
    )
    assert "not exactly a float32" in message


# -- bounds, decoding side (what a malicious peer could send) ------------------------------
def _mutated(factory: Callable[[], Any], mutate: Callable[[Any], object]) -> Any:
    message = factory()
    mutate(message)
    return through_bytes(message)


def _set(name: str, value: object) -> Callable[[Any], None]:
    return lambda message: setattr(message, name, value)


def _add_steps(count: int) -> Callable[[pb.Task], None]:
    def mutate(message: pb.Task) -> None:
        message.new_steps.extend(pb.Step(seed=1, coefficient=0.5) for _ in range(count))

    return mutate


def _policy_entries(count: int) -> Callable[[pb.JoinRequest], None]:
    def mutate(message: pb.JoinRequest) -> None:
        message.policy_summary.update({f"k{i}": "v" for i in range(count)})

    return mutate


Mutation = tuple[str, Callable[[Any], object]]
TASK_MUTATIONS: list[Mutation] = [
    ("task_id", _set("task_id", "t" * 200)),
    ("candidates[0].scale", lambda m: setattr(m.candidates[0], "scale", math.nan)),
    ("candidates[0].scale", lambda m: setattr(m.candidates[0], "scale", 2e3)),
    ("new_steps[1].coefficient", lambda m: setattr(m.new_steps[1], "coefficient", math.inf)),
    ("new_steps", _add_steps(MAX_NEW_STEPS)),
    ("candidates", lambda m: m.ClearField("candidates")),
    ("answer_kind", _set("answer_kind", 0)),
    ("answer_kind", _set("answer_kind", 99)),
    ("batch", lambda m: m.ClearField("batch")),
    ("batch.mode", lambda m: setattr(m.batch, "mode", 0)),
    ("batch.batch_size", lambda m: setattr(m.batch, "batch_size", 0)),
    ("log_head", _set("log_head", "z" * 64)),
    ("deadline_unix", _set("deadline_unix", math.inf)),
    ("round_index", _set("round_index", 2**64 - 1)),
]
SPEC_MUTATIONS: list[Mutation] = [
    ("parametrization", lambda m: m.ClearField("parametrization")),
    ("parametrization.kind", lambda m: setattr(m.parametrization, "kind", 0)),
    ("model_fingerprint", _set("model_fingerprint", "md5:00")),
    ("fitness.label_words", lambda m: m.fitness.label_words.extend(["w"] * 15)),
    ("bit_budget", _set("bit_budget", math.nan)),
]
PUSH_MUTATIONS: list[Mutation] = [
    ("answer.task_id", lambda m: setattr(m.answer, "task_id", "t" * 200)),
    ("answer.choice", lambda m: setattr(m.answer, "choice", MAX_CHOICE + 1)),
    ("answer", lambda m: m.answer.ClearField("choice")),
    ("answer.refusal", lambda m: setattr(m.answer, "refusal", "r" * 513)),
    ("answer", lambda m: m.ClearField("answer")),
    ("session", _set("session", "")),
]
PULL_MUTATIONS: list[Mutation] = [
    ("wait_ms", _set("wait_ms", 600_001)),
    ("have_head", _set("have_head", "")),
    ("have_version", _set("have_version", 2**41)),
]
JOIN_MUTATIONS: list[Mutation] = [
    ("policy_summary", _policy_entries(64)),
    ("holder_id", _set("holder_id", "x\ny")),
]
DecodeCase = tuple[Callable[[Any], Any], Callable[[], Any], Callable[[Any], object], str]


def _cases(
    decode: Callable[[Any], Any], factory: Callable[[], Any], name: str, mutations: list[Mutation]
) -> list[DecodeCase]:
    return [(decode, factory, mutate, f"{name}.{field}") for field, mutate in mutations]


DECODE_VIOLATIONS: list[DecodeCase] = [
    *_cases(wire.task_from_proto, lambda: wire.task_to_proto(TASK), "Task", TASK_MUTATIONS),
    *_cases(RUN_SPEC[1], lambda: wire.run_spec_to_proto(SPEC), "RunSpec", SPEC_MUTATIONS),
    *_cases(
        PUSH[1],
        lambda: PUSH[0](PushAnswerCall(CREDENTIALS, ANSWER)),
        "PushAnswerRequest",
        PUSH_MUTATIONS,
    ),
    *_cases(PULL[1], lambda: PULL[0](_pull()), "PullTaskRequest", PULL_MUTATIONS),
    *_cases(JOIN_CODEC[1], lambda: JOIN_CODEC[0](JOIN), "JoinRequest", JOIN_MUTATIONS),
    (PULL_REPLY[1], pb.PullTaskReply, lambda m: None, "PullTaskReply.reply"),
    (
        wire.join_reply_from_proto,
        lambda: pb.JoinReply(session=SESSION),
        lambda m: None,
        "JoinReply.spec",
    ),
]


@pytest.mark.parametrize(
    ("decode", "factory", "mutate", "where"),
    DECODE_VIOLATIONS,
    ids=[f"{case[3]}-{i}" for i, case in enumerate(DECODE_VIOLATIONS)],
)
def test_decoding_rejects(
    decode: Callable[[Any], Any],
    factory: Callable[[], Any],
    mutate: Callable[[Any], object],
    where: str,
) -> None:
    message = _mutated(factory, mutate)
    assert_wire_error(lambda: decode(message), where)


def test_round_trips_cover_every_field_of_every_message() -> None:
    """A new proto field needs a conversion and a bound: this fails until a case sets it."""
    seen: set[str] = set()
    for value, (encode, _) in ROUND_TRIPS.values():
        _collect_set_fields(encode(value), seen)
    _collect_set_fields(wire.join_reply_to_proto(SPEC, SESSION), seen)
    message, reply = _session_exchange()
    _collect_set_fields(message, seen)
    _collect_set_fields(reply, seen)
    no_conversion = {"PushAnswerReply", "LeaveReply", "NoTask"}  # a bool or empty
    expected = {
        f"{name}.{field.name}"
        for name, descriptor in pb.DESCRIPTOR.message_types_by_name.items()
        if name not in no_conversion
        for field in descriptor.fields
    }
    assert expected - seen == set()


def _collect_set_fields(message: Any, seen: set[str]) -> None:
    for field, value in message.ListFields():
        seen.add(f"{message.DESCRIPTOR.name}.{field.name}")
        if field.message_type is None or field.message_type.GetOptions().map_entry:
            continue
        for child in value if field.is_repeated else [value]:
            _collect_set_fields(child, seen)


# -- the Session stream's messages -----------------------------------------------------------
def _session_exchange() -> tuple[pb.SessionRequest, pb.SessionReply]:
    """An answer and the next pull in one message, and the reply that carries both."""
    push = wire.push_answer_request_to_proto(PushAnswerCall(CREDENTIALS, ANSWER))
    pull = wire.pull_task_request_to_proto(PullTaskCall(CREDENTIALS, 0, GENESIS, wait_s=1.0))
    message = wire.session_request(push=push, pull=pull)
    replies = [("PushAnswer", pb.PushAnswerReply(accepted=True)), ("PullTask", pb.PullTaskReply())]
    replies[1][1].nothing.SetInParent()
    return message, wire.session_reply(replies)


def test_a_session_message_serves_the_answer_before_the_pull_and_gets_both_replies() -> None:
    message, reply = _session_exchange()
    assert [method for method, _ in wire.session_calls(message)] == ["PushAnswer", "PullTask"]
    pushed, pulled = wire.session_replies(reply, message)
    assert pushed is not None and pushed.accepted
    assert pulled is not None and wire.pull_task_reply_from_proto(pulled) is None
    only_pull = wire.session_request(pull=message.pull)
    assert [method for method, _ in wire.session_calls(only_pull)] == ["PullTask"]


def test_a_session_message_must_carry_a_call_and_a_reply_exactly_its_calls_replies() -> None:
    assert_wire_error(lambda: wire.session_request(), "SessionRequest")
    assert_wire_error(lambda: wire.session_calls(pb.SessionRequest()), "SessionRequest")
    message, reply = _session_exchange()
    only_pull = wire.session_request(pull=message.pull)
    with pytest.raises(
        WireError,
        match=r"^invalid SessionReply: carries a PushAnswer reply "
        r"and a PullTask reply for a request that asked for a PullTask reply$",
    ):
        wire.session_replies(reply, only_pull)  # a reply it did not ask for
    with pytest.raises(
        WireError,
        match=r"carries nothing for a request that asked for "
        r"a PushAnswer reply and a PullTask reply$",
    ):
        wire.session_replies(pb.SessionReply(), message)


def test_task_replies_encode_each_holders_task_exactly_as_the_plain_encoder() -> None:
    replies = wire.TaskReplies(size=2)
    tasks = [
        TASK,
        replace(TASK, task_id="run-1:r3:0000beef"),  # another holder, same round
        replace(TASK, task_id="run-1:r3:0000cafe", base_version=TASK.base_version + 1,
                new_steps=TASK.new_steps[1:]),  # behind by one step less
        BEST_OF_TASK,
        replace(TASK, task_id="run-1:r3:0000f00d"),  # evicted by now: encoded afresh
        None,
    ]  # fmt: skip
    for task in tasks:
        assert replies.encode(task) == wire.pull_task_reply_to_proto(task)
    with pytest.raises(WireError, match=r"^invalid PullTaskReply\.task\.task_id: "):
        replies.encode(replace(TASK, task_id="not an id"))  # a cached task, a bad id
