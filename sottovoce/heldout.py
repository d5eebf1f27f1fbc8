"""Scoring held-out examples with the base and the trained model, sharing the prefix work.

The simulation plays the operator of every party, so it may score the test split (never
seen by any holder, and nothing is tuned on it) and, as a fallback, the pooled training
data. The frozen part of the model below the first touched tensor runs once per example;
base and trained model differ only above it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from sottovoce.client.evaluator import CandidateEvaluator, PrefixCache, suffix_start
from sottovoce.common.config import RunConfig
from sottovoce.common.data import Record
from sottovoce.common.dtypes import torch_dtype
from sottovoce.common.fitness import build_fitness
from sottovoce.common.models import LoadedModel
from sottovoce.common.parametrizations.registry import build_parametrization
from sottovoce.common.quality import TextWindows, text_windows
from sottovoce.evidence.drift import DriftMeter
from sottovoce.evidence.scoring import SharedPrefixScorer

HELDOUT = "heldout"


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
        self.tokenizer = loaded.tokenizer

    def correct(self, examples: list[Record], *, reuse: bool = True) -> np.ndarray:
        _, correct = self.evaluator.score_incumbent(examples, self.cache if reuse else None)
        return correct

    def quality_meter(
        self,
        heldout: list[Record],
        ood: dict[str, list[Record]],
        on_forward: Callable[[], None] | None = None,
    ) -> tuple[DriftMeter, TextWindows]:
        """Measure the base (the model at x = 0) on the held-out split, the out-of-domain sets
        and the general text, keeping the prefix the run's model shares with it.

        ``on_forward`` is called after each forward pass (the progress display)."""
        model = self.evaluator.model
        split = suffix_start(model, self.parametrization.touched_modules())
        scorer = SharedPrefixScorer(model, self.evaluator.fitness, split)
        scorer.on_forward = on_forward
        scorer.add(HELDOUT, heldout)
        for name, records in ood.items():
            scorer.add(name, records)
        positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        windows = text_windows(self.tokenizer, max_positions=positions)
        meter = DriftMeter(scorer, model, prompt_sets=[HELDOUT, *ood], windows=windows)
        scorer.on_forward = None  # the base's phase is over; later measures are not in it
        return meter, windows
