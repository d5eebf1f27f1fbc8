"""Durable local files: written whole or not at all, private unless meant to be shared.

A holder's status, local report, ledger, refusal log and key hold figures computed on its
data (scores, train risk, spent budget), so they are created owner-only (0600) and stay so
whatever the process's umask. A reader of any of these files sees the old contents or the
new ones, never half of each: writes go to a temporary file in the same folder, are
fsync'd, and replace the target in one rename.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

PRIVATE = 0o600
SHARED = 0o644


def atomic_write_text(path: Path, text: str, *, mode: int = PRIVATE) -> None:
    """Replace ``path`` with ``text`` in one step (fsync'd), with permissions ``mode``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="\n") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temp_name, mode)
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, payload: Any, *, mode: int = PRIVATE) -> None:
    """``payload`` as indented JSON (keys sorted), written like :func:`atomic_write_text`."""
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True) + "\n", mode=mode)


def create_private(path: Path) -> None:
    """Create ``path`` empty and owner-only if it does not exist; make an existing one 0600."""
    path = Path(path)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, PRIVATE)
    os.close(descriptor)
    os.chmod(path, PRIVATE)


def read_json_object(path: Path) -> dict[str, Any] | None:
    """A JSON object written by another process (a holder's report or status), or None if
    it is missing, torn or not an object: such files are read, never trusted to exist."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None
