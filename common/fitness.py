"""Fitness functions: how a data holder scores a model on its own examples.

Scoring is split in two phases so the evaluator can run the model however it likes (a plain
full forward, a cached prompt prefix plus suffix, perturbations in forward hooks):

1. :meth:`Fitness.prepare` validates and tokenizes the examples once, sorts them by token
   length and cuts them into left-padded sub-batches (:class:`PreparedBatch`), so little
   compute goes to padding and every prompt ends at the last position.
2. :meth:`Fitness.score` turns the logits of one sub-batch into per-example scores
   (:class:`ExampleScores`: a float64 score, higher is better, and a correct flag);
   :func:`merge_scores` puts sub-batches back into the examples' original order.

The fitness itself (template, label words, fields) comes from a :class:`FitnessSpec` that
the holder pins in its policy, so a coordinator cannot craft the question it asks.

**Generation** (:class:`GenerationFitness`), for reasoning tasks (GSM8K), asks whether the
model's own continuation reaches the right answer, not how likely the reference text is.
A holder renders the pinned prompt, decodes greedily (``do_sample=False``, one beam,
Hugging Face's ``generate`` with its KV cache) at most the pinned ``max_new_tokens`` tokens
for a whole left-padded batch at once, reads the answer from the decoded text with the
pinned extractor (:mod:`sottovoce.common.protocol.extractors`) and compares it with the one
the same extractor reads from the record's target: score 1.0 if they match, else 0.0. The
text never leaves the holder; only the answer mechanism's choice or ranking does. Every row
decodes until the end-of-sequence token or ``max_new_tokens`` (a finished row is padded
while the others go on, so a batch costs its longest row). Greedy argmax can flip between
devices or batch layouts when two logits tie to rounding: exact-match scores are
reproducible on one device and batch size.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt
import torch
from transformers import PreTrainedTokenizerBase

from sottovoce.common.data import Record
from sottovoce.common.errors import ConfigError, DataError
from sottovoce.common.protocol.extractors import EXTRACTORS, answers_match
from sottovoce.common.protocol.messages import FitnessSpec, check_fitness_spec, template_fields

DEFAULT_MAX_BATCH = 32


@dataclass(frozen=True)
class PreparedBatch:
    """One left-padded sub-batch, ready for ``model(**batch.model_inputs())``.

    ``logits_to_keep`` is how many final positions the scorer needs (1 for classification;
    the longest target + 1 for completion); a scorer also accepts logits for every position.
    ``position_ids`` count from 0 at each row's first real token, as if it were unpadded.
    ``example_index`` gives each row's position in the list passed to ``prepare``.
    ``labels`` (classification: index of the right label word) and ``target_lengths``
    (completion: the target is the row's last ``target_lengths[i]`` tokens) feed the scorer.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    logits_to_keep: int
    example_index: torch.Tensor
    labels: torch.Tensor | None = None
    target_lengths: torch.Tensor | None = None
    targets: tuple[str, ...] | None = None  # generation: each row's target text

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def n_tokens(self) -> int:
        """Real (unpadded) tokens in the batch."""
        return int(self.attention_mask.sum().item())

    def to(self, device: torch.device | str) -> PreparedBatch:
        """The same batch with every tensor on ``device``."""
        return replace(
            self,
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            position_ids=self.position_ids.to(device),
            labels=None if self.labels is None else self.labels.to(device),
            target_lengths=None if self.target_lengths is None else self.target_lengths.to(device),
        )

    def model_inputs(self) -> dict[str, object]:
        """Keyword arguments for a Hugging Face causal LM forward (no KV cache is built)."""
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "position_ids": self.position_ids,
            "logits_to_keep": self.logits_to_keep,
            "use_cache": False,
        }


@dataclass(frozen=True)
class ExampleScores:
    """Per-example results: ``score`` (float64, higher is better) and ``correct`` (bool)."""

    score: npt.NDArray[np.float64]
    correct: npt.NDArray[np.bool_]
    example_index: npt.NDArray[np.int64]

    def __len__(self) -> int:
        return int(self.score.shape[0])

    def mean_score(self) -> float:
        return float(self.score.mean())

    def accuracy(self) -> float:
        return float(self.correct.mean())


def merge_scores(parts: Sequence[ExampleScores], n_examples: int | None = None) -> ExampleScores:
    """Concatenate sub-batch scores and restore the original example order.

    With ``n_examples``, checks that the parts cover examples ``0..n_examples-1`` exactly once.
    """
    if not parts:
        empty = np.zeros(0)
        return ExampleScores(empty.astype(np.float64), empty.astype(bool), empty.astype(np.int64))
    index = np.concatenate([part.example_index for part in parts])
    order = np.argsort(index, kind="stable")
    index = index[order]
    if np.any(index[1:] == index[:-1]):
        raise ValueError("merge_scores: an example index occurs twice")
    if n_examples is not None and not np.array_equal(index, np.arange(n_examples)):
        raise ValueError(f"merge_scores: parts do not cover examples 0..{n_examples - 1}")
    return ExampleScores(
        score=np.concatenate([part.score for part in parts])[order],
        correct=np.concatenate([part.correct for part in parts])[order],
        example_index=index,
    )


@dataclass(frozen=True)
class _Encoded:
    """One validated, tokenized example: its tokens and what the scorer needs about it."""

    token_ids: list[int]
    label: int = -1
    target_length: int = 0
    target: str | None = None  # generation: the target text the extractor reads


class Fitness(ABC):
    """Tokenize once (:meth:`prepare`), then score any model's logits (:meth:`score`)."""

    def __init__(self, spec: FitnessSpec, tokenizer: PreTrainedTokenizerBase) -> None:
        self.spec = spec
        self.tokenizer = tokenizer
        try:
            self.template_fields = template_fields(spec.prompt_template)
        except ValueError as err:
            raise ConfigError(f"fitness.{err}") from None
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = tokenizer.eos_token_id
        if pad is None:
            raise ConfigError(f"tokenizer {_tokenizer_name(tokenizer)} has no pad or eos token")
        self.pad_id = int(pad)

    def prepare(
        self,
        examples: Sequence[Record],
        max_batch: int = DEFAULT_MAX_BATCH,
        *,
        sort_by_length: bool = True,
    ) -> list[PreparedBatch]:
        """Validate and tokenize ``examples``; cut them into sub-batches of ``max_batch``.

        Sorting by token length (the default) puts similar lengths together to cut padding;
        ``example_index`` keeps track of where each row came from.
        """
        if max_batch < 1:
            raise ConfigError(f"max_batch must be >= 1, got {max_batch}")
        encoded = self._encode_all(examples)
        order = list(range(len(encoded)))
        if sort_by_length:
            order.sort(key=lambda i: len(encoded[i].token_ids))
        chunks = [order[start : start + max_batch] for start in range(0, len(order), max_batch)]
        return [self._collate([encoded[i] for i in chunk], chunk) for chunk in chunks]

    def prepare_prompts(
        self, examples: Sequence[Record], max_batch: int = DEFAULT_MAX_BATCH
    ) -> list[PreparedBatch]:
        """The rendered prompts alone (no label, no target), left-padded so each ends at the
        last position: what a next-token distribution "after the prompt" is read from."""
        if max_batch < 1:
            raise ConfigError(f"max_batch must be >= 1, got {max_batch}")
        token_ids = self._tokenize(self._render_prompts(examples), special=True)
        for index, ids in enumerate(token_ids):
            if not ids:
                raise DataError(f"{_where(examples[index], index)}: the prompt has no tokens")
        order = sorted(range(len(token_ids)), key=lambda i: len(token_ids[i]))
        chunks = [order[start : start + max_batch] for start in range(0, len(order), max_batch)]
        return [
            replace(self._collate([_Encoded(token_ids[i]) for i in chunk], chunk), logits_to_keep=1)
            for chunk in chunks
        ]

    @abstractmethod
    def score(self, logits: torch.Tensor, batch: PreparedBatch) -> ExampleScores:
        """Per-example scores of one sub-batch from the model's logits (B, positions, vocab)."""

    @abstractmethod
    def _encode_all(self, examples: Sequence[Record]) -> list[_Encoded]:
        """Validate every example and tokenize it (DataError naming example and field)."""

    @abstractmethod
    def _logits_to_keep(self, rows: Sequence[_Encoded]) -> int:
        """How many final positions of logits the scorer needs for these rows."""

    def _render_prompts(self, examples: Sequence[Record]) -> list[str]:
        prompts = []
        for index, record in enumerate(examples):
            values = {name: _field(record, index, name) for name in self.template_fields}
            prompts.append(self.spec.prompt_template.format(**values))
        return prompts

    def _tokenize(self, texts: list[str], *, special: bool) -> list[list[int]]:
        if not texts:
            return []
        encoded = self.tokenizer(texts, add_special_tokens=special)["input_ids"]
        return [list(ids) for ids in encoded]

    def _collate(self, rows: Sequence[_Encoded], index: Sequence[int]) -> PreparedBatch:
        width = max(len(row.token_ids) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            n = len(row.token_ids)
            input_ids[r, width - n :] = torch.tensor(row.token_ids, dtype=torch.long)
            attention_mask[r, width - n :] = 1
            position_ids[r, width - n :] = torch.arange(n)
        return PreparedBatch(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            logits_to_keep=self._logits_to_keep(rows),
            example_index=torch.tensor(list(index), dtype=torch.long),
            labels=_optional_tensor([row.label for row in rows], valid=lambda x: x >= 0),
            target_lengths=_optional_tensor(
                [row.target_length for row in rows], valid=lambda x: x > 0
            ),
            targets=None if rows[0].target is None else tuple(str(row.target) for row in rows),
        )


class ClassificationFitness(Fitness):
    """Score = log-probability of the right label word among the label words only.

    The label words' logits at the prompt's last position are log-softmaxed over the label
    words (a calibrated log-likelihood that ignores the rest of the vocabulary); the score is
    the entry of the right label, and the example is correct if that label's logit is the
    largest (ties go to the first label word).
    """

    def __init__(self, spec: FitnessSpec, tokenizer: PreTrainedTokenizerBase) -> None:
        if spec.kind != "classification":
            raise ConfigError(f"ClassificationFitness got a fitness of kind {spec.kind!r}")
        super().__init__(spec, tokenizer)
        self.label_token_ids = _label_token_ids(spec.label_words, tokenizer)

    def _encode_all(self, examples: Sequence[Record]) -> list[_Encoded]:
        labels = [self._label(record, index) for index, record in enumerate(examples)]
        token_ids = self._tokenize(self._render_prompts(examples), special=True)
        for index, ids in enumerate(token_ids):
            if not ids:
                raise DataError(f"{_where(examples[index], index)}: the prompt has no tokens")
        return [_Encoded(ids, label=label) for ids, label in zip(token_ids, labels, strict=True)]

    def _label(self, record: Record, index: int) -> int:
        value = _field(record, index, self.spec.label_field)
        n_words = len(self.spec.label_words)
        label = _as_index(value)
        if label is None or not 0 <= label < n_words:
            raise DataError(
                f"{_where(record, index)}: field {self.spec.label_field!r} must be an integer "
                f"index into {n_words} label words, got {_short(value)}"
            )
        return label

    def _logits_to_keep(self, rows: Sequence[_Encoded]) -> int:
        return 1

    def score(self, logits: torch.Tensor, batch: PreparedBatch) -> ExampleScores:
        if batch.labels is None:
            raise ValueError("a classification batch needs labels")
        label_ids = torch.tensor(self.label_token_ids, device=logits.device)
        label_logits = logits[:, -1, :].index_select(-1, label_ids).double()
        log_probs = torch.log_softmax(label_logits, dim=-1)
        labels = batch.labels.to(logits.device)
        rows = torch.arange(labels.shape[0], device=logits.device)
        score = log_probs[rows, labels]
        correct = label_logits.argmax(dim=-1) == labels
        return _scores(score, correct, batch)


class CompletionFitness(Fitness):
    """Score = mean log-likelihood of the target tokens after the prompt (teacher forcing).

    The prompt (with the tokenizer's special tokens) and the target (without) are tokenized
    separately and concatenated, so the target's tokens are the same whatever the prompt.
    Correct = every target token is the model's argmax at its position.
    """

    def __init__(self, spec: FitnessSpec, tokenizer: PreTrainedTokenizerBase) -> None:
        if spec.kind != "completion":
            raise ConfigError(f"CompletionFitness got a fitness of kind {spec.kind!r}")
        super().__init__(spec, tokenizer)

    def _encode_all(self, examples: Sequence[Record]) -> list[_Encoded]:
        targets = []
        for index, record in enumerate(examples):
            target = _field(record, index, self.spec.target_field)
            if not isinstance(target, str) or not target:
                raise DataError(
                    f"{_where(record, index)}: field {self.spec.target_field!r} must be a "
                    "non-empty string"
                )
            targets.append(target)
        prompts = self._tokenize(self._render_prompts(examples), special=True)
        answers = self._tokenize(targets, special=False)
        encoded = []
        for index, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
            if not prompt or not answer:
                part = "prompt" if not prompt else "target"
                raise DataError(f"{_where(examples[index], index)}: the {part} has no tokens")
            encoded.append(_Encoded(prompt + answer, target_length=len(answer)))
        return encoded

    def _logits_to_keep(self, rows: Sequence[_Encoded]) -> int:
        return max(row.target_length for row in rows) + 1

    def score(self, logits: torch.Tensor, batch: PreparedBatch) -> ExampleScores:
        if batch.target_lengths is None:
            raise ValueError("a completion batch needs target lengths")
        longest = batch.logits_to_keep - 1
        if logits.shape[1] < longest + 1:
            raise ValueError(f"need logits for the last {longest + 1} positions")
        # Position t predicts token t+1: the last `longest` tokens are predicted by the
        # `longest` positions before the last one.
        predicting = logits[:, -(longest + 1) : -1, :].float()
        targets = batch.input_ids[:, -longest:].to(logits.device)
        lengths = batch.target_lengths.to(logits.device)
        columns = torch.arange(longest, device=logits.device)
        mask = columns.unsqueeze(0) >= (longest - lengths).unsqueeze(1)
        target_logits = predicting.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        token_log_probs = (target_logits - torch.logsumexp(predicting, dim=-1)).double()
        # where, not a product: whatever the logits hold outside the targets cannot leak in.
        kept = torch.where(mask, token_log_probs, torch.zeros_like(token_log_probs))
        score = kept.sum(dim=-1) / lengths.double()
        hits = (predicting.argmax(dim=-1) == targets) | ~mask
        return _scores(score, hits.all(dim=-1), batch)


class GenerationFitness(Fitness):
    """Score = 1 if the greedy continuation's extracted answer matches the target's."""

    def __init__(self, spec: FitnessSpec, tokenizer: PreTrainedTokenizerBase) -> None:
        if spec.kind != "generation":
            raise ConfigError(f"GenerationFitness got a fitness of kind {spec.kind!r}")
        try:
            check_fitness_spec(spec)
        except ValueError as err:
            raise ConfigError(f"fitness.{err}") from None
        super().__init__(spec, tokenizer)
        self.extract = EXTRACTORS[spec.answer_extractor]
        eos = tokenizer.eos_token_id
        self.eos_id = None if eos is None else int(eos)

    def _encode_all(self, examples: Sequence[Record]) -> list[_Encoded]:
        for index, record in enumerate(examples):
            target = _field(record, index, self.spec.target_field)
            if not isinstance(target, str) or self.extract(target) is None:
                raise DataError(
                    f"{_where(record, index)}: field {self.spec.target_field!r} has no answer the "
                    f"{self.spec.answer_extractor!r} extractor can read"
                )
        prompts = self._tokenize(self._render_prompts(examples), special=True)
        for index, ids in enumerate(prompts):
            if not ids:
                raise DataError(f"{_where(examples[index], index)}: the prompt has no tokens")
        return [
            _Encoded(ids, target=str(examples[i][self.spec.target_field]))
            for i, ids in enumerate(prompts)
        ]

    def _logits_to_keep(self, rows: Sequence[_Encoded]) -> int:
        return 1

    def score(self, logits: torch.Tensor, batch: PreparedBatch) -> ExampleScores:
        raise ConfigError("a generation fitness scores a model (score_model), not logits")

    @torch.inference_mode()
    def generate(self, model: torch.nn.Module, batch: PreparedBatch) -> list[str]:
        """The greedy continuations of the batch's prompts, decoded (special tokens dropped)."""
        device = next(model.parameters()).device
        on_device = batch.to(device)
        output = model.generate(  # type: ignore[operator]
            input_ids=on_device.input_ids,
            attention_mask=on_device.attention_mask,
            max_new_tokens=self.spec.max_new_tokens,
            do_sample=False,
            num_beams=1,
            use_cache=True,
            pad_token_id=self.pad_id,
            eos_token_id=self.eos_id,
            temperature=None,
            top_p=None,
            top_k=None,
        )
        new_tokens = output[:, on_device.input_ids.shape[1] :]
        return list(self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True))

    def score_model(self, model: torch.nn.Module, batch: PreparedBatch) -> ExampleScores:
        """Decode every row and score it: 1.0 if its answer matches the target's, else 0.0."""
        if batch.targets is None:
            raise ValueError("a generation batch needs its targets")
        texts = self.generate(model, batch)
        correct = [
            answers_match(self.extract(text), self.extract(target), self.spec.answer_match)
            for text, target in zip(texts, batch.targets, strict=True)
        ]
        flags = torch.tensor(correct, dtype=torch.bool)
        return ExampleScores(
            score=flags.double().numpy(),
            correct=flags.numpy(),
            example_index=batch.example_index.numpy().astype("int64"),
        )


def build_fitness(spec: FitnessSpec, tokenizer: PreTrainedTokenizerBase) -> Fitness:
    """The fitness a spec names, bound to a tokenizer (checks label words and template)."""
    if spec.kind == "classification":
        return ClassificationFitness(spec, tokenizer)
    if spec.kind == "completion":
        return CompletionFitness(spec, tokenizer)
    if spec.kind == "generation":
        return GenerationFitness(spec, tokenizer)
    raise ConfigError(f"unknown fitness kind {spec.kind!r}")


def evaluate_model(
    model: torch.nn.Module,
    fitness: Fitness,
    examples: Sequence[Record],
    batch_size: int = DEFAULT_MAX_BATCH,
    *,
    sort_by_length: bool = True,
) -> ExampleScores:
    """Score ``examples`` with plain full forwards (test-set reports, baselines)."""
    device = next(model.parameters()).device
    batches = fitness.prepare(examples, batch_size, sort_by_length=sort_by_length)
    parts = []
    with torch.inference_mode():
        for batch in batches:
            on_device = batch.to(device)
            logits = model(**on_device.model_inputs()).logits
            parts.append(fitness.score(logits, on_device))
    return merge_scores(parts, len(examples))


def _scores(score: torch.Tensor, correct: torch.Tensor, batch: PreparedBatch) -> ExampleScores:
    return ExampleScores(
        score=score.detach().cpu().numpy().astype(np.float64),
        correct=correct.detach().cpu().numpy().astype(bool),
        example_index=batch.example_index.cpu().numpy().astype(np.int64),
    )


def _optional_tensor(values: list[int], valid: Callable[[int], bool]) -> torch.Tensor | None:
    """A long tensor of ``values`` if this fitness uses them (all valid), else None."""
    if all(valid(value) for value in values):
        return torch.tensor(values, dtype=torch.long)
    return None


def _label_token_ids(words: Sequence[str], tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Each label word must be exactly one token, and the tokens must differ."""
    if len(words) < 2:
        raise ConfigError(f"a classification fitness needs >= 2 label words, got {len(words)}")
    ids: list[int] = []
    for word in words:
        tokens = list(tokenizer(word, add_special_tokens=False)["input_ids"])
        if len(tokens) != 1:
            raise ConfigError(
                f"label word {word!r} encodes to {len(tokens)} tokens {tokens} with tokenizer "
                f"{_tokenizer_name(tokenizer)}; each label word must be exactly one token"
            )
        if tokens[0] in ids:
            raise ConfigError(
                f"label word {word!r} encodes to token {tokens[0]}, like another label word, "
                f"with tokenizer {_tokenizer_name(tokenizer)}"
            )
        ids.append(int(tokens[0]))
    return ids


def _tokenizer_name(tokenizer: PreTrainedTokenizerBase) -> str:
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    return repr(name)


def _field(record: Record, index: int, name: str) -> object:
    if name not in record:
        raise DataError(f"{_where(record, index)}: missing field {name!r}")
    return record[name]


# How errors name an example: by default its 0-based position in the list given; a holder
# reading a file sets this (``examples_named``) so they give the file's 1-based line.
_EXAMPLE_NAMES: ContextVar[Callable[[int], str] | None] = ContextVar("example_names", default=None)


@contextmanager
def examples_named(name: Callable[[int], str]) -> Iterator[None]:
    """Within this block, data errors call example ``i`` ``name(i)`` (e.g. "f.jsonl line 7")."""
    token = _EXAMPLE_NAMES.set(name)
    try:
        yield
    finally:
        _EXAMPLE_NAMES.reset(token)


def _where(record: Record, index: int) -> str:
    """Name an example by its position (or file line) and, if it has one, its id."""
    ident = record.get("id")
    name = _EXAMPLE_NAMES.get()
    where = f"example {index}" if name is None else name(index)
    return where + ("" if ident is None else f" (id {_short(ident)})")


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _as_index(value: object) -> int | None:
    """An int, or a decimal string (``.tsv`` values are strings); anything else is not."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return int(value)
    return None
