"""The holder's own record of what it refused and why; the coordinator only gets a code.

A refusal costs nothing and leaves the holder as a reason code (over-budget, policy, ...).
The words (which field, which cap, how much budget is left) are for the holder's operator:
one JSON line each in ``<dataset id>.refusals.jsonl`` next to the ledger, owner-only, read
by ``sottovoce ledger``. It is not the ledger: nothing here was released, so a refused
task leaves the ledger's bytes as they were.

A hostile coordinator may send refused tasks as fast as the holder polls, so the file is
capped (:data:`MAX_BYTES`); past the cap, refusals are only counted.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

from sottovoce.common.errors import RefusalCode
from sottovoce.common.storage import create_private

log = logging.getLogger("sottovoce.holder")

MAX_BYTES = 16 * 1024 * 1024
_MAX_MESSAGE = 1000


class RefusalLog:
    """Append-only refusal notes for one data set (``path`` None: the process log only)."""

    def __init__(self, path: Path | None):
        self.path = path
        self.dropped = 0
        self._mutex = threading.Lock()

    def note(self, run_id: str, task_id: str, code: RefusalCode, message: str) -> None:
        log.warning("refused task %s (%s): %s", task_id, code.value, message)
        if self.path is None:
            return
        line = json.dumps(
            {
                "time": time.time(),
                "run_id": run_id,
                "task_id": task_id,
                "code": code.value,
                "message": message[:_MAX_MESSAGE],
            },
            sort_keys=True,
        )
        with self._mutex:
            try:
                if self.path.exists() and self.path.stat().st_size > MAX_BYTES:
                    self.dropped += 1
                    return
                create_private(self.path)
                with open(self.path, "a", encoding="utf-8") as handle:
                    handle.write(line + "\n")
            except OSError as exc:  # the refusal stands; only its note is lost
                log.error("could not write %s: %s", self.path, exc)


def read_refusals(path: Path) -> list[dict[str, Any]]:
    """The notes of a refusal log (an unreadable or torn line is skipped), oldest first."""
    if not path.exists():
        return []
    notes = []
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            try:
                note = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(note, dict):
                notes.append(note)
    return notes


def refusal_log_path(ledger_path: Path) -> Path:
    """Where a ledger's refusal notes live: beside it, named after its data set."""
    return ledger_path.with_name(ledger_path.name.removesuffix(".ledger.jsonl") + ".refusals.jsonl")
