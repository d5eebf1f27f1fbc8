"""Lay the code out by import path for the tools that need to see it that way.

The distribution installs the top-level folders common/, server/, client/, evidence/ as
sottovoce.common, sottovoce.server, ... (pyproject's package-dir). Python's import system
follows that mapping; mypy and import-linter do not. This writes ``build/import-tree``:
real folders named as the packages are imported, holding links to the real files, so
``sottovoce.common.transport.wire`` is ``build/import-tree/sottovoce/common/transport/wire.py``.
Made afresh on every call (so a new module is always in it); nothing in it is edited by hand.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TREE = ROOT / "build" / "import-tree"
MAPPING = {  # import path -> folder, as in pyproject's [tool.setuptools] package-dir
    "sottovoce": "sottovoce",
    "sottovoce/common": "common",
    "sottovoce/server": "server",
    "sottovoce/client": "client",
    "sottovoce/evidence": "evidence",
}
SKIP = {"__pycache__"}


def build(tree: Path = TREE) -> Path:
    if tree.exists():
        shutil.rmtree(tree)
    for package, folder in MAPPING.items():
        source = ROOT / folder
        for path in sorted(source.rglob("*")):
            if SKIP & set(path.relative_to(source).parts) or path.is_dir():
                continue
            if path.suffix not in (".py", ".pyi", ".typed"):
                continue
            target = tree / package / path.relative_to(source)
            if target.exists():  # sottovoce/ holds no common/ of its own: never happens
                raise SystemExit(f"typecheck_tree: {target} mapped twice")
            target.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(path, target)
    return tree


if __name__ == "__main__":
    print(build(Path(sys.argv[1]) if len(sys.argv) > 1 else TREE))
