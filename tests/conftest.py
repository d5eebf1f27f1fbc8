"""Shared fixtures: everything is built in code, fast, and offline."""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

# Every process the tests start (servers, holders, simulations) runs torch on one thread:
# make test runs one worker per core, and more threads than cores spin instead of working.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
from hypothesis import HealthCheck, settings

if TYPE_CHECKING:
    import torch

# Property tests (tests/test_fuzz.py): small by default; bench/fuzz_guard.py picks "long".
_FUZZ = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
}
settings.register_profile("default", max_examples=40, **_FUZZ)
settings.register_profile("long", max_examples=3000, **_FUZZ)
settings.load_profile("default")


@pytest.hookimpl(wrapper=True)
def pytest_collection(session: pytest.Session) -> Iterator[object]:
    """Collect with the cyclic collector off, then freeze what collection imported.

    Collection imports torch, transformers and every module under test (this file imports
    torch in its fixtures, for that reason): millions of objects, none of them garbage.
    Collected with the collector on, they are walked again and again while they load; after
    the freeze, no collection during the tests, nor the one at each worker's exit, walks
    them (what sottovoce.common.startup does for the CLI's processes). About 5 s of CPU a
    worker; the collector is on again for the tests.
    """
    gc.disable()
    try:
        return (yield)
    finally:
        gc.freeze()
        gc.enable()


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


@pytest.fixture
def tiny_model() -> torch.nn.Module:
    from sottovoce.common.tiny_model import build_tiny_llama

    return build_tiny_llama(seed=0)
