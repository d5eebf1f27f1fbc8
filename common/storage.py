"""Durable local files: written whole or not at all, private unless meant to be shared.

Everything that reaches a disk goes through here, in one of two shapes:

* whole files (reports, status, run metadata, record indexes, keys): written to a temporary
  file in the same folder, fsync'd, and renamed over the target, so a reader sees the old
  contents or the new ones, never half of each;
* append-only JSON-lines files (the coordinator's journal and log, a holder's ledger): one
  canonical JSON object a line, each fsync'd before it counts; a crash can only leave a torn
  last line, which :func:`repair_torn_tail` drops (it was never acted upon).

A holder's status, local report, ledger, refusal notes, record indexes and key hold figures
computed on its data, so they are created owner-only (0600, whatever the umask); reports
meant to be shared are 0644.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sottovoce.common.errors import LogIntegrityError

PRIVATE = 0o600
SHARED = 0o644


# -- canonical JSON ------------------------------------------------------------------------------
def canonical_json(
    value: Any,
    *,
    ensure_ascii: bool = True,
    allow_nan: bool = True,
    default: Callable[[Any], Any] | None = None,
) -> str:
    """``value`` as canonical JSON: sorted keys, no spaces. What every hash is taken of.

    ``ensure_ascii`` and ``allow_nan`` are part of a format (a hash chain written one way must
    be read the same way); each caller keeps the choice its files were first written with.
    """
    return json.dumps(
        value,
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=ensure_ascii,
        allow_nan=allow_nan,
        default=default,
    )


# -- whole files ---------------------------------------------------------------------------------
def atomic_write_bytes(path: Path, content: bytes, *, mode: int = PRIVATE) -> Path:
    """Replace ``path`` with ``content`` in one step (fsync'd), with permissions ``mode``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(content)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temp_name, mode)
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: Path, text: str, *, mode: int = PRIVATE) -> Path:
    """:func:`atomic_write_bytes` of ``text`` in UTF-8."""
    return atomic_write_bytes(path, text.encode("utf-8"), mode=mode)


def atomic_write_json(path: Path, payload: Any, *, mode: int = PRIVATE) -> Path:
    """``payload`` as indented JSON (keys sorted), written like :func:`atomic_write_text`."""
    return atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True) + "\n", mode=mode)


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
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


# -- append-only JSON lines ------------------------------------------------------------------------
def append_json_line(path: Path, record: dict[str, object]) -> None:
    """Append one canonical JSON record as a line and fsync it before returning."""
    line = canonical_json(record) + "\n"
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(line)
        handle.flush()
        os.fsync(handle.fileno())


def read_json_lines(path: Path) -> list[dict[str, Any]]:
    """Read an append-only JSON-lines file, rejecting a torn or corrupt line by name.

    A last line without its newline is what a crash mid-write leaves; it is reported as a
    torn write (see :func:`repair_torn_tail`) rather than half-trusted.
    """
    path = Path(path)
    if not path.exists():
        return []
    raw = path.read_bytes()
    if raw and not raw.endswith(b"\n"):
        raise LogIntegrityError(f"{path}: last line is torn (a crash during a write?)")
    return parse_json_lines(path, raw)


def parse_json_lines(path: Path, raw: bytes) -> list[dict[str, Any]]:
    """One JSON object per line of ``raw`` (read from ``path``, named in errors)."""
    records: list[dict[str, Any]] = []
    for number, line in enumerate(raw.splitlines()):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LogIntegrityError(f"{path}: line {number + 1} is not JSON: {exc.msg}") from exc
        if not isinstance(record, dict):
            raise LogIntegrityError(f"{path}: line {number + 1} is not a JSON object")
        records.append(record)
    return records


def repair_torn_tail(path: Path) -> bool:
    """Drop a torn last line left by a crash; return whether anything was dropped.

    Safe because every record is fsync'd before its effect is visible to anyone: a line
    that never got its newline was never acted upon. The file keeps its permissions.
    """
    path = Path(path)
    if not path.exists():
        return False
    raw = path.read_bytes()
    if not raw or raw.endswith(b"\n"):
        return False
    atomic_write_bytes(path, raw[: raw.rfind(b"\n") + 1], mode=path.stat().st_mode & 0o777)
    return True
