"""What a holder shows its own operator: its status file (0600; never sent anywhere)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sottovoce.common.storage import atomic_write_json


@dataclass
class HolderStatus:
    """What the holder shows its own operator (never sent to the coordinator)."""

    run_id: str = ""
    answered: int = 0
    refused: int = 0
    defaulted: int = 0
    log_version: int = 0
    bits_this_run: float = 0.0
    lifetime_bits_spent: float = 0.0
    lifetime_bits_max: float = 0.0
    lifetime_epsilon_spent: float | None = None
    lifetime_epsilon_max: float | None = None
    last_incumbent_score: float | None = None
    compute_seconds: float = 0.0
    last_refusal: str | None = None
    finished: str | None = None
    history: list[float] = field(default_factory=list)

    def write(self, path: Path | None) -> None:
        """Replace the status file at ``path`` (if any) with this status and the time."""
        if path is None:
            return
        payload: dict[str, Any] = asdict(self)
        payload["time"] = time.time()
        atomic_write_json(path, payload)
