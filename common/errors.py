"""The project's exception types.

Every error a user can cause (a bad file, a bad message, a request the policy forbids)
is one of these, with a one-line message that names the file, field or message and what
is wrong with it. The CLI prints that line and exits non-zero; nothing catches a bare
``Exception`` to hide a bug.
"""

from __future__ import annotations


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
    """


class BudgetExhausted(PolicyViolation):
    """Answering would push a data set's lifetime budget past its limit."""


class TransportError(SottovoceError):
    """The peer cannot be reached, or answered with an error we cannot recover from."""


class NotJoined(PolicyViolation):
    """A holder calls a coordinator that does not count it as in the run: it never joined,
    left, or was evicted for missing rounds. It may join again (the gRPC service says
    NOT_FOUND, which a holder's loop answers with a fresh Join)."""
