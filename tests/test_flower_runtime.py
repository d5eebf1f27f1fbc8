"""The thread-based Flower runtime leans on Flower's internals: fail here when they change.

``sottovoce.flower_runtime`` uses pieces of Flower that are not its public API (the
simulation runtime's link state, grid and node workers). They are pinned to one Flower
release; a different release, or a missing or reshaped internal, fails this test before
it fails a run in some less obvious way.
"""

from __future__ import annotations

import importlib
import inspect

import flwr

from sottovoce.flower_runtime import FLWR_VERSION, INTERNALS


def test_flower_is_the_pinned_release() -> None:
    assert flwr.__version__ == FLWR_VERSION, (
        f"flwr {flwr.__version__} is installed; sottovoce.flower_runtime is written against "
        f"{FLWR_VERSION}: check its INTERNALS, then update FLWR_VERSION and the pin"
    )


def parameters(function: object) -> list[str]:
    return list(inspect.signature(function).parameters)  # type: ignore[arg-type]


def test_every_internal_the_runtime_uses_is_there_with_its_shape() -> None:
    for module, name in INTERNALS:
        assert hasattr(importlib.import_module(module), name), f"{module}.{name} is gone"
    from flwr.server.run_serverapp import run
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.server.superlink.fleet.vce.backend import Backend

    # Called by keyword or position in run_in_process: the names and order it relies on.
    assert parameters(vce_api.run_api)[:6] == [
        "app_fn", "backend_fn", "nodes_mapping", "state_factory", "node_info_stores", "f_stop",
    ]  # fmt: skip
    assert parameters(vce_api._register_nodes) == ["num_nodes", "state_factory"]
    assert parameters(vce_api._register_node_info_stores)[:2] == ["nodes_mapping", "run"]
    assert {"grid", "context", "server_app_dir", "loaded_server_app"} <= set(parameters(run))
    abstract = getattr(Backend, "__abstractmethods__", frozenset())
    assert abstract <= {"build", "num_workers", "is_worker_idle", "terminate", "process_message"}
