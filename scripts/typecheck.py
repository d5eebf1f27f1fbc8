"""`make typecheck`: mypy on the code as it is imported, and proof that it sees across modules.

mypy reads ``build/import-tree`` (scripts/typecheck_tree.py), where every module sits at
its import path, so ``from sottovoce.common.protocol.messages import Candidate`` resolves
to the real class and nothing first-party is ``Any``. Then the check that could otherwise pass while
seeing nothing: a planted file that calls ``Candidate(seed="not an int", ...)`` must fail
with two arg-type errors. If it does not, the type check is blind and this fails.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from typecheck_tree import ROOT, build

PLANTED = '''"""Planted by scripts/typecheck.py: mypy must reject both arguments."""
from sottovoce.common.protocol.messages import Candidate

WRONG = Candidate(seed="not an int", scale="nor a float")
'''


def mypy(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"), *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)


def main() -> int:
    tree = build()
    checked = mypy("-p", "sottovoce")
    print(checked.stdout, end="")
    if checked.returncode != 0:
        print(checked.stderr, end="", file=sys.stderr)
        return checked.returncode
    planted = tree / "sottovoce" / "_planted_type_error.py"
    planted.write_text(PLANTED, encoding="utf-8")
    try:
        probe = mypy(str(planted))
    finally:
        planted.unlink()
    errors = [line for line in probe.stdout.splitlines() if "[arg-type]" in line]
    if probe.returncode == 0 or len(errors) != 2:
        print("typecheck: the planted cross-module type error was not caught:", file=sys.stderr)
        print(probe.stdout, probe.stderr, file=sys.stderr)
        return 1
    print("typecheck: a planted cross-module type error is caught (2 arg-type errors)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
