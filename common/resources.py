"""Process resource figures for cost reports (peak memory), read from the OS."""

from __future__ import annotations

import resource
import sys


def peak_rss_bytes(*, children: bool = False) -> int:
    """The peak resident set size of this process (or of its finished children), in bytes.

    Peak, not current: what a machine must have to run the job. Linux reports KiB,
    macOS bytes.
    """
    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    peak = resource.getrusage(who).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)
