"""Check the import contracts ([tool.importlinter] in pyproject.toml) on the import tree.

import-linter walks a package's folder on disk, but the installed package maps
sottovoce.common to common/ and so on (pyproject's package-dir), which a folder walk does
not see. So this lays out ``build/import-tree`` (scripts/typecheck_tree.py), puts it first
on sys.path in place of the editable install's import hook, and runs lint-imports there
(from inside it, since lint-imports puts the working folder first on sys.path).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from typecheck_tree import ROOT, build


def main() -> int:
    tree = build()
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__]
    sys.path.insert(0, str(tree))
    os.chdir(tree)  # lint-imports puts the working folder first on sys.path
    for name in [m for m in sys.modules if m == "sottovoce" or m.startswith("sottovoce.")]:
        del sys.modules[name]
    from importlinter.cli import lint_imports

    return int(lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True))


if __name__ == "__main__":
    raise SystemExit(main())
