"""Scoring candidates in place on a holder's examples: perturb, forward, restore.

All candidates of a task are scored on the same examples as the incumbent (paired
evaluation), so a comparison sees the difference the candidate makes, not the noise of
two different minibatches.

Two savings apply when the parametrization only touches the end of a decoder (the last
k blocks, the final norm), both exact in what they reuse:

* **Prefix reuse within a batch.** The activations entering the first touched block are
  the same for the incumbent and every candidate: computed once per batch, then only the
  suffix runs per candidate (the same modules on the same inputs).
* **Head-input cache across tasks.** When only the final norm is touched and the fitness
  reads only the last position (classification), the hidden state entering the final
  norm at the last position never changes during a run: the steps only move what comes
  after it. It is computed once per example and kept, so later tasks cost a norm and a
  few rows of the output head per example. The cache stays on the holder, like the data.

* **Prefix reuse across tasks** (``cache_prefixes``, for full-split runs): the same batch
  of the same examples has the same prefix in every round, so it is computed once per run.

When the output head is not touched, the logits are computed only for the tokens the
fitness reads (the label words); the logits tensor stops at the largest label id and the
other entries are -inf, which the fitness never looks at. These label logits equal a
full forward's up to float rounding (a smaller matrix product may sum in another order).

**The population in one batch.** A parametrization that can evaluate several candidates
in one forward (``Parametrization.population``: ``lowrank``, ``lora``) gets all of a
task's models (the incumbent, when it is scored, and every candidate) as groups of rows of
one batch: the batch's rows are repeated once per model, the shared base matmuls run once
over all of them, and each group's own low-rank term is added to its rows. Scores equal
one-at-a-time evaluation up to float rounding (stated where each kind defines it).

A generation fitness (``common/fitness.py``) scores by greedy decoding with the KV
cache; the evaluator hands it the model and never the logits, with no prefix reuse.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from sottovoce.client.divergence import DivergenceReference
from sottovoce.common.fitness import Fitness, GenerationFitness, PreparedBatch
from sottovoce.common.parametrizations.base import Parametrization
from sottovoce.common.protocol.answers import AnswerKind, encode_choice, rank_candidates
from sottovoce.common.protocol.messages import Candidate
from sottovoce.common.steplog import Step
from sottovoce.common.storage import canonical_json

Record = dict[str, object]

_LAYER_NAME = re.compile(r"^model\.layers\.(\d+)(\.|$)")
_SUFFIX_MODULES = ("model.norm", "lm_head")


class _PrefixDone(Exception):
    """Raised from a forward pre-hook to stop the forward pass once the prefix is computed."""


@dataclass
class Prefix:
    """Inputs captured at the first touched block, reused by every candidate."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    @property
    def hidden(self) -> torch.Tensor:
        value = self.args[0] if self.args else self.kwargs["hidden_states"]
        assert isinstance(value, torch.Tensor)
        return value


@dataclass(frozen=True)
class DecoderParts:
    """The decoder layout prefix reuse needs: ``model.layers``, ``model.norm``, ``lm_head``."""

    layers: nn.ModuleList
    norm: nn.Module
    head: nn.Linear


def decoder_parts(model: nn.Module) -> DecoderParts | None:
    """The model's decoder parts, or None if it is not laid out like Llama/Mistral/Qwen."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    norm = getattr(inner, "norm", None)
    head = getattr(model, "lm_head", None)
    if not (
        isinstance(layers, nn.ModuleList)
        and isinstance(norm, nn.Module)
        and isinstance(head, nn.Linear)
    ):
        return None
    return DecoderParts(layers=layers, norm=norm, head=head)


def suffix_start(model: nn.Module, touched: Sequence[str]) -> int | None:
    """Index of the first decoder layer whose computation can change, or None if unknown.

    Returns the number of layers when only the final norm / output head are touched, and
    None (no prefix reuse) when something before the layers (embeddings) is touched or
    the model does not have the decoder layout (see :class:`DecoderParts`).
    """
    parts = decoder_parts(model)
    if parts is None:
        return None
    first = len(parts.layers)
    for name in touched:
        match = _LAYER_NAME.match(name)
        if match:
            first = min(first, int(match.group(1)))
        elif not any(name == s or name.startswith(s + ".") for s in _SUFFIX_MODULES):
            return None
    return first if first > 0 else None


def record_key(record: Record) -> str:
    """A stable key for an example (its canonical JSON), for the head-input cache."""
    blob = canonical_json(record, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


class PrefixCache:
    """Prefix activations of a fixed example list, kept to score several models on it.

    Used for held-out reports: the base model and the trained model differ only in the
    suffix, so the (expensive) prefix of every test batch is computed once for both.
    """

    def __init__(self) -> None:
        self.entries: dict[int, Prefix] = {}


class CandidateEvaluator:
    """Scores the incumbent and candidates on the same examples; counts forward passes."""

    def __init__(
        self,
        model: nn.Module,
        parametrization: Parametrization,
        fitness: Fitness,
        *,
        max_batch: int = 32,
        reuse_prefix: bool = True,
        cache_head_inputs: bool = True,
        cache_prefixes: bool = False,
        batch_population: bool = True,
    ):
        self.model = model
        self.parametrization = parametrization
        self.fitness = fitness
        self.max_batch = max_batch
        self.batch_population = batch_population
        touched = parametrization.touched_modules()
        self.parts = decoder_parts(model)
        generates = isinstance(fitness, GenerationFitness)
        self.split = suffix_start(model, touched) if reuse_prefix and not generates else None
        self._label_rows = None if generates else _label_rows(model, fitness, touched)
        self._prefix_cache: dict[tuple[str, ...], Prefix] | None = (
            {} if cache_prefixes and self.split is not None else None
        )
        head_only = self.parts is not None and self.split == len(self.parts.layers)
        self._head_cache: dict[str, torch.Tensor] | None = (
            {} if cache_head_inputs and head_only and _last_position_only(fitness) else None
        )
        self.forward_passes = 0
        self.divergence: DivergenceReference | None = None
        self._moved = False

    @property
    def head_inputs(self) -> dict[str, torch.Tensor] | None:
        """The head-input cache (record key -> the final norm's input at the last position),
        or None when this evaluator keeps none (see the module docstring)."""
        return self._head_cache

    def share_head_inputs(self, cache: dict[str, torch.Tensor]) -> None:
        """Read and fill ``cache`` as this evaluator's head-input cache.

        Its entries depend only on the base model below the final norm and on the record,
        never on a run's steps, so evaluators of one base model (a benchmark's runs one
        after another) may share one: the holder computes each example's prefix once, not
        once a run. Entries computed in other batches equal the holder's own up to float
        rounding (padding changes the shapes of the matrix products).
        """
        if self._head_cache is None:
            raise ValueError("this evaluator keeps no head-input cache")
        self._head_cache = cache

    # -- the log ---------------------------------------------------------------------------
    def apply_steps(self, steps: Sequence[Step]) -> None:
        """Move the incumbent by the given log steps, in order (the canonical replay)."""
        for step in steps:
            self.parametrization.apply_step(step)
            self._moved = True

    # -- the divergence reference ----------------------------------------------------------
    @torch.inference_mode()
    def take_divergence_reference(self, prompts: Sequence[Record]) -> DivergenceReference:
        """Keep the base model's last-position logits on ``prompts`` (see client/divergence).

        Only on the base: once a log step has moved the weights the base is gone.
        """
        if self._moved:
            raise RuntimeError("the divergence reference must be taken before any log step")
        batches = self.fitness.prepare_prompts(prompts, max_batch=self.max_batch)
        prefixes = tuple(self._batch_prefix(batch, prompts) for batch in batches)
        base = tuple(
            self._last_logits(batch, prefix).float()
            for batch, prefix in zip(batches, prefixes, strict=True)
        )
        self.divergence = DivergenceReference(tuple(batches), prefixes, base)
        return self.divergence

    @torch.inference_mode()
    def divergence_now(self) -> float:
        """Mean KL(base || current model) in nats on the reference's prompts."""
        reference = self.divergence
        if reference is None:
            raise RuntimeError("no divergence reference was taken for this run")
        logits = [
            self._last_logits(batch, prefix)
            for batch, prefix in zip(reference.batches, reference.prefixes, strict=True)
        ]
        return reference.mean_kl(logits)

    # -- scoring ---------------------------------------------------------------------------
    def score(
        self,
        examples: Sequence[Record],
        candidates: Sequence[Candidate],
        *,
        with_incumbent: bool = True,
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """Per-example scores of the incumbent and of each candidate (higher is better).

        With ``with_incumbent=False`` the incumbent is not scored (an empty array stands
        for it): DPZero needs only the two perturbed models.
        """
        incumbent, per_candidate, _ = self._score_models(
            examples, candidates, with_incumbent=with_incumbent, with_divergence=False
        )
        return incumbent, per_candidate

    @torch.inference_mode()
    def _score_models(
        self,
        examples: Sequence[Record],
        candidates: Sequence[Candidate],
        *,
        with_incumbent: bool,
        with_divergence: bool,
    ) -> tuple[np.ndarray, list[np.ndarray], list[float]]:
        """Scores as :meth:`score`, and with ``with_divergence`` each model's mean KL to the
        base (incumbent first), read while that model's perturbation is in place."""
        if not examples:
            return np.empty(0), [np.empty(0) for _ in candidates], []
        batches = self.fitness.prepare(examples, max_batch=self.max_batch)
        # Prefixes first, then one perturbation per candidate around all batches: entering
        # and leaving a perturbation costs a little, so it happens once per candidate.
        prefixes = [self._batch_prefix(batch, examples) for batch in batches]
        models: list[Candidate | None] = [None] if with_incumbent else []
        models += list(candidates)
        if self.batch_population and len(models) > 1:
            scored = self._score_population(batches, prefixes, len(examples), models)
            if scored is not None:
                incumbent = scored[0] if with_incumbent else np.empty(0)
                return (
                    incumbent,
                    scored[1:] if with_incumbent else scored,
                    self._divergences(models) if with_divergence else [],
                )
        divergences: list[float] = []
        incumbent = np.empty(0)
        if with_incumbent:
            incumbent = self._score_batches(batches, prefixes, len(examples))
            if with_divergence:
                divergences.append(self.divergence_now())
        per_candidate = []
        for candidate in candidates:
            with self.parametrization.perturbed_candidate(candidate):
                per_candidate.append(self._score_batches(batches, prefixes, len(examples)))
                if with_divergence:
                    divergences.append(self.divergence_now())
        return incumbent, per_candidate, divergences

    def _divergences(self, models: Sequence[Candidate | None]) -> list[float]:
        """Each model's KL to the base, one model at a time (None: the incumbent).

        The batched population scores the fitness; the few KL prompts are read with each
        candidate's perturbation in place, exactly as the one-at-a-time path reads them.
        """
        divergences = []
        for model in models:
            if model is None:
                divergences.append(self.divergence_now())
                continue
            with self.parametrization.perturbed_candidate(model):
                divergences.append(self.divergence_now())
        return divergences

    def _score_population(
        self,
        batches: Sequence[PreparedBatch],
        prefixes: Sequence[Prefix | None],
        n: int,
        models: Sequence[Candidate | None],
    ) -> list[np.ndarray] | None:
        """Every model's scores from one forward per batch, or None if the kind cannot."""
        population = self.parametrization.population(models)
        if population is None:
            return None
        groups = len(models)
        scores = [np.empty(n, dtype=np.float64) for _ in models]
        with population:
            for batch, prefix in zip(batches, prefixes, strict=True):
                for group, values in enumerate(self._population_scores(batch, prefix, groups)):
                    scores[group][batch.example_index.numpy()] = values
        return scores

    def _population_scores(
        self, batch: PreparedBatch, prefix: Prefix | None, groups: int
    ) -> list[np.ndarray]:
        """One forward of ``groups`` copies of the batch's rows; each copy's scores."""
        repeated = repeat_batch(batch, groups)
        if isinstance(self.fitness, GenerationFitness):
            self.forward_passes += 1
            result = self.fitness.score_model(self.model, repeated)
            size = batch.size
            return [result.score[g * size : (g + 1) * size] for g in range(groups)]
        prefix_rows = None if prefix is None else repeat_prefix(prefix, batch.size, groups)
        logits = self._logits(repeated, prefix_rows)
        size = batch.size
        return [
            self.fitness.score(logits[g * size : (g + 1) * size], batch).score
            for g in range(groups)
        ]

    def _score_batches(
        self, batches: Sequence[PreparedBatch], prefixes: Sequence[Prefix | None], n: int
    ) -> np.ndarray:
        scores = np.empty(n, dtype=np.float64)
        for batch, prefix in zip(batches, prefixes, strict=True):
            scores[batch.example_index.numpy()] = self._scores(batch, prefix)
        return scores

    def choose(
        self, examples: Sequence[Record], candidates: Sequence[Candidate], kind: AnswerKind
    ) -> tuple[int, dict[str, float]]:
        """The answer choice (0 = keep the incumbent, k = candidate k-1) and local stats.

        A model's fitness is its mean score, less ``kl_weight`` times its KL to the base
        when the fitness penalizes divergence. The stats (mean scores, KLs) stay on the
        holder: they are for its own report only.
        """
        means, kls, fitness = self._fitness_of_models(examples, candidates, with_incumbent=True)
        best = int(np.argmax(fitness[1:]))
        better = fitness[1 + best] > fitness[0]
        choice = encode_choice(best if better else None)  # compare: 1 = better, 0 = not
        stats = {"incumbent_mean_score": means[0], "best_candidate_mean": means[1 + best]}
        if kls:
            stats["incumbent_kl"] = kls[0]
            stats["best_candidate_kl"] = kls[1 + best]
        return choice, stats

    def rank(
        self, examples: Sequence[Record], candidates: Sequence[Candidate], rank_depth: int
    ) -> tuple[tuple[int, ...], dict[str, float]]:
        """The top ``rank_depth`` candidates by fitness (0: all), ties to the lower index.

        A candidate's fitness is the one :meth:`choose` compares: its mean score, less
        ``kl_weight`` times its KL to the base when the fitness penalizes divergence, so a
        ranking orders exactly what a choice would pick among. The incumbent is not scored:
        a rank answer orders the candidates among themselves. The stats stay on the holder.
        """
        means, kls, fitness = self._fitness_of_models(examples, candidates, with_incumbent=False)
        ranking = rank_candidates(fitness, rank_depth)  # ValueError on a non-finite value
        stats = {"best_candidate_mean": means[ranking[0]]}
        if kls:
            stats["best_candidate_kl"] = kls[ranking[0]]
        return ranking, stats

    def _fitness_of_models(
        self, examples: Sequence[Record], candidates: Sequence[Candidate], *, with_incumbent: bool
    ) -> tuple[list[float], list[float], list[float]]:
        """Each model's mean score, its KL to the base (empty unless the fitness penalizes
        divergence) and its fitness, mean - kl_weight x KL: what choices and rankings
        compare (incumbent first when ``with_incumbent``)."""
        penalized = self.fitness.spec.penalizes_divergence
        incumbent, per_candidate, kls = self._score_models(
            examples, candidates, with_incumbent=with_incumbent, with_divergence=penalized
        )
        scored = [incumbent, *per_candidate] if with_incumbent else per_candidate
        means = [float(s.mean()) for s in scored]
        if not penalized:
            return means, kls, means
        weight = self.fitness.spec.kl_weight
        return means, kls, [mean - weight * kl for mean, kl in zip(means, kls, strict=True)]

    def finite_differences(
        self, examples: Sequence[Record], candidate: Candidate
    ) -> tuple[np.ndarray, float | None]:
        """Per-example two-point estimates of the loss's slope along z (DPZero, MeZO).

        ``(loss(x + s z) - loss(x - s z)) / (2 s)`` with ``s = candidate.scale`` and
        loss = -score, so a positive value means "moving along +z makes this example worse".
        Both models are scored on the same examples; the incumbent is not scored. Also
        returns the mean of the two models' scores (the incumbent's up to O(s^2)), a
        local training-fitness reading that stays on the holder; None for an empty batch.
        """
        scale = candidate.scale
        mirrored = (candidate, Candidate(seed=candidate.seed, scale=-scale))
        _, (plus, minus) = self.score(examples, mirrored, with_incumbent=False)
        mean_score = float((plus.mean() + minus.mean()) / 2) if len(plus) else None
        return (minus - plus) / (2.0 * scale), mean_score

    def score_incumbent(
        self, examples: Sequence[Record], cache: PrefixCache | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per-example scores and correctness of the current incumbent (for reports)."""
        n = len(examples)
        scores = np.empty(n, dtype=np.float64)
        correct = np.empty(n, dtype=bool)
        with torch.inference_mode():
            batches = self.fitness.prepare(examples, max_batch=self.max_batch)
            for number, batch in enumerate(batches):
                prefix = cache.entries.get(number) if cache is not None else None
                if prefix is None:
                    prefix = self._batch_prefix(batch, examples)
                    if cache is not None and prefix is not None:
                        cache.entries[number] = prefix
                if isinstance(self.fitness, GenerationFitness):
                    result = self.fitness.score_model(self.model, batch)
                else:
                    result = self.fitness.score(self._logits(batch, prefix), batch)
                scores[result.example_index] = result.score
                correct[result.example_index] = result.correct
        return scores, correct

    # -- forward passes --------------------------------------------------------------------
    def _last_logits(self, batch: PreparedBatch, prefix: Prefix | None) -> torch.Tensor:
        """The full next-token logits (rows, vocab) at the last position of ``batch``."""
        if prefix is None:
            self.forward_passes += 1
            return cast(torch.Tensor, self.model(**batch.model_inputs()).logits[:, -1, :])
        assert self.split is not None and self.parts is not None
        hidden = suffix_hidden(self.parts, self.split, prefix, 1)
        return cast(torch.Tensor, self.parts.head(hidden)[:, -1, :])

    def _scores(self, batch: PreparedBatch, prefix: Prefix | None) -> np.ndarray:
        if isinstance(self.fitness, GenerationFitness):
            self.forward_passes += 1
            return self.fitness.score_model(self.model, batch).score
        return self.fitness.score(self._logits(batch, prefix), batch).score

    def _logits(self, batch: PreparedBatch, prefix: Prefix | None) -> torch.Tensor:
        if prefix is None:
            self.forward_passes += 1
            return cast(torch.Tensor, self.model(**batch.model_inputs()).logits)
        return self._suffix_logits(batch, prefix)

    def _batch_prefix(self, batch: PreparedBatch, examples: Sequence[Record]) -> Prefix | None:
        """The prefix for this batch: from the head-input cache, or computed now."""
        if self.split is None:
            return None
        if self._head_cache is None:
            if self._prefix_cache is None:
                return self._prefix(batch)
            key = tuple(record_key(examples[int(i)]) for i in batch.example_index)
            if key not in self._prefix_cache:
                self._prefix_cache[key] = self._prefix(batch)
            return self._prefix_cache[key]
        keys = [record_key(examples[int(i)]) for i in batch.example_index]
        missing = {
            key: int(i)
            for key, i in zip(keys, batch.example_index, strict=True)
            if key not in self._head_cache
        }
        if missing:
            # Only the examples never seen run the prefix: with random (Poisson) batches
            # almost every batch has one new example, and the rest are cached already.
            new = list(missing.values())
            for sub in self.fitness.prepare([examples[i] for i in new], max_batch=self.max_batch):
                last = self._prefix(sub).hidden[:, -1:, :]
                for row, index in enumerate(sub.example_index):
                    self._head_cache[record_key(examples[new[int(index)]])] = last[row].clone()
        return Prefix(args=(torch.stack([self._head_cache[key] for key in keys]),), kwargs={})

    def _prefix(self, batch: PreparedBatch) -> Prefix:
        """Run the model up to the first touched block and capture that block's inputs."""
        self.forward_passes += 1
        return capture_prefix(self.model, self._suffix_entry(), batch)

    def _suffix_entry(self) -> nn.Module:
        assert self.split is not None and self.parts is not None
        layers = self.parts.layers
        return layers[self.split] if self.split < len(layers) else self.parts.norm

    def _suffix_logits(self, batch: PreparedBatch, prefix: Prefix) -> torch.Tensor:
        """Layers ``split..`` + final norm + head on the captured inputs (as the model does)."""
        assert self.split is not None and self.parts is not None
        return self._head(suffix_hidden(self.parts, self.split, prefix, batch.logits_to_keep))

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        assert self.parts is not None
        head = self.parts.head
        if self._label_rows is None:
            return cast(torch.Tensor, head(hidden))
        rows = self._label_rows.to(hidden.device)
        small = torch.nn.functional.linear(hidden, head.weight.index_select(0, rows))
        # Only as wide as the largest label id: the fitness reads those columns alone.
        width = int(self._label_rows.max()) + 1
        logits = hidden.new_full((*hidden.shape[:-1], width), float("-inf"))
        logits[..., rows] = small
        return logits


def capture_prefix(model: nn.Module, entry: nn.Module, batch: PreparedBatch) -> Prefix:
    """Run ``model`` on ``batch`` only until ``entry`` is called; return ``entry``'s inputs.

    The prefix is what every variant of the model that differs only from ``entry`` on
    shares: computed once, it is reused by all candidates (and by ``sottovoce evaluate``'s
    reference models).
    """
    captured: list[Prefix] = []

    def capture(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        captured.append(Prefix(args=args, kwargs=kwargs))
        raise _PrefixDone

    handle = entry.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        model(**batch.model_inputs())
    except _PrefixDone:
        pass
    finally:
        handle.remove()
    return captured[0]


def suffix_hidden(parts: DecoderParts, split: int, prefix: Prefix, keep: int) -> torch.Tensor:
    """Layers ``split..`` and the final norm on a captured prefix: the head's input.

    ``keep`` > 0 keeps only the last ``keep`` positions before the norm (what the scorer
    reads). Runs under whatever grad mode the caller chose, so training can use it too.
    """
    hidden = prefix.hidden
    if split < len(parts.layers):
        kwargs = {k: v for k, v in prefix.kwargs.items() if k != "hidden_states"}
        for layer in parts.layers[split:]:
            out = layer(hidden, *prefix.args[1:], **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
    if keep > 0:
        hidden = hidden[:, -keep:, :]
    return cast(torch.Tensor, parts.norm(hidden))


def repeat_batch(batch: PreparedBatch, groups: int) -> PreparedBatch:
    """The batch's rows ``groups`` times over, group-major (rows ``g*B .. g*B+B-1``)."""
    return dataclasses.replace(
        batch,
        input_ids=batch.input_ids.repeat(groups, 1),
        attention_mask=batch.attention_mask.repeat(groups, 1),
        position_ids=batch.position_ids.repeat(groups, 1),
        example_index=batch.example_index.repeat(groups),
        labels=None if batch.labels is None else batch.labels.repeat(groups),
        target_lengths=None
        if batch.target_lengths is None
        else batch.target_lengths.repeat(groups),
        targets=None if batch.targets is None else batch.targets * groups,
    )


_NOT_PER_ROW = frozenset({"cache_position"})  # kwargs indexed by position, not by row


def repeat_prefix(prefix: Prefix, rows: int, groups: int) -> Prefix:
    """A captured prefix for ``groups`` copies of its ``rows`` rows, group-major.

    Every tensor whose first dimension is the batch's (hidden states, position embeddings,
    position ids, a 4-D attention mask) is repeated; anything else (a broadcast mask, the
    cache positions) is per position, not per row, and kept as it is.
    """

    def repeat(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            if value.dim() >= 1 and value.shape[0] == rows:
                return value.repeat(groups, *([1] * (value.dim() - 1)))
            return value
        if isinstance(value, tuple):
            return tuple(repeat(item) for item in value)
        return value

    kwargs = {
        name: value if name in _NOT_PER_ROW else repeat(value)
        for name, value in prefix.kwargs.items()
    }
    return Prefix(args=tuple(repeat(arg) for arg in prefix.args), kwargs=kwargs)


def _label_rows(model: nn.Module, fitness: Fitness, touched: Sequence[str]) -> torch.Tensor | None:
    """Output rows the fitness reads, if only those need computing (head untouched, no bias)."""
    ids = getattr(fitness, "label_token_ids", None)
    head = getattr(model, "lm_head", None)
    if ids is None or not isinstance(head, nn.Linear) or head.bias is not None:
        return None
    if any(name == "lm_head" or name.startswith("lm_head.") for name in touched):
        return None
    return torch.tensor(list(ids), dtype=torch.long)


def _last_position_only(fitness: Fitness) -> bool:
    """True for a fitness that reads only the logits of the last position (classification)."""
    return getattr(fitness, "label_token_ids", None) is not None
