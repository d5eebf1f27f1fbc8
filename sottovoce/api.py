"""The small public API the CLI is built on: open a coordinator, open a data holder.

    from sottovoce.api import open_coordinator, open_holder
    from sottovoce.server.grpc_service import serve
    from sottovoce.client.grpc_loop import run_holder

    coordinator = open_coordinator(Path("run.toml"), Path("runs/demo"))
    server = serve(coordinator, "127.0.0.1:50051")
    ...                                    # on each data holder:
    holder = open_holder(Path("holder.jsonl"), Path("policy.toml"), holder_id="hospital-a")
    run_holder(holder, "coordinator.example:50051")

Both objects are transport-agnostic (see ``common/transport/endpoints.py``): tests and the Flower
app drive the same ``Coordinator`` and ``DataHolder`` without gRPC.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from sottovoce.client.policy import HolderPolicy, load_policy
from sottovoce.common.config import RunConfig, parse_config, read_toml
from sottovoce.common.data import Record, load_numbered_records, load_records
from sottovoce.common.dtypes import DTYPE_NAMES, torch_dtype
from sottovoce.common.errors import ConfigError

# The heavy modules are imported by the functions that need them, not here: torch and
# transformers (seconds) only where a model is loaded or a ledger opened, so a coordinator
# given its model's fingerprint starts serving without them (`sottovoce server`, a restart
# after a crash); the coordinator's (cma, scipy) only by open_coordinator, so a holder's
# process never loads them.
if TYPE_CHECKING:
    from sottovoce.client.holder import DataHolder
    from sottovoce.client.ledger import Ledger
    from sottovoce.common.models import LoadedModel
    from sottovoce.server.coordinator import Coordinator

log = logging.getLogger("sottovoce.holder")


def read_config(path: Path) -> tuple[RunConfig, str]:
    """The validated config and its verbatim text (kept in the run directory)."""
    data = read_toml(path)
    return parse_config(data, str(path)), path.read_text(encoding="utf-8")


def open_coordinator(
    config_path: Path,
    run_dir: Path,
    *,
    model_fingerprint: str | None = None,
    cache_dir: Path | None = None,
) -> Coordinator:
    """Start a new run in ``run_dir``, or resume the run that is there.

    The coordinator needs the base model's fingerprint, not its weights: pass it (or put
    it in the config's ``[model] fingerprint``) to avoid loading the model here.
    """
    from sottovoce.server.coordinator import Coordinator
    from sottovoce.server.run_state import RunState

    config, text = read_config(config_path)
    fingerprint = model_fingerprint or config.model.fingerprint
    if not fingerprint:
        from sottovoce.common.models import load_model

        fingerprint = load_model(
            config.model.name, dtype="float32", cache_dir=cache_dir
        ).fingerprint
    state = RunState.open(run_dir, config, text, fingerprint)
    return Coordinator(config, state, fingerprint)


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes: the id ledgers before record keys were kept under."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def open_ledger(policy_path: Path, data_path: Path, *, read_only: bool = False) -> Ledger:
    """The lifetime ledger of a data file's records under a policy (see dataset_identity)."""
    policy = load_policy(policy_path)
    records = load_records(data_path, required_fields=policy.fitness.record_fields)
    return _dataset_ledger(policy, records, data_path, read_only=read_only)


def _dataset_ledger(
    policy: HolderPolicy, records: list[Record], data_path: Path, *, read_only: bool = False
) -> Ledger:
    from sottovoce.client.dataset_identity import open_dataset_ledger

    ledger = open_dataset_ledger(
        policy.ledger_dir,
        records,
        policy.max_bits,
        privacy=policy.privacy_limit(),
        legacy_id=file_sha256(data_path),
        read_only=read_only,
    )
    if ledger.inherited is not None and not read_only:
        log.warning("data set %s %s", ledger.dataset_id[:12], ledger.inherited.describe())
    return ledger


def open_holder(
    data_path: Path,
    policy_path: Path,
    *,
    holder_id: str,
    model_name: str = "smollm2-135m-instruct",
    dtype: str = "float32",
    status_path: Path | None = None,
    cache_dir: Path | None = None,
    max_batch: int = 32,
    loaded_inputs: tuple[HolderPolicy, list[Record], list[int]] | None = None,
) -> DataHolder:
    """A data holder over one data file, bound to its policy and its lifetime ledger.

    Everything checkable offline (the model, the data against the pinned fitness, the
    pinned parametrizations) is checked here, before any coordinator is dialled.
    ``loaded_inputs``: the policy and the numbered records the caller already read from
    these two files (the CLI reads them before importing torch, to fail fast).
    """
    if dtype not in DTYPE_NAMES:
        raise ConfigError(f"--dtype: must be one of {list(DTYPE_NAMES)} (got {dtype!r})")
    from sottovoce.client.holder import DataHolder, check_offline
    from sottovoce.common.fitness import examples_named
    from sottovoce.common.models import load_model

    if loaded_inputs is None:
        policy = load_policy(policy_path)
        records, lines = load_numbered_records(
            data_path, required_fields=policy.fitness.record_fields
        )
    else:
        policy, records, lines = loaded_inputs

    def load() -> LoadedModel:
        return load_model(model_name, dtype="float32", cache_dir=cache_dir)

    preloaded = [load()]  # an unknown model fails here, before a ledger is made
    with examples_named(lambda index: f"{data_path} line {lines[index]}"):
        check_offline(records, policy, preloaded[0], max_batch=max_batch)  # before a ledger

    def load_once() -> LoadedModel:
        return preloaded.pop() if preloaded else load()

    ledger = _dataset_ledger(policy, records, data_path)
    log.info("data set %s: ledger %s", ledger.dataset_id[:12], ledger.path)
    try:
        return DataHolder(
            holder_id,
            records,
            policy,
            ledger,
            load_once,
            compute_dtype=torch_dtype(dtype),
            max_batch=max_batch,
            status_path=status_path,
            checked_offline=True,
        )
    except BaseException:
        ledger.close()
        raise
