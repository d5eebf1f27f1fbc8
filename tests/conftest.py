"""Shared fixtures: everything is built in code, fast, and offline."""

from __future__ import annotations

import os

# Every process the tests start (servers, holders, simulations) runs torch on one thread:
# make test runs one worker per core, and more threads than cores spin instead of working.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch
from hypothesis import HealthCheck, settings

from sottovoce.common.tiny_model import build_tiny_llama

# Property tests (tests/test_fuzz.py): small by default; bench/fuzz_guard.py picks "long".
_FUZZ = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
}
settings.register_profile("default", max_examples=40, **_FUZZ)
settings.register_profile("long", max_examples=3000, **_FUZZ)
settings.load_profile("default")


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture
def tiny_model() -> torch.nn.Module:
    return build_tiny_llama(seed=0)
