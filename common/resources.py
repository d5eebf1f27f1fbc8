"""Process resource figures for cost reports (peak memory), read from the OS."""

from __future__ import annotations

import resource
import threading
import sys


def peak_rss_bytes(*, children: bool = False) -> int:
    """The peak resident set size of this process (or of its finished children), in bytes.

    Peak, not current: what a machine must have to run the job. Linux reports KiB,
    macOS bytes.
    """
    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    peak = resource.getrusage(who).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class PeakMemory:
    """The peak resident memory of this process while a block runs, sampled in a thread.

    ``with PeakMemory() as peak: train()`` then ``peak.extra_bytes`` is how far the
    resident set rose above where it started: what the block needed on top of what was
    already loaded. Sampling (every ``interval_s``) can miss a spike shorter than that.
    """

    def __init__(self, interval_s: float = 0.02):
        import psutil  # only where memory is measured (sottovoce evaluate)

        self._process = psutil.Process()
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self.start_bytes = 0
        self.peak_bytes = 0

    @property
    def extra_bytes(self) -> int:
        return max(0, self.peak_bytes - self.start_bytes)

    def __enter__(self) -> PeakMemory:
        self.start_bytes = self.peak_bytes = self._rss()
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, self._rss())

    def _sample(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.peak_bytes = max(self.peak_bytes, self._rss())

    def _rss(self) -> int:
        return int(self._process.memory_info().rss)
