"""The quality measures of :mod:`sottovoce.common.quality` for many models, from one cached prefix.

``sottovoce simulate``, ``sottovoce evaluate`` and the drift sweep measure several models
(the base, a run's result, a baseline, a sweep's settings) that all equal the base before
some decoder block. :class:`DriftMeter` runs the base on every set once through a
:class:`~sottovoce.evidence.scoring.SharedPrefixScorer` and keeps what the comparison
needs of it:

* the base's perplexity and its per-example correctness and label margin on each prompt set;
* for the KL, the base's *head inputs* at each prompt's last position (a few KB) and a
  copy of the base's output head (one matrix, 113 MB for SmolLM2), not the base's
  full-vocabulary distributions (200 MB per 1,000 prompts). So the base may change in place
  afterwards: ``simulate`` moves the same module along the run's log and measures it again.

A model is then measured by its suffix alone. An unchanged model runs the same operations
on the same inputs as the reference, so its perplexity ratio is exactly 1.0 and its KL 0.0.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from sottovoce.common.data import Record
from sottovoce.common.quality import (
    Perplexity,
    QualityFigures,
    TextWindows,
    label_margin,
    last_position_kl,
    window_nll,
)
from sottovoce.evidence.scoring import SharedPrefixScorer, decoder_layout

TEXT_SET = "general-text"


class DriftMeter:
    """Perplexity, per-set accuracy and KL of any model against the base, cheaply.

    ``prompt_sets`` are names of sets already added to ``scorer``; ``windows`` (the
    general-text set) is added under :data:`TEXT_SET`. ``base`` is measured at once.
    """

    def __init__(
        self,
        scorer: SharedPrefixScorer,
        base: nn.Module,
        *,
        prompt_sets: Sequence[str],
        windows: TextWindows | None,
    ):
        self.scorer = scorer
        self.prompt_sets = list(prompt_sets)
        self.windows = windows
        if windows is not None:
            scorer.add_batches(TEXT_SET, windows.batches)
        head = decoder_layout(base).head
        self._weight = head.weight.detach().clone()
        self._bias = None if head.bias is None else head.bias.detach().clone()
        with torch.no_grad():
            self._reference = {
                name: [
                    scorer.head_inputs(base, batch, prefix)[:, -1, :].clone()
                    for batch, prefix in scorer.batches(name)
                ]
                for name in self.prompt_sets
            }
        self.base = self.measure(base)

    def records(self, name: str) -> list[Record]:
        return self.scorer.records(name)

    def measure(self, model: nn.Module) -> QualityFigures:
        """``model``'s perplexity, correctness per prompt set and mean KL to the base."""
        head = decoder_layout(model).head
        correct: dict[str, np.ndarray] = {}
        kl: dict[str, float] = {}
        margins: dict[str, np.ndarray] = {}
        with torch.no_grad():
            for name in self.prompt_sets:
                parts, divergences, margin_parts = [], [], []
                batches = self.scorer.batches(name)
                for (batch, prefix), reference in zip(batches, self._reference[name], strict=True):
                    tuned = head(self.scorer.head_inputs(model, batch, prefix)[:, -1, :])
                    base = nn.functional.linear(reference, self._weight, self._bias)
                    divergences.append(last_position_kl(base, tuned))
                    parts.append((batch, self.scorer.fitness.score(tuned.unsqueeze(1), batch)))
                    margin_parts.append(label_margin(self.scorer.fitness, tuned.unsqueeze(1)))
                n = len(self.scorer.records(name))
                flags = np.zeros(n, dtype=bool)
                for _, scores in parts:
                    flags[scores.example_index] = scores.correct
                correct[name] = flags
                if margin_parts and all(m is not None for m in margin_parts):
                    values = np.zeros(n)
                    for (_, scores), margin in zip(parts, margin_parts, strict=True):
                        values[scores.example_index] = margin
                    margins[name] = values
                kl[name] = float(torch.cat(divergences).mean().item()) if divergences else 0.0
            perplexity = None
            if self.windows is not None:
                total = 0.0
                for batch, prefix in self.scorer.batches(TEXT_SET):
                    total += window_nll(head(self.scorer.head_inputs(model, batch, prefix)), batch)
                perplexity = Perplexity(total, self.windows.scored_tokens)
        return QualityFigures(perplexity=perplexity, correct=correct, kl=kl, margins=margins)
