"""The layer contracts cover every module: a new app-layer module cannot slip past them.

import-linter (``make lint``) enforces what pyproject.toml's ``[tool.importlinter]`` lists;
a module it does not list is not checked. So every module of the app layer (the files of
``sottovoce/`` itself) must be in both forbidden lists.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_app_layer_module_is_forbidden_to_the_lower_layers() -> None:
    app = {
        f"sottovoce.{path.stem}"
        for path in (ROOT / "sottovoce").glob("*.py")
        if path.stem != "__init__"
    }
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"][
        "contracts"
    ]
    forbidden = [set(c["forbidden_modules"]) for c in contracts if c["type"] == "forbidden"]
    assert len(forbidden) == 2
    for listed in forbidden:
        assert app <= listed, f"not in a layer contract: {sorted(app - listed)}"
        assert "sottovoce.evidence" in listed
