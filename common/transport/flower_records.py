"""Conversion between the protocol's dataclasses and Flower records, with the wire's bounds.

The Flower transport moves the same values as the gRPC transport, so it validates them
the same way: a run spec, a task, the end of a run and a join request travel as their
``sottovoce.v1`` protobuf bytes in a ``ConfigRecord`` and are decoded by
:mod:`sottovoce.common.transport.wire`, which checks every field against its bounds. The answer
travels as the Flower idiom has it: its choice or dp-scalar value (the only number a
holder releases) in a ``MetricRecord``, its task id or refusal in a ``ConfigRecord``.

Everything read here is untrusted (a holder reads the coordinator's messages, the
coordinator the holders' replies): the record names, the record types, the keys and the
value types are all checked, nothing unexpected is ignored, and any problem raises
:class:`~sottovoce.common.transport.wire.WireError` with one line naming the record and the field.

Message types (``query.<action>``, routed by the ClientApp):

=================  ================================  ==========================================
type               server -> holder                  holder -> server
=================  ================================  ==========================================
``query.join``     run spec                          join request + holder state, or a refusal
``query.task``     run spec + task                   answer + holder state
``query.finish``   run spec + run finished           holder state
=================  ================================  ==========================================

The "holder state" (log version and head) is what a native holder says in every
``PullTask``: Flower's server speaks first, so the holder says it in its reply instead.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import TypeVar

from flwr.app import ConfigRecord, MetricRecord, RecordDict
from google.protobuf.message import DecodeError
from google.protobuf.message import Message as ProtoMessage

from sottovoce.common.errors import RefusalCode
from sottovoce.common.proto import sottovoce_pb2 as pb
from sottovoce.common.protocol.limits import HASH_PATTERN, MAX_COUNT, MAX_MESSAGE_BYTES
from sottovoce.common.protocol.messages import Answer, JoinRequest, RunFinished, RunSpec, Task
from sottovoce.common.steplog import Step
from sottovoce.common.transport.wire import (
    WireError,
    answer_to_proto,
    join_request_from_proto,
    join_request_to_proto,
    run_finished_from_proto,
    run_finished_to_proto,
    run_spec_from_proto,
    run_spec_to_proto,
    task_from_proto,
    task_to_proto,
)

# -- message types (Flower's "<category>.<action>") ---------------------------------------
JOIN = "query.join"
TASK = "query.task"
FINISH = "query.finish"

# -- record names and keys ----------------------------------------------------------------
RUN_SPEC = "sottovoce.run_spec"  # ConfigRecord {"proto": bytes}
TASK_RECORD = "sottovoce.task"  # ConfigRecord {"proto": bytes}
RUN_FINISHED = "sottovoce.run_finished"  # ConfigRecord {"proto": bytes}
JOIN_REQUEST = "sottovoce.join_request"  # ConfigRecord {"proto": bytes}
REFUSAL = "sottovoce.refusal"  # ConfigRecord {"reason": a RefusalCode}
# MetricRecord {"choice": int}, {"value": float} or {"ranking": [int]}; not for a refusal
ANSWER = "sottovoce.answer"
ANSWER_META = "sottovoce.answer_meta"  # ConfigRecord {"task_id": str[, "refusal": code]}
HOLDER_STATE = "sottovoce.holder_state"  # ConfigRecord {"log_version": int, "log_head": str}

PROTO_KEY = "proto"

P = TypeVar("P", bound=ProtoMessage)
T = TypeVar("T")


@dataclass(frozen=True)
class HolderState:
    """The log version a holder's weights are at, and the log's hash there."""

    log_version: int
    log_head: str


@dataclass(frozen=True)
class JoinReply:
    """A holder's reply to ``query.join``: its join request, or why it refuses the run."""

    request: JoinRequest | None
    refusal: RefusalCode | None
    state: HolderState


# -- server -> holder ---------------------------------------------------------------------
def join_content(spec: RunSpec) -> RecordDict:
    """The invitation to a run: the spec the holder checks against its policy."""
    return RecordDict({RUN_SPEC: _proto_record(run_spec_to_proto(spec))})


def task_content(spec: RunSpec, task: Task) -> RecordDict:
    """A task, with the run it belongs to (a fresh ClientApp process needs both)."""
    return RecordDict(
        {
            RUN_SPEC: _proto_record(run_spec_to_proto(spec)),
            TASK_RECORD: _proto_record(task_to_proto(task)),
        }
    )


def finish_content(spec: RunSpec, finished: RunFinished) -> RecordDict:
    """The end of the run, with its final steps (and the run, for a fresh ClientApp)."""
    return RecordDict(
        {
            RUN_SPEC: _proto_record(run_spec_to_proto(spec)),
            RUN_FINISHED: _proto_record(run_finished_to_proto(finished)),
        }
    )


def read_join(content: RecordDict) -> RunSpec:
    _check_record_names(content, required={RUN_SPEC})
    return _read_proto(content, RUN_SPEC, pb.RunSpec, run_spec_from_proto)


def read_task(content: RecordDict) -> tuple[RunSpec, Task]:
    _check_record_names(content, required={RUN_SPEC, TASK_RECORD})
    spec = _read_proto(content, RUN_SPEC, pb.RunSpec, run_spec_from_proto)
    return spec, _read_proto(content, TASK_RECORD, pb.Task, task_from_proto)


def read_finish(content: RecordDict) -> tuple[RunSpec, RunFinished]:
    _check_record_names(content, required={RUN_SPEC, RUN_FINISHED})
    spec = _read_proto(content, RUN_SPEC, pb.RunSpec, run_spec_from_proto)
    return spec, _read_proto(content, RUN_FINISHED, pb.RunFinished, run_finished_from_proto)


# -- holder -> server ---------------------------------------------------------------------
def join_reply_content(request: JoinRequest, state: HolderState) -> RecordDict:
    return RecordDict(
        {
            JOIN_REQUEST: _proto_record(join_request_to_proto(request)),
            HOLDER_STATE: _state_record(state),
        }
    )


def refusal_content(code: RefusalCode, state: HolderState) -> RecordDict:
    """A refused run: its reason code only (the holder keeps the reason in words)."""
    reason = _refusal_code(f"{REFUSAL}.reason", code)
    return RecordDict(
        {REFUSAL: ConfigRecord({"reason": reason.value}), HOLDER_STATE: _state_record(state)}
    )


def answer_content(answer: Answer, state: HolderState) -> RecordDict:
    answer_to_proto(answer)  # the same checks as on the gRPC wire, before anything leaves
    meta = ConfigRecord({"task_id": answer.task_id})
    content = RecordDict({ANSWER_META: meta, HOLDER_STATE: _state_record(state)})
    if answer.refusal is not None:
        meta["refusal"] = answer.refusal.value
    elif answer.value is not None:
        content[ANSWER] = MetricRecord({"value": float(answer.value)})
    elif answer.ranking is not None:
        content[ANSWER] = MetricRecord({"ranking": [int(i) for i in answer.ranking]})
    else:
        assert answer.choice is not None
        content[ANSWER] = MetricRecord({"choice": int(answer.choice)})
    return content


def holder_state_content(state: HolderState) -> RecordDict:
    return RecordDict({HOLDER_STATE: _state_record(state)})


def read_join_reply(content: RecordDict) -> JoinReply:
    names = _check_record_names(content, required={HOLDER_STATE}, optional={JOIN_REQUEST, REFUSAL})
    if len(names & {JOIN_REQUEST, REFUSAL}) != 1:
        raise WireError(f"invalid join reply: exactly one of {JOIN_REQUEST}, {REFUSAL} is needed")
    state = read_holder_state(content)
    if REFUSAL in names:
        record = _config_record(content, REFUSAL, {"reason"})
        reason = _refusal_code(f"{REFUSAL}.reason", record["reason"])
        return JoinReply(request=None, refusal=reason, state=state)
    request = _read_proto(content, JOIN_REQUEST, pb.JoinRequest, join_request_from_proto)
    return JoinReply(request=request, refusal=None, state=state)


def read_answer(content: RecordDict) -> tuple[Answer, HolderState]:
    names = _check_record_names(content, required={ANSWER_META, HOLDER_STATE}, optional={ANSWER})
    meta = _config_record(content, ANSWER_META, {"task_id"}, optional={"refusal"})
    task_id = meta["task_id"]
    refusal = meta.get("refusal")
    if not isinstance(task_id, str):
        raise WireError(f"invalid {ANSWER_META}.task_id: expected a string")
    if (ANSWER in names) == (refusal is not None):
        raise WireError(f"invalid answer: exactly one of {ANSWER}, {ANSWER_META}.refusal is needed")
    if refusal is not None:
        code = _refusal_code(f"{ANSWER_META}.refusal", refusal)
        answer = Answer(task_id=task_id, choice=None, refusal=code)
    else:
        metrics = content[ANSWER]
        if not isinstance(metrics, MetricRecord):
            raise WireError(f"invalid {ANSWER}: expected a MetricRecord")
        answer = _answer_metrics(task_id, metrics)
    answer_to_proto(answer, "Answer")  # the wire's checks: ids, choice range, refusal text
    return answer, read_holder_state(content)


def _answer_metrics(task_id: str, metrics: MetricRecord) -> Answer:
    """A choice (compare, best-of, quantized dp-scalar), a dp-scalar value or a ranking."""
    keys = set(metrics.keys())
    if keys not in ({"choice"}, {"value"}, {"ranking"}):
        raise WireError(
            f"invalid {ANSWER}: needs exactly one of 'choice', 'value', 'ranking' "
            f"(got {sorted(keys)})"
        )
    if "ranking" in keys:
        ranking = metrics["ranking"]
        if not isinstance(ranking, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in ranking
        ):
            raise WireError(f"invalid {ANSWER}.ranking: expected a list of integers")
        return Answer(task_id=task_id, choice=None, ranking=tuple(int(i) for i in ranking))
    if "value" in keys:
        value = metrics["value"]
        if not isinstance(value, float):
            raise WireError(f"invalid {ANSWER}.value: expected a float")
        return Answer(task_id=task_id, choice=None, value=value)
    choice = metrics["choice"]
    if not isinstance(choice, int) or isinstance(choice, bool):
        raise WireError(f"invalid {ANSWER}.choice: expected an integer")
    return Answer(task_id=task_id, choice=choice)


def read_holder_state(content: RecordDict) -> HolderState:
    record = _config_record(content, HOLDER_STATE, {"log_version", "log_head"})
    version = record["log_version"]
    head = record["log_head"]
    if not isinstance(version, int) or isinstance(version, bool) or not 0 <= version <= MAX_COUNT:
        raise WireError(f"invalid {HOLDER_STATE}.log_version: expected an integer 0..{MAX_COUNT}")
    if not isinstance(head, str) or not HASH_PATTERN.fullmatch(head):
        raise WireError(f"invalid {HOLDER_STATE}.log_head: expected 64 lowercase hex chars")
    return HolderState(log_version=version, log_head=head)


# -- the holder's own log, kept in its node's Context between ClientApp processes ----------
def saved_log_record(run_id: str, steps: tuple[Step, ...], log_head: str) -> ConfigRecord:
    """The steps a holder has applied, as a RunFinished message (validated like one)."""
    message = RunFinished(
        run_id=run_id,
        reason="saved by the ClientApp",
        final_version=len(steps),
        log_head=log_head,
        bits_spent_total=0.0,
        new_steps=steps,
    )
    return _proto_record(run_finished_to_proto(message, "saved log"))


def read_saved_log(record: ConfigRecord) -> RunFinished:
    content = RecordDict({RUN_FINISHED: record})
    return _read_proto(content, RUN_FINISHED, pb.RunFinished, run_finished_from_proto)


# -- helpers ------------------------------------------------------------------------------
def _proto_record(message: ProtoMessage) -> ConfigRecord:
    return ConfigRecord({PROTO_KEY: message.SerializeToString(deterministic=True)})


def _state_record(state: HolderState) -> ConfigRecord:
    return ConfigRecord({"log_version": int(state.log_version), "log_head": state.log_head})


def _read_proto(
    content: RecordDict,
    name: str,
    proto_type: type[P],
    decode: Callable[[P, str], T],
) -> T:
    record = _config_record(content, name, {PROTO_KEY})
    data = record[PROTO_KEY]
    if not isinstance(data, bytes):
        raise WireError(f"invalid {name}.{PROTO_KEY}: expected bytes")
    if len(data) > MAX_MESSAGE_BYTES:
        raise WireError(f"invalid {name}: {len(data)} bytes, limit {MAX_MESSAGE_BYTES}")
    try:
        message = proto_type.FromString(data)
    except DecodeError as exc:
        raise WireError(f"invalid {name}: not a {proto_type.__name__} message ({exc})") from None
    return decode(message, name)


def _check_record_names(
    content: RecordDict, *, required: Collection[str], optional: Collection[str] = ()
) -> set[str]:
    if not isinstance(content, RecordDict):
        raise WireError(f"invalid message content: expected a RecordDict, got {type(content)}")
    names = set(content.keys())
    _check_keys("message content", names, set(required), set(optional))
    return names


def _config_record(
    content: RecordDict, name: str, required: set[str], optional: Collection[str] = ()
) -> ConfigRecord:
    record = content.get(name)
    if not isinstance(record, ConfigRecord):
        raise WireError(f"invalid {name}: expected a ConfigRecord")
    _check_keys(name, record.keys(), required, set(optional))
    return record


def _check_keys(where: str, keys: Collection[str], required: set[str], optional: set[str]) -> None:
    missing = sorted(required - set(keys))
    if missing:
        raise WireError(f"invalid {where}: missing {', '.join(missing)}")
    unknown = sorted(set(keys) - required - optional)
    if unknown:
        shown = ", ".join(repr(key)[:40] for key in unknown[:3])
        raise WireError(f"invalid {where}: unknown {shown}")


def _refusal_code(where: str, value: object) -> RefusalCode:
    """A reason code, never free text: a refusal's words could carry the holder's data."""
    try:
        if not isinstance(value, str):
            raise ValueError("not a string")
        return RefusalCode(value)
    except ValueError:
        known = "/".join(code.value for code in RefusalCode)
        raise WireError(
            f"invalid {where}: {str(value)[:40]!r} is not a reason code ({known})"
        ) from None
