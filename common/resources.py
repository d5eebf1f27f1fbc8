"""Process resource figures for cost reports (peak memory), read from the OS."""

from __future__ import annotations

import resource
import sys
from pathlib import Path

_STATUS = Path("/proc/self/status")


def peak_rss_bytes() -> int:
    """The peak resident set size of this process since it started its program, in bytes.

    Peak, not current: what a machine must have to run the job. On Linux this is
    ``VmHWM``: ``getrusage``'s ``ru_maxrss`` survives ``exec``, so a holder or baseline
    process started by a parent that had a model loaded would report the parent's size.
    Elsewhere ``ru_maxrss`` (KiB on Linux, bytes on macOS).
    """
    try:
        for line in _STATUS.read_text(encoding="ascii").splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # "VmHWM:  123456 kB"
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)
