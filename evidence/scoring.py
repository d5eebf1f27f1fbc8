"""Scoring many fine-tuned variants of one base model on fixed example sets, cheaply.

An evaluation scores the base model, the run's model, the backprop baseline and several
reference models on the same members, non-members and held-out sets. When all of them
differ from the base only from decoder block ``split`` on (a scale on the final norm, LoRA
on the last blocks), the blocks before ``split`` compute the same activations for all of
them: :class:`SharedPrefixScorer` runs that prefix once per example set and keeps it, and
each model runs only its own suffix. The baseline trainer trains on the same cached prefix.
Without a shared prefix (``split`` None) every model runs full forwards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from sottovoce.client.evaluator import (
    DecoderParts,
    Prefix,
    capture_prefix,
    decoder_parts,
    suffix_hidden,
)
from sottovoce.common.data import Record
from sottovoce.common.fitness import ExampleScores, Fitness, PreparedBatch, merge_scores


def changed_tensors(base: nn.Module, model: nn.Module) -> list[str]:
    """Names of the tensors whose values differ between two models of the same architecture."""
    base_state = base.state_dict()
    return [
        name
        for name, tensor in model.state_dict().items()
        if name not in base_state or not torch.equal(base_state[name], tensor)
    ]


@dataclass
class ExampleSet:
    """One named list of examples, cut into batches, with their prefixes once computed."""

    records: list[Record]
    batches: list[PreparedBatch]
    prefixes: list[Prefix] | None
    subset: bool = False  # batches of another set: their example_index points into that set


class SharedPrefixScorer:
    """Per-example scores of any model that equals ``base`` before block ``split``."""

    def __init__(
        self, base: nn.Module, fitness: Fitness, split: int | None, *, max_batch: int = 32
    ):
        self.base = base
        self.fitness = fitness
        self.split = split
        self.max_batch = max_batch
        self.forward_passes = 0
        # Called after every forward pass (a progress display: a base model's first
        # measurement on a real model is minutes of them).
        self.on_forward: Callable[[], None] | None = None
        self._sets: dict[str, ExampleSet] = {}

    def _counted(self) -> None:
        self.forward_passes += 1
        if self.on_forward is not None:
            self.on_forward()

    def add(self, name: str, records: Sequence[Record]) -> None:
        """Prepare ``records`` under ``name`` and run the shared prefix on them once."""
        batches = self.fitness.prepare(list(records), self.max_batch)
        self._sets[name] = ExampleSet(list(records), batches, self._prefixes(batches))

    def add_batches(self, name: str, batches: Sequence[PreparedBatch]) -> None:
        """Batches that are not fitness examples (general-text windows), prefix run once."""
        self._sets[name] = ExampleSet([], list(batches), self._prefixes(batches))

    def _prefixes(self, batches: Sequence[PreparedBatch]) -> list[Prefix] | None:
        """The shared prefix of every batch, run once on the base (None: no split)."""
        if self.split is None:
            return None
        entry = self._entry(decoder_layout(self.base))
        prefixes = []
        with torch.no_grad():
            for batch in batches:
                prefixes.append(capture_prefix(self.base, entry, batch))
                self._counted()
        return prefixes

    def add_subset(self, name: str, of: str, batch_indices: Sequence[int]) -> None:
        """A set made of some of ``of``'s batches, sharing their prefixes (no new forwards).

        How LiRA's reference models get their random halves of the reference pool without
        running the pool's prefix again.
        """
        source = self._sets[of]
        chosen = sorted(set(batch_indices))
        batches = [source.batches[i] for i in chosen]
        prefixes = None if source.prefixes is None else [source.prefixes[i] for i in chosen]
        records = [source.records[int(j)] for batch in batches for j in batch.example_index]
        self._sets[name] = ExampleSet(records, batches, prefixes, subset=True)

    def n_batches(self, name: str) -> int:
        return len(self._sets[name].batches)

    def records(self, name: str) -> list[Record]:
        return self._sets[name].records

    def score(self, model: nn.Module, name: str) -> ExampleScores:
        """The fitness's per-example scores of ``model`` on set ``name`` (original order)."""
        if self._sets[name].subset:
            raise ValueError(f"set {name!r} is a subset for training; score its source set")
        parts = []
        with torch.no_grad():
            for batch, prefix in self.batches(name):
                parts.append(self.fitness.score(self.logits(model, batch, prefix), batch))
        return merge_scores(parts, len(self._sets[name].records))

    def batches(self, name: str) -> Iterator[tuple[PreparedBatch, Prefix | None]]:
        """The set's batches with their cached prefixes (None: run the full model)."""
        example_set = self._sets[name]
        prefixes: Sequence[Prefix | None] = example_set.prefixes or [None] * len(
            example_set.batches
        )
        yield from zip(example_set.batches, prefixes, strict=True)

    def logits(self, model: nn.Module, batch: PreparedBatch, prefix: Prefix | None) -> torch.Tensor:
        """``model``'s logits at the positions the fitness reads, from the prefix if given."""
        self._counted()
        if prefix is None or self.split is None:
            return cast(torch.Tensor, model(**batch.model_inputs()).logits)
        parts = decoder_layout(model)
        hidden = suffix_hidden(parts, self.split, prefix, batch.logits_to_keep)
        return cast(torch.Tensor, parts.head(hidden))

    def head_inputs(
        self, model: nn.Module, batch: PreparedBatch, prefix: Prefix | None
    ) -> torch.Tensor:
        """What ``model``'s output head reads (after the final norm) at the kept positions.

        From the prefix if given; otherwise the decoder runs in full (without the head).
        """
        self._counted()
        parts = decoder_layout(model)
        if prefix is not None and self.split is not None:
            return suffix_hidden(parts, self.split, prefix, batch.logits_to_keep)
        inner = getattr(_unwrapped(model), "model", None)
        if not isinstance(inner, nn.Module):
            raise TypeError(f"{type(model).__name__} has no inner decoder to run")
        inputs = {k: v for k, v in batch.model_inputs().items() if k != "logits_to_keep"}
        hidden: torch.Tensor = inner(**inputs).last_hidden_state
        keep = batch.logits_to_keep
        return hidden[:, -keep:, :] if keep > 0 else hidden

    def _entry(self, parts: DecoderParts) -> nn.Module:
        assert self.split is not None
        return parts.layers[self.split] if self.split < len(parts.layers) else parts.norm


def decoder_layout(model: nn.Module) -> DecoderParts:
    """The decoder parts of a model, through a peft wrapper; TypeError if it has none."""
    parts = decoder_parts(_unwrapped(model))
    if parts is None:
        raise TypeError(f"{type(model).__name__} has no decoder layout to share a prefix with")
    return parts


def _unwrapped(model: nn.Module) -> nn.Module:
    """The plain transformers model inside a peft wrapper (whose layers peft changed in place)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model
