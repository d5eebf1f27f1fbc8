"""The holder and decoder fuzz properties of ``tests/test_fuzz.py``, at length.

The default test run tries 40 examples per property; this runs the same properties under
hypothesis's ``long`` profile (3,000 examples each) and prints what the examples did
(answered, refused by code, accepted), so a rare crash has thousands of chances to show.

    python bench/fuzz_guard.py            # about a few minutes on 2 CPU cores
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    started = time.perf_counter()
    command = [
        sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
        str(ROOT / "tests" / "test_fuzz.py"),
        "--hypothesis-profile=long", "--hypothesis-show-statistics", "--timeout=3600",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, check=False)
    print(f"fuzz_guard: exit {result.returncode} after {time.perf_counter() - started:.0f} s")
    return result.returncode


if __name__ == "__main__":
    raise SystemExit(main())
