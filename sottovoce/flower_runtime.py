"""Flower's simulation runtime in threads, for tests and `sottovoce simulate --engine flower`.

``run_in_process`` runs a ServerApp against ClientApps with the pieces of
``flwr.simulation.run_simulation`` (Flower's in-memory link state, ``InMemoryGrid``, the
simulation runtime's node workers), but in threads instead of Ray: Flower 1.41's
simulation engine hard-codes its Ray backend, and Ray is a 74 MB wheel (186 MB installed)
that starts a cluster; here a run of the tiny model starts in milliseconds.

Those pieces are Flower's internals, not its public API, so this module is pinned to
``FLWR_VERSION`` and ``tests/test_flower_runtime.py`` checks that every internal it uses is
still there with the shape used here; a Flower upgrade fails that test first, not a run.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable
from queue import Empty, Queue

from flwr.app import Context, Message, RecordDict
from flwr.app.user_config import UserConfig
from flwr.clientapp import ClientApp
from flwr.server.superlink.fleet.vce.backend import Backend
from flwr.serverapp import ServerApp

from sottovoce.common.errors import ConfigError

FLWR_VERSION = "1.41.0"  # the Flower release whose internals run_in_process uses
INTERNALS = (  # (module, name): everything below that is not Flower's public API
    ("flwr.common.constant", "SUPERLINK_NODE_ID"),
    ("flwr.proto.task_pb2", "Task"),
    ("flwr.server.run_serverapp", "run"),
    ("flwr.server.superlink.fleet.vce.vce_api", "_register_nodes"),
    ("flwr.server.superlink.fleet.vce.vce_api", "_register_node_info_stores"),
    ("flwr.server.superlink.fleet.vce.vce_api", "run_api"),
    ("flwr.server.superlink.fleet.vce.metrics", "VceMetrics"),
    ("flwr.server.superlink.fleet.vce.backend", "Backend"),
    ("flwr.server.superlink.linkstate", "InMemoryLinkState"),
    ("flwr.server.superlink.linkstate", "LinkStateFactory"),
    ("flwr.server.superlink.linkstate.in_memory_linkstate", "RunRecord"),
    ("flwr.supercore.constant", "FLWR_IN_MEMORY_DB_NAME"),
    ("flwr.supercore.constant", "NOOP_FEDERATION_ID"),
    ("flwr.supercore.object_store", "ObjectStoreFactory"),
    ("flwr.supercore.run", "Run"),
    ("flwr.supercore.task_identity", "TaskIdentity"),
    ("flwr.superlink.federation", "NoOpFederationManager"),
    ("flwr.superlink.grid", "InMemoryGrid"),
)


def run_in_process(
    server_app: ServerApp,
    client_app: ClientApp,
    num_nodes: int,
    *,
    run_config: UserConfig | None = None,
    workers: int = 1,
) -> Context:
    """Run ``server_app`` against ``num_nodes`` virtual SuperNodes running ``client_app``.

    The same pieces as ``flwr.simulation.run_simulation``: Flower's in-memory link state
    holds the messages, ``InMemoryGrid`` is the ServerApp's grid, the simulation runtime's
    node workers call the ClientApp with each node's own ``Context`` (its ``node_config``
    has ``partition-id``). Only the backend differs: ``workers`` threads here, Ray actors
    there. One such run at a time per process (Flower keeps the run id in a global).
    Returns the ServerApp's context; re-raises what the ServerApp raised.
    """
    # Flower internals (INTERNALS), pinned to FLWR_VERSION; imported only when a run starts.
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.proto.task_pb2 import Task as FlowerTask
    from flwr.server.run_serverapp import run as run_serverapp
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.server.superlink.fleet.vce.metrics import VceMetrics
    from flwr.server.superlink.linkstate import InMemoryLinkState, LinkStateFactory
    from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.superlink.federation import NoOpFederationManager
    from flwr.superlink.grid import InMemoryGrid

    if num_nodes < 1 or workers < 1:
        raise ConfigError(f"run_in_process: need >= 1 node and worker ({num_nodes}, {workers})")
    run = Run.create_empty(run_id=secrets.randbits(63))
    run.primary_task_id = secrets.randbits(63)
    run.federation_id = NOOP_FEDERATION_ID
    run.override_config = dict(run_config or {})
    TaskIdentity.task_id = run.primary_task_id
    TaskIdentity.run_id = run.run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID

    state_factory = LinkStateFactory(
        FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory()
    )
    state = state_factory.state()
    assert isinstance(state, InMemoryLinkState)
    state.run_ids[run.run_id] = RunRecord(run=run)
    state.task_store[run.primary_task_id] = FlowerTask(
        task_id=run.primary_task_id, run_id=run.run_id
    )
    grid = InMemoryGrid(state_factory=state_factory, pull_interval=0.01)
    grid.set_run(run)
    nodes = vce_api._register_nodes(num_nodes=num_nodes, state_factory=state_factory)
    node_stores = vce_api._register_node_info_stores(nodes, run)
    for store in node_stores.values():  # the run config, as a SuperNode gets it from the run
        for info in store.run_infos.values():
            info.initial_run_config = dict(run.override_config)
            info.context.run_config = dict(run.override_config)

    server_context = Context(
        run_id=run.run_id,
        node_id=SUPERLINK_NODE_ID,
        node_config=UserConfig(),
        state=RecordDict(),
        run_config=dict(run.override_config),
    )
    stop = threading.Event()
    errors: Queue[BaseException] = Queue()

    def serve() -> None:
        try:
            run_serverapp(grid=grid, context=server_context, server_app_dir="",
                          loaded_server_app=server_app)  # fmt: skip
        except BaseException as exc:  # handed to the caller below
            errors.put(exc)
        finally:
            stop.set()

    server_thread = threading.Thread(target=serve, name="flower-serverapp", daemon=True)
    server_thread.start()
    vce_api.run_api(
        lambda: client_app,
        lambda: _ThreadBackend(workers),
        nodes,
        state_factory,
        node_stores,
        stop,
        VceMetrics(),
    )
    server_thread.join()
    try:
        raise errors.get_nowait()
    except Empty:
        return server_context


class _ThreadBackend(Backend):
    """A simulation backend that calls the ClientApp in the runtime's worker threads."""

    def __init__(self, workers: int):
        self._workers = workers
        self._app_fn: Callable[[], ClientApp] | None = None

    def build(self, app_fn: Callable[[], ClientApp]) -> None:
        self._app_fn = app_fn

    @property
    def num_workers(self) -> int:
        return self._workers

    def is_worker_idle(self) -> bool:
        return True

    def terminate(self) -> None:
        self._app_fn = None

    def process_message(self, message: Message, context: Context) -> tuple[Message, Context]:
        assert self._app_fn is not None, "build() first"
        return self._app_fn()(message=message, context=context), context
