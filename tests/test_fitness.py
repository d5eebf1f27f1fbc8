"""Fitness functions: hand-checked scores, sub-batches in original order, validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sottovoce.common.data import Record
from sottovoce.common.errors import ConfigError, DataError
from sottovoce.common.fitness import (
    ClassificationFitness,
    CompletionFitness,
    ExampleScores,
    PreparedBatch,
    build_fitness,
    evaluate_model,
    merge_scores,
)
from sottovoce.common.protocol.messages import FitnessSpec
from sottovoce.common.tiny_model import TINY_VOCAB_SIZE, build_tiny_tokenizer

N_ID, Y_ID = ord("n"), ord("y")
CLASSIFY = FitnessSpec(prompt_template="R: {text}\nS:", label_words=("n", "y"))
COMPLETE = FitnessSpec(kind="completion", prompt_template="Q: {question}\nA:", target_field="a")


@pytest.fixture
def tokenizer():  # type: ignore[no-untyped-def]
    return build_tiny_tokenizer()


def _classification_logits(batch: PreparedBatch, rows: list[tuple[float, float]]) -> torch.Tensor:
    logits = torch.zeros(batch.size, 1, TINY_VOCAB_SIZE)
    for r, (n_logit, y_logit) in enumerate(rows):
        logits[r, 0, N_ID] = n_logit
        logits[r, 0, Y_ID] = y_logit
    logits[:, 0, ord("z")] = 50.0  # a non-label token must not matter
    return logits


def test_classification_score_by_hand(tokenizer) -> None:  # type: ignore[no-untyped-def]
    fitness = build_fitness(CLASSIFY, tokenizer)
    assert isinstance(fitness, ClassificationFitness)
    assert fitness.label_token_ids == [N_ID, Y_ID]
    examples: list[Record] = [
        {"text": "aa", "label": 1},
        {"text": "bb", "label": 0},
        {"text": "cc", "label": 1},
    ]
    (batch,) = fitness.prepare(examples, max_batch=8, sort_by_length=False)
    assert batch.logits_to_keep == 1
    logits = _classification_logits(batch, [(0.0, math.log(3.0)), (0.0, math.log(3.0)), (1, 1)])
    scores = fitness.score(logits, batch)
    np.testing.assert_allclose(scores.score, [math.log(0.75), math.log(0.25), math.log(0.5)])
    assert scores.correct.tolist() == [True, False, False]  # a tie goes to the first word
    assert scores.score.dtype == np.float64


def test_classification_accepts_logits_for_all_positions(tokenizer) -> None:  # type: ignore[no-untyped-def]
    fitness = build_fitness(CLASSIFY, tokenizer)
    (batch,) = fitness.prepare([{"text": "abc", "label": "1"}], sort_by_length=False)
    last = _classification_logits(batch, [(2.0, 0.0)])
    full = torch.cat([torch.randn(1, batch.input_ids.shape[1] - 1, TINY_VOCAB_SIZE), last], 1)
    assert fitness.score(full, batch).score[0] == fitness.score(last, batch).score[0]
    assert fitness.score(last, batch).correct.tolist() == [False]  # "1" is a label string


def test_prompts_are_left_padded_with_positions(tokenizer) -> None:  # type: ignore[no-untyped-def]
    fitness = build_fitness(CLASSIFY, tokenizer)
    examples: list[Record] = [{"text": "abcd", "label": 0}, {"text": "a", "label": 1}]
    (batch,) = fitness.prepare(examples, sort_by_length=False)
    prompt_short = list(b"R: a\nS:")
    prompt_long = list(b"R: abcd\nS:")
    assert batch.input_ids[0].tolist() == prompt_long
    assert batch.input_ids[1].tolist() == [258] * 3 + prompt_short
    assert batch.attention_mask[1].tolist() == [0] * 3 + [1] * len(prompt_short)
    assert batch.position_ids[1].tolist() == [0] * 3 + list(range(len(prompt_short)))
    assert batch.labels is not None and batch.labels.tolist() == [0, 1]
    assert batch.n_tokens == len(prompt_short) + len(prompt_long)


def test_sorted_sub_batches_restore_original_order(tokenizer) -> None:  # type: ignore[no-untyped-def]
    fitness = build_fitness(CLASSIFY, tokenizer)
    lengths = [5, 1, 9, 3, 7, 2, 8]
    examples: list[Record] = [{"text": "x" * k, "label": k % 2} for k in lengths]
    batches = fitness.prepare(examples, max_batch=3)
    assert [b.size for b in batches] == [3, 3, 1]
    seen = [i for b in batches for i in b.example_index.tolist()]
    assert sorted(seen) == list(range(len(lengths)))
    assert [lengths[i] for i in seen] == sorted(lengths)  # sub-batches in length order
    parts = []
    for batch in reversed(batches):  # in any order
        # y-logit = number of real tokens, so each score is a known function of the length.
        real = batch.attention_mask.sum(dim=1).tolist()
        parts.append(fitness.score(_classification_logits(batch, [(0, t) for t in real]), batch))
    merged = merge_scores(parts, len(examples))
    overhead = len(b"R: \nS:")
    expected = [
        -math.log1p(math.exp(-(k + overhead))) if k % 2 else -math.log1p(math.exp(k + overhead))
        for k in lengths
    ]
    np.testing.assert_allclose(merged.score, expected, rtol=1e-6)
    assert merged.example_index.tolist() == list(range(len(lengths)))
    assert merged.correct.tolist() == [k % 2 == 1 for k in lengths]


def test_merge_scores_checks_coverage() -> None:
    part = ExampleScores(np.array([0.5]), np.array([True]), np.array([1]))
    with pytest.raises(ValueError, match="cover"):
        merge_scores([part], 2)
    with pytest.raises(ValueError, match="twice"):
        merge_scores([part, part])
    assert len(merge_scores([])) == 0


def test_completion_score_by_hand(tokenizer) -> None:  # type: ignore[no-untyped-def]
    fitness = build_fitness(COMPLETE, tokenizer)
    assert isinstance(fitness, CompletionFitness)
    examples: list[Record] = [{"question": "x", "a": "cd"}, {"question": "yy", "a": "e"}]
    (batch,) = fitness.prepare(examples, sort_by_length=False)
    assert batch.logits_to_keep == 3  # longest target (2) + 1
    assert batch.target_lengths is not None and batch.target_lengths.tolist() == [2, 1]
    assert batch.input_ids[0, -2:].tolist() == [ord("c"), ord("d")]
    assert batch.input_ids[1, -1].item() == ord("e")
    vocab = TINY_VOCAB_SIZE
    half = math.log(vocab - 1)  # this logit gives its token probability 1/2
    logits = torch.zeros(2, 3, vocab)
    logits[0, 0, ord("c")] = half  # predicts "c": p = 1/2, the argmax
    # logits[0, 1] all zero: predicts "d" with p = 1/vocab, a tie: argmax is token 0
    logits[1, 1, ord("e")] = half  # the only target of row 1
    logits[1, 0, :] = float("nan")  # row 1's column 0 is not its target: must be ignored
    logits[:, 2, :] = float("nan")  # the last position predicts past the end: ignored
    scores = fitness.score(logits, batch)
    np.testing.assert_allclose(
        scores.score, [(math.log(0.5) + math.log(1.0 / vocab)) / 2, math.log(0.5)], rtol=1e-6
    )
    assert scores.correct.tolist() == [False, True]


def test_evaluate_model_matches_unpadded_forwards(tiny_model: torch.nn.Module, tokenizer) -> None:  # type: ignore[no-untyped-def]
    examples: list[Record] = [{"question": "q" * k, "a": " a" * (k % 3 + 1)} for k in (4, 1, 9, 2)]
    fitness = build_fitness(COMPLETE, tokenizer)
    batched = evaluate_model(tiny_model, fitness, examples, batch_size=2)
    unsorted = evaluate_model(tiny_model, fitness, examples, batch_size=3, sort_by_length=False)
    np.testing.assert_allclose(batched.score, unsorted.score, atol=1e-5)
    for index, record in enumerate(examples):
        prompt = list(f"Q: {record['question']}\nA:".encode())
        target = list(str(record["a"]).encode())
        with torch.no_grad():
            logits = tiny_model(torch.tensor([prompt + target])).logits[0].log_softmax(-1)
        expected = np.mean([logits[len(prompt) - 1 + j, t].item() for j, t in enumerate(target)])
        assert batched.score[index] == pytest.approx(expected, abs=1e-5)


def test_classification_evaluate_on_tiny_model(tiny_model: torch.nn.Module, tokenizer) -> None:  # type: ignore[no-untyped-def]
    examples: list[Record] = [{"text": "t" * k, "label": k % 2} for k in (3, 11, 1, 6, 8)]
    fitness = build_fitness(CLASSIFY, tokenizer)
    scores = evaluate_model(tiny_model, fitness, examples, batch_size=2)
    for index, record in enumerate(examples):
        ids = list(f"R: {record['text']}\nS:".encode())
        with torch.no_grad():
            last = tiny_model(torch.tensor([ids])).logits[0, -1]
        pair = last[[N_ID, Y_ID]].double().log_softmax(-1)
        assert scores.score[index] == pytest.approx(
            pair[int(str(record["label"]))].item(), abs=1e-5
        )
        assert scores.correct[index] == (int(pair.argmax()) == record["label"])


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"label": 1}, "example 0: missing field 'text'"),
        ({"text": "a"}, "example 0: missing field 'label'"),
        ({"text": "a", "label": 2}, "field 'label' must be an integer index into 2 label words"),
        ({"text": "a", "label": True}, "got True"),
        ({"text": "a", "label": "x", "id": 7}, "example 0 (id 7): field 'label'"),
        ({"text": "a", "label": -1}, "got -1"),
    ],
)
def test_classification_data_errors(tokenizer, record: Record, message: str) -> None:  # type: ignore[no-untyped-def]
    fitness = build_fitness(CLASSIFY, tokenizer)
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        fitness.prepare([record])


def test_completion_data_errors(tokenizer) -> None:  # type: ignore[no-untyped-def]
    fitness = build_fitness(COMPLETE, tokenizer)
    with pytest.raises(DataError, match="example 1: missing field 'a'"):
        fitness.prepare([{"question": "q", "a": "x"}, {"question": "q"}])
    with pytest.raises(DataError, match="field 'a' must be a non-empty string"):
        fitness.prepare([{"question": "q", "a": ""}])


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (FitnessSpec(label_words=("no", "y")), "label word 'no' encodes to 2 tokens"),
        (FitnessSpec(label_words=("y", "y")), "label word 'y' encodes to token 121, like"),
        (FitnessSpec(label_words=("y",)), ">= 2 label words"),
        (FitnessSpec(prompt_template="{}", label_words=("n", "y")), "must be a plain"),
        (FitnessSpec(prompt_template="{text.upper}", label_words=("n", "y")), "must be a plain"),
        (FitnessSpec(prompt_template="{text", label_words=("n", "y")), "not a valid format"),
    ],
)
def test_fitness_config_errors(tokenizer, spec: FitnessSpec, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError, match=message):
        build_fitness(spec, tokenizer)


def test_label_word_error_names_the_tokenizer(tokenizer) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError) as info:
        build_fitness(FitnessSpec(), tokenizer)  # " negative" is 9 byte tokens
    assert "' negative'" in str(info.value)
    assert "tokenizer" in str(info.value)
    with pytest.raises(ConfigError, match="kind 'completion'"):
        ClassificationFitness(COMPLETE, tokenizer)


@pytest.mark.slow
def test_smollm2_sentiment_accuracy() -> None:
    """SmolLM2 zero-shot on 64 dev sentences: far above chance (about 0.8 on 200)."""
    from sottovoce.common.data import sentiment_records, split_sentiment
    from sottovoce.common.models import load_model

    loaded = load_model("smollm2-135m-instruct")
    fitness = build_fitness(FitnessSpec(), loaded.tokenizer)
    assert fitness.label_token_ids == [3524, 2731]
    dev = split_sentiment(sentiment_records()).dev[:64]
    scores = evaluate_model(loaded.model, fitness, dev, batch_size=32)
    assert scores.accuracy() > 0.65
