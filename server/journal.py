"""The coordinator's journal file with group commit: many answers, one fsync.

Every journal record must be on disk before anything that depends on it leaves the
coordinator (an accepted reply, a task, a log step). Fsyncing each record on its own caps
the coordinator at one answer per fsync; with ten thousand holders answering one round,
that is the whole round's time. So writing and making durable are two steps here:

* :meth:`Journal.append` writes the record's line to the file (one ``write`` of a whole
  line, so a crash can only tear the last one) and returns its sequence number. The
  caller may update its in-memory state at once: nothing outside the process sees it yet.
* :meth:`Journal.sync` (blocking) or :meth:`Journal.when_durable` (a callback, for the
  asyncio service) waits until an fsync has covered that number. One fsync covers every
  line written before it started, so every caller waiting meanwhile shares it: the more
  answers arrive at once, the more each fsync carries (group commit).

The rule that makes this safe: a reply, a task or a log step leaves only after the
journal is durable up to the last record written before it was decided. Records are
appended in the order their effects happened (under the coordinator's lock), so whatever
an outsider has seen is in a durable prefix of the file, and a restarted coordinator
replays exactly that prefix (plus, at most, records nobody outside had seen yet, which
is what a crash just before their reply would have left anyway).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sottovoce.common.errors import LogIntegrityError
from sottovoce.common.storage import canonical_json

logger = logging.getLogger(__name__)

DurableCallback = Callable[[], None]


class Journal:
    """An append-only JSON-lines file whose lines are made durable in groups.

    Thread-safe. The same line format as :func:`sottovoce.common.storage.append_json_line`
    (canonical JSON, one object a line), so :func:`~sottovoce.common.storage.read_json_lines`
    and :func:`~sottovoce.common.storage.repair_torn_tail` read and repair it.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fd: int | None = None  # opened at the first record: no run, no file
        self._cond = threading.Condition()
        self._written = 0  # sequence number of the last line written
        self._synced = 0  # every line up to this number is durable
        self._syncing = False
        self._failed: OSError | None = None
        self._callbacks: list[tuple[int, DurableCallback]] = []
        self._flusher: threading.Thread | None = None
        self._closed = False
        self.fsyncs = 0  # how many fsyncs made lines durable (lines / fsyncs = group size)

    # -- writing -------------------------------------------------------------------------
    def append(self, record: dict[str, Any]) -> int:
        """Write ``record`` as one line (not yet durable); return its sequence number."""
        data = (canonical_json(record) + "\n").encode("utf-8")
        with self._cond:
            self._check_usable()
            if self._fd is None:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            view = memoryview(data)
            while view:  # a regular file takes the whole line; loop only to be exact
                written = os.write(self._fd, view)
                view = view[written:]
            self._written += 1
            return self._written

    @property
    def written(self) -> int:
        """Sequence number of the last line written (what a reply decided now depends on).
        Read without the lock: an int is read whole, and a stale value only waits longer."""
        return self._written

    @property
    def durable(self) -> int:
        """Every line up to this sequence number is on disk (read without the lock)."""
        return self._synced

    @property
    def failed(self) -> bool:
        """Whether an fsync failed (nothing written since can be made durable)."""
        return self._failed is not None

    def check(self) -> None:
        """Raise LogIntegrityError if an fsync failed: no reply may rest on the journal."""
        with self._cond:
            self._check_usable()

    # -- making it durable ---------------------------------------------------------------
    def sync(self, seq: int | None = None) -> None:
        """Block until every line up to ``seq`` (default: all written so far) is on disk.

        The first caller to find the file behind runs the fsync; callers arriving while it
        runs wait for it, and the next fsync covers all of them at once.
        """
        ready: list[DurableCallback] = []
        with self._cond:
            target = self._written if seq is None else min(seq, self._written)
            while self._synced < target:
                self._check_usable()
                if self._syncing:
                    self._cond.wait()
                    continue
                ready += self._fsync_locked()
        _fire(ready)

    def when_durable(self, seq: int, callback: DurableCallback) -> None:
        """Call ``callback`` (from the flusher thread, or now) once line ``seq`` is on disk.

        A callback must be quick and must not call back into the journal; the asyncio
        service's hands a result to its event loop.
        """
        with self._cond:
            if self._synced >= seq or self._failed is not None:
                pass  # durable already (or failed: the caller's own sync will say so)
            else:
                self._callbacks.append((seq, callback))
                self._start_flusher_locked()
                self._cond.notify_all()
                return
        callback()

    def close(self) -> None:
        """Make everything durable, stop the flusher and close the file."""
        if self._closed:
            return
        try:
            self.sync()
        finally:
            with self._cond:
                self._closed = True
                self._cond.notify_all()
                flusher = self._flusher
            if flusher is not None and flusher is not threading.current_thread():
                flusher.join(timeout=5.0)
            ready = [cb for _, cb in self._callbacks]
            self._callbacks.clear()
            if self._fd is not None:
                os.close(self._fd)
            _fire(ready)

    # -- internals -----------------------------------------------------------------------
    def _fsync_locked(self) -> list[DurableCallback]:
        """Run one fsync covering every line written so far (the lock is released while it
        runs); return the callbacks it made due."""
        self._syncing = True
        upto, fd = self._written, self._fd
        assert fd is not None  # a line was written, so the file is open
        self._cond.release()
        try:
            os.fsync(fd)
        except OSError as exc:
            self._failed = exc
            raise LogIntegrityError(f"{self.path}: fsync failed: {exc.strerror}") from exc
        finally:
            self._cond.acquire()
            self._syncing = False
            self._cond.notify_all()
        self.fsyncs += 1
        self._synced = max(self._synced, upto)
        due = [cb for seq, cb in self._callbacks if seq <= self._synced]
        if due:
            self._callbacks = [(s, cb) for s, cb in self._callbacks if s > self._synced]
        return due

    def _start_flusher_locked(self) -> None:
        if self._flusher is None:
            self._flusher = threading.Thread(
                target=self._flush_forever, name="sottovoce-journal", daemon=True
            )
            self._flusher.start()

    def _flush_forever(self) -> None:
        """Fsync whenever a callback waits, so an asyncio caller never blocks on one."""
        while True:
            ready: list[DurableCallback] = []
            with self._cond:
                while not self._closed and (self._syncing or not self._callbacks):
                    self._cond.wait()
                if self._closed:
                    return
                try:
                    ready = self._fsync_locked()
                except LogIntegrityError as exc:
                    logger.error("%s", exc)
                    ready = [cb for _, cb in self._callbacks]
                    self._callbacks.clear()
            _fire(ready)

    def _check_usable(self) -> None:
        if self._failed is not None:
            raise LogIntegrityError(f"{self.path}: an earlier fsync failed: {self._failed}")
        if self._closed:
            raise LogIntegrityError(f"{self.path}: the journal is closed")


def _fire(callbacks: list[DurableCallback]) -> None:
    for callback in callbacks:
        try:
            callback()
        except Exception:  # a waiter's bug must not stop the others from hearing
            logger.exception("journal durability callback failed")
