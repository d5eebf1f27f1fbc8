"""Property-based fuzzing: no value a peer can send crashes a decoder or a holder.

Two properties, on inputs hypothesis makes up (wire-legal and not):

* every decoder turns any bytes into either a checked message or a ``WireError`` (or
  protobuf's own ``DecodeError`` for bytes that are not a message at all), nothing else;
* ``DataHolder.accept_run`` raises nothing but ``PolicyViolation``, and
  ``DataHolder.answer`` never raises: it answers, or refuses with a reason code, and a
  refusal leaves the ledger's bytes and the forward-pass count exactly as they were.

The default run is small and fast; ``bench/fuzz_guard.py`` runs the same properties with
the ``long`` profile (thousands of examples each).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.message import DecodeError
from helpers import (
    make_policy,
    make_task,
    run_spec,
    scheduled_seed,
    tiny_records,
)
from hypothesis import event, given
from hypothesis import strategies as st

from sottovoce.client.dataset_identity import open_dataset_ledger
from sottovoce.client.holder import DataHolder
from sottovoce.common.errors import PolicyViolation, RefusalCode
from sottovoce.common.models import load_model
from sottovoce.common.parametrizations.base import ParametrizationSpec
from sottovoce.common.proto import sottovoce_pb2 as pb
from sottovoce.common.protocol.answers import AnswerKind
from sottovoce.common.protocol.limits import UINT64_MAX
from sottovoce.common.protocol.messages import BatchSpec, Candidate, DpSpec, RunSpec, Task
from sottovoce.common.steplog import Step, as_float32, extend_chain
from sottovoce.common.transport import wire

DECODERS: list[tuple[type[Any], Callable[[Any], object]]] = [
    (pb.RunSpec, wire.run_spec_from_proto),
    (pb.Task, wire.task_from_proto),
    (pb.Answer, wire.answer_from_proto),
    (pb.RunFinished, wire.run_finished_from_proto),
    (pb.JoinRequest, wire.join_request_from_proto),
    (pb.JoinReply, wire.join_reply_from_proto),
    (pb.PullTaskRequest, wire.pull_task_request_from_proto),
    (pb.PullTaskReply, wire.pull_task_reply_from_proto),
    (pb.PushAnswerRequest, wire.push_answer_request_from_proto),
    (pb.LeaveRequest, wire.leave_request_from_proto),
]


def _valid_task_bytes() -> bytes:
    spec = run_spec()
    task = make_task(spec, "t-1", new_steps=[Step(scheduled_seed(spec, 0), 0.125)])
    return wire.pull_task_reply_to_proto(task).SerializeToString()


VALID = _valid_task_bytes()


@pytest.mark.parametrize(("message", "decode"), DECODERS, ids=[m.__name__ for m, _ in DECODERS])
@given(data=st.binary(max_size=400))
def test_decoders_take_any_bytes(
    message: type[Any], decode: Callable[[Any], object], data: bytes
) -> None:
    with contextlib.suppress(wire.WireError, DecodeError):  # the only failures allowed
        decode(message.FromString(data))


@given(flips=st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), max_size=6))
def test_a_valid_task_with_bytes_flipped_decodes_or_fails_cleanly(
    flips: list[tuple[int, int]],
) -> None:
    data = bytearray(VALID)
    for position, value in flips:
        data[position] = value
    with contextlib.suppress(wire.WireError, DecodeError):
        wire.pull_task_reply_from_proto(pb.PullTaskReply.FromString(bytes(data)))


# -- the holder --------------------------------------------------------------------------------
HOLDER_DIR = "fuzz-holder"


@pytest.fixture(scope="module")
def holder(tmp_path_factory: pytest.TempPathFactory) -> DataHolder:
    folder: Path = tmp_path_factory.mktemp(HOLDER_DIR)
    records = tiny_records(24)
    policy = make_policy(
        folder / "ledger",
        max_bits=1e9,
        allowed_algorithms=["bboxer-1+1", "bboxer-1+lambda", "dpzero"],
        allowed_batch_modes=["minibatch", "full", "poisson"],
        max_epsilon=1e6,
        delta=1e-6,
        max_drift_linf=2.0,
        max_new_steps_per_task=50,
    )
    ledger = open_dataset_ledger(
        policy.ledger_dir, records, policy.max_bits, privacy=policy.privacy_limit()
    )
    made = DataHolder("fuzz", records, policy, ledger, lambda: load_model("tiny-llama"))
    made.accept_run(run_spec(algorithm="bboxer-1+lambda"))
    return made


FLOATS = st.one_of(
    st.sampled_from([0.0, -0.0, 1e-45, 0.125, -0.5, 0.75, 1e3, -1e3]),
    st.floats(-1e3, 1e3, allow_nan=False, width=32),
)
SEEDS = st.one_of(
    st.integers(0, UINT64_MAX), st.integers(0, 30).map(lambda r: scheduled_seed(run_spec(), r))
)
STEPS = st.lists(st.builds(Step, seed=SEEDS, coefficient=FLOATS.map(as_float32)), max_size=60)
CANDIDATES = st.lists(st.builds(Candidate, seed=SEEDS, scale=FLOATS), max_size=9).map(tuple)


def honest_task(spec: RunSpec, version: int, head: str, task_id: str) -> Task:
    """What an honest coordinator would send next: round ``version``, lanes 0 and 1."""
    return Task(
        task_id=task_id,
        run_id=spec.run_id,
        round_index=version,
        base_version=version,
        new_steps=(),
        log_head=head,
        candidates=(
            Candidate(scheduled_seed(spec, version, 0), 0.125),
            Candidate(scheduled_seed(spec, version, 1), -0.125),
        ),
        answer_kind=spec.answer_kind,
        batch=spec.batch,
        deadline_unix=4e9,
    )


@st.composite
def tasks(draw: st.DrawFn, spec: RunSpec, version: int, head: str) -> Task:
    """An honest task with up to three of its fields replaced by anything wire-legal."""
    task = honest_task(
        spec, version, head, draw(st.from_regex(r"[A-Za-z0-9._:-]{1,64}", fullmatch=True))
    )
    mutations: dict[str, st.SearchStrategy[Any]] = {
        "run_id": st.sampled_from(["other-run", "r"]),
        "round_index": st.one_of(st.integers(0, 40), st.integers(0, 2**40)),
        "base_version": st.sampled_from([0, version + 1, 2**40 - 61]),
        "log_head": st.sampled_from(["cd" * 32, "0" * 64]),
        "candidates": CANDIDATES,
        "answer_kind": st.sampled_from(list(AnswerKind)),
        "batch": st.sampled_from(
            [BatchSpec("full", 1), BatchSpec("poisson", 16), BatchSpec("minibatch", 2)]
        ),
        "deadline_unix": st.sampled_from([0.0, 1.0]),
    }
    for name in draw(st.lists(st.sampled_from(sorted(mutations)), max_size=3, unique=True)):
        task = dataclasses.replace(task, **{name: draw(mutations[name])})
    if draw(st.booleans()):  # new steps, hashed honestly onto the holder's log
        steps = tuple(draw(STEPS))
        task = dataclasses.replace(
            task, new_steps=steps, log_head=extend_chain(head, version, steps)
        )
    return task


@given(data=st.data())
def test_a_holder_never_raises_and_a_refusal_leaves_no_trace(
    holder: DataHolder, data: st.DataObject
) -> None:
    spec = holder.spec
    assert spec is not None
    task = data.draw(tasks(spec, holder.log_version, holder.log_head))
    before = (holder.ledger.path.read_bytes(), holder.forward_passes, holder.log_head)
    answer = holder.answer(task)
    event("answered" if not answer.refused else f"refused: {answer.refusal}")
    assert answer.task_id == task.task_id
    if answer.refused:
        assert isinstance(answer.refusal, RefusalCode)
        assert (holder.ledger.path.read_bytes(), holder.forward_passes, holder.log_head) == before
    else:
        assert (answer.choice is None) != (answer.value is None)
        wire.answer_to_proto(answer)  # what it releases is wire-legal


PARAMETRIZATIONS = st.builds(
    ParametrizationSpec,
    kind=st.sampled_from(["full", "select", "subspace", "scale"]),
    patterns=st.lists(st.sampled_from(["*norm*", "*embed*", "lm_head.*", "x"]), max_size=3).map(
        tuple
    ),
    last_k_blocks=st.one_of(st.none(), st.integers(0, 2**16)),
    dimension=st.one_of(st.integers(0, 64), st.just(2**24)),
    projection_seed=st.integers(0, UINT64_MAX),
    granularity=st.sampled_from(["tensor", "channel"]),
)


@st.composite
def run_specs(draw: st.DrawFn) -> RunSpec:
    """An acceptable run with up to three of its fields replaced by anything wire-legal."""
    spec = run_spec(algorithm="bboxer-1+lambda")
    mutations: dict[str, st.SearchStrategy[Any]] = {
        "parametrization": PARAMETRIZATIONS,
        "algorithm": st.sampled_from(["bboxer-1+1", "dpzero", "unknown"]),
        "answer_kind": st.sampled_from(list(AnswerKind)),
        "max_rounds": st.one_of(st.integers(0, 200), st.integers(0, 2**40)),
        "direction_seed": st.integers(0, UINT64_MAX),
        "batch": st.sampled_from(
            [BatchSpec("full", 1), BatchSpec("poisson", 16), BatchSpec("minibatch", 8)]
        ),
        "dp": st.builds(
            DpSpec,
            delta=st.sampled_from([0.0, 1e-6]),
            noise_multiplier=st.one_of(st.just(0.0), st.floats(1e-6, 1e6)),
            randomized_response_epsilon=st.one_of(st.just(0.0), st.floats(1e-6, 64.0)),
            quantization_bits=st.integers(0, 16),
        ),
    }
    for name in draw(st.lists(st.sampled_from(sorted(mutations)), max_size=3, unique=True)):
        spec = dataclasses.replace(spec, **{name: draw(mutations[name])})
    return spec


@given(spec=run_specs())
def test_accept_run_only_ever_refuses(holder: DataHolder, spec: RunSpec) -> None:
    current = holder.spec
    try:
        holder.accept_run(spec)
    except PolicyViolation as refusal:
        event(f"refused: {refusal.code}")
        return
    event("accepted")
    if current is not None:
        holder.accept_run(current)  # the answering property runs on the fixture's run
