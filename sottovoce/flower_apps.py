"""The Flower app objects (`flwr run .`) and the factories that build their endpoints.

``[tool.flwr.app.components]`` in pyproject.toml names ``serverapp`` and ``clientapp``
here. The transports themselves live on each side: the ServerApp's driver in
:mod:`sottovoce.server.flower_driver`, the ClientApp's node handling in
:mod:`sottovoce.client.flower_nodes`. This module only chooses what they run: the
coordinator named by the run config, and each node's holder from its node config, both
built by the public API (:mod:`sottovoce.api`), so a holder's ClientApp process never
loads the coordinator's code and the coordinator's never loads a holder's.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from flwr.app import Context

from sottovoce.api import open_coordinator, open_holder
from sottovoce.client.flower_nodes import NodeHolder, make_client_app
from sottovoce.common.errors import ConfigError
from sottovoce.server.coordinator import Coordinator
from sottovoce.server.flower_driver import DriverSettings, make_server_app


def coordinator_from_run_config(context: Context) -> Coordinator:
    """The coordinator named by the run config (``[tool.flwr.app.config]`` or ``--run-config``).

    ``config``: the run's ``run.toml``; ``run-dir``: its run directory (created, or resumed);
    ``model-fingerprint``: the base model's fingerprint (optional; else the model is loaded
    once to compute it). Use absolute paths: a ServerApp process may run in another folder.
    """
    config = dict(context.run_config)
    fingerprint = config.get("model-fingerprint") or None
    return open_coordinator(
        Path(_run_config_str(config, "config")),
        Path(_run_config_str(config, "run-dir")),
        model_fingerprint=str(fingerprint) if fingerprint else None,
    )


def _run_config_str(config: Mapping[str, object], key: str) -> str:
    value = config.get(key)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"Flower run config: {key!r} must be a non-empty path (got {value!r})")
    return value


def holder_from_node_config(context: Context) -> NodeHolder:
    """Build the node's holder from ``--node-config`` (deployment) or the run config.

    Deployment: ``data``, ``policy``, ``holder-id`` (required), ``model``, ``dtype``,
    ``status``, ``report`` (optional). Simulation under ``flwr run`` (no such keys; the
    node config has ``partition-id``): ``<holders-dir>/holder-<partition-id>/`` from the
    run config, laid out as ``sottovoce simulate`` writes it.
    """
    config = dict(context.node_config)
    run_config = dict(context.run_config)
    if "data" not in config and "partition-id" in config and "holders-dir" in run_config:
        index = _config_int(config, "partition-id", "node config")
        folder = Path(_config_str(run_config, "holders-dir", "run config")) / f"holder-{index}"
        config = {
            "data": str(folder / "data.jsonl"),
            "policy": str(folder / "policy.toml"),
            "holder-id": f"holder-{index}",
            "model": run_config.get("model", "smollm2-135m-instruct"),
            "dtype": run_config.get("dtype", "float32"),
            "status": str(folder / "status.json"),
            "report": str(folder / "report.json"),
        }
    holder = open_holder(
        Path(_config_str(config, "data", "node config")),
        Path(_config_str(config, "policy", "node config")),
        holder_id=_config_str(config, "holder-id", "node config"),
        model_name=str(config.get("model", "smollm2-135m-instruct")),
        dtype=str(config.get("dtype", "float32")),
        status_path=Path(str(config["status"])) if config.get("status") else None,
    )
    report = Path(str(config["report"])) if config.get("report") else None
    return NodeHolder(holder=holder, report_path=report)


def _config_str(config: Mapping[str, object], key: str, where: str) -> str:
    value = config.get(key)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: {key!r} must be a non-empty string (got {value!r})")
    return value


def _config_int(config: Mapping[str, object], key: str, where: str) -> int:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigError(f"{where}: {key!r} must be an integer >= 0 (got {value!r})")
    return value


# Deployment: a SuperLink over the network, where each poll is an HTTP request.
serverapp = make_server_app(coordinator_from_run_config, DriverSettings(poll_interval_s=0.2))
clientapp, _default_nodes = make_client_app(holder_from_node_config)
