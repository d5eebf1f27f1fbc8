"""The two interfaces a transport connects: the coordinator's and the data holder's.

A transport (gRPC in ``server/grpc_service.py`` + ``client/grpc_loop.py``, or Flower)
only moves :mod:`sottovoce.common.protocol.messages` values between these two; it holds no
algorithm and no privacy logic of its own.
"""

from __future__ import annotations

from typing import Protocol

from sottovoce.common.protocol.messages import Answer, JoinRequest, RunFinished, RunSpec, Task


class CoordinatorEndpoint(Protocol):
    """What a transport calls on the coordinator. Safe to call from many threads."""

    def join(self, request: JoinRequest) -> RunSpec:
        """Register a holder. Raises PolicyViolation if it may not join (e.g. wrong model)."""
        ...

    def pull_task(
        self, holder_id: str, have_version: int, have_head: str, timeout_s: float
    ) -> Task | RunFinished | None:
        """Block up to ``timeout_s`` for this holder's next task; None if there is none yet.

        Raises LogIntegrityError if ``have_head`` is not the coordinator's hash at
        ``have_version`` (the holder is on a different log).
        """
        ...

    def push_answer(self, holder_id: str, answer: Answer) -> bool:
        """Record an answer. Returns False (and changes nothing) for a duplicate or late one.

        Raises PolicyViolation for an answer to a task this holder was not given or a
        choice out of range.
        """
        ...

    def leave(self, holder_id: str) -> None:
        """The holder is going away; its open task (if any) will not be waited for."""
        ...


class HolderEndpoint(Protocol):
    """What a transport calls on the data holder."""

    @property
    def holder_id(self) -> str: ...

    @property
    def log_version(self) -> int:
        """Number of log steps applied to the holder's materialized weights."""
        ...

    @property
    def log_head(self) -> str:
        """Hash of the log at ``log_version`` (the genesis hash before any step)."""
        ...

    def join_request(self) -> JoinRequest:
        """What the holder declares when it joins."""
        ...

    def accept_run(self, spec: RunSpec) -> None:
        """Check a run against the holder's policy; raises PolicyViolation to refuse it."""
        ...

    def answer(self, task: Task) -> Answer:
        """Answer a task, or refuse it (an Answer with ``refusal`` set, nothing charged)."""
        ...

    def finish(self, finished: RunFinished) -> None:
        """The run is over; the holder may write its local report."""
        ...
