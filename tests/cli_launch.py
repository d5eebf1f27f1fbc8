"""Launching ``python -m sottovoce.cli`` as users run it, for the CLI tests.

Shared by tests/test_cli.py (bad input, help) and tests/test_cli_simulate.py (a whole
federation), two files so that a parallel run can put them on two workers.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

WAIT_S = 240.0


@dataclass
class Launched:
    """A running ``python -m sottovoce.cli`` and what to judge it by."""

    process: subprocess.Popen[bytes]
    folder: Path
    files_before: set[Path]
    stdout: Path
    stderr: Path

    def wait(self) -> tuple[int, str, str]:
        code = self.process.wait(timeout=WAIT_S)
        return (
            code,
            self.stdout.read_text(encoding="utf-8", errors="replace"),
            self.stderr.read_text(encoding="utf-8", errors="replace"),
        )

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def files_under(folder: Path) -> set[Path]:
    return {path.relative_to(folder) for path in folder.rglob("*")}


def launch(argv: list[str], folder: Path, home: Path) -> Launched:
    """Start the command in ``folder``; its output goes to files beside it, not into it."""
    env = dict(
        os.environ,
        SOTTOVOCE_CACHE=str(home / "cache"),
        OMP_NUM_THREADS="1",
    )
    stdout, stderr = folder.with_name(folder.name + ".out"), folder.with_name(folder.name + ".err")
    with open(stdout, "wb") as out, open(stderr, "wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "sottovoce.cli", *argv],
            stdout=out,
            stderr=err,
            env=env,
            cwd=folder,
        )
    return Launched(process, folder, files_under(folder), stdout, stderr)
