"""The project's exception types.

Every error a user can cause (a bad file, a bad message, a request the policy forbids)
is one of these, with a one-line message that names the file, field or message and what
is wrong with it. The CLI prints that line and exits non-zero; nothing catches a bare
``Exception`` to hide a bug.
"""

from __future__ import annotations

from enum import StrEnum


class RefusalCode(StrEnum):
    """Why a holder refused a task: the only thing a refusal tells the coordinator.

    A code is a function of the task, the policy and the ledger's release history, never of
    the records: the full reason (which field, what the budget is) stays in the holder's own
    log and audit file. Refusals exist only before any data is read; after that, a failure
    gives the mechanism's fixed default answer instead (see ``client/holder.py``).
    """

    OVER_BUDGET = "over-budget"  # the lifetime bits or epsilon cannot pay for the answer
    POLICY = "policy"  # the question is outside what the policy agrees to answer
    MALFORMED = "malformed"  # the task contradicts itself or the run (hashes, shapes, ids)
    STALE = "stale"  # the task builds on a log version this holder is not at
    EXPIRED = "expired"  # the task's deadline has passed
    NOT_READY = "not-ready"  # no run accepted yet, or the run's state was lost
    INTERNAL = "internal"  # the holder failed before reading any data (its own fault)


class SottovoceError(Exception):
    """Base of every error the user is meant to read (one line, no traceback)."""


class ConfigError(SottovoceError):
    """A run config, policy or CLI argument is missing, malformed or inconsistent."""


class DataError(SottovoceError):
    """A data file cannot be read or a record lacks a required field."""


class ModelLoadError(SottovoceError):
    """A model cannot be loaded offline (unknown name, missing package, bad checkpoint)."""


class LogIntegrityError(SottovoceError):
    """A step log or journal is corrupt, or a hash chain does not link up."""


class PolicyViolation(SottovoceError):
    """A data holder refuses a run or task that its policy does not allow.

    Raised before any data is touched, any forward pass runs, or any budget is charged.
    ``code`` is what the coordinator hears; the message stays with the holder.
    """

    default_code = RefusalCode.POLICY

    def __init__(self, message: str, code: RefusalCode | None = None):
        super().__init__(message)
        self.code = code if code is not None else self.default_code


class BudgetExhausted(PolicyViolation):
    """Answering would push a data set's lifetime budget past its limit."""

    default_code = RefusalCode.OVER_BUDGET


class TransportError(SottovoceError):
    """The peer cannot be reached, or answered with an error we cannot recover from."""


class AccountingError(SottovoceError, ValueError):
    """An event or a target the privacy accountant cannot work with (named in the message)."""


class RequestRefused(SottovoceError):
    """The coordinator refuses a holder's request: an answer it may not give, a task it was
    not handed, a wrong model. The holder's own refusals are :class:`PolicyViolation`."""


class NotJoined(RequestRefused):
    """A holder calls a coordinator that does not count it as in the run: it never joined,
    left, or was evicted for missing rounds. It may join again (the gRPC service says
    NOT_FOUND, which a holder's loop answers with a fresh Join)."""
