"""Scoring held-out examples with the base and the trained model, sharing the prefix work.

The simulation plays the operator of every party, so it may score the test split (never
seen by any holder, and nothing is tuned on it) and, as a fallback, the pooled training
data. The frozen part of the model below the first touched tensor runs once per example;
base and trained model differ only above it.
"""

from __future__ import annotations

import numpy as np
import torch

from sottovoce.client.evaluator import CandidateEvaluator, PrefixCache
from sottovoce.common.config import RunConfig
from sottovoce.common.data import Record
from sottovoce.common.dtypes import torch_dtype
from sottovoce.common.fitness import build_fitness
from sottovoce.common.models import LoadedModel
from sottovoce.common.parametrizations.registry import build_parametrization


class HeldOut:
    """Held-out scoring of base and trained model, sharing the prefix computation."""

    def __init__(self, config: RunConfig, loaded: LoadedModel):
        model: torch.nn.Module = loaded.model
        if config.model.dtype != "float32":
            model.to(torch_dtype(config.model.dtype))
        self.parametrization = build_parametrization(config.parametrization)
        self.parametrization.attach(model)
        fitness = build_fitness(config.fitness, loaded.tokenizer)
        self.evaluator = CandidateEvaluator(model, self.parametrization, fitness)
        self.cache = PrefixCache()

    def correct(self, examples: list[Record], *, reuse: bool = True) -> np.ndarray:
        _, correct = self.evaluator.score_incumbent(examples, self.cache if reuse else None)
        return correct
