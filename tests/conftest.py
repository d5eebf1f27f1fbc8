"""Shared fixtures: everything is built in code, fast, and offline."""

from __future__ import annotations

import pytest
import torch

from sottovoce.common.models import build_tiny_llama


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture
def tiny_model() -> torch.nn.Module:
    return build_tiny_llama(seed=0)
