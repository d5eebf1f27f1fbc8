"""In-place candidate evaluation: prefix reuse and the head cache change no numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sottovoce.client.evaluator import CandidateEvaluator, PrefixCache, suffix_start
from sottovoce.common.fitness import build_fitness
from sottovoce.common.parametrizations.base import ParametrizationSpec
from sottovoce.common.parametrizations.registry import build_parametrization
from sottovoce.common.protocol.answers import AnswerKind
from sottovoce.common.protocol.messages import Candidate, FitnessSpec
from sottovoce.common.steplog import Step
from sottovoce.common.tiny_model import build_tiny_llama, build_tiny_tokenizer

FITNESS = FitnessSpec(prompt_template="{text} =", label_words=("0", "1"))
WORDS = ["good", "bad", "fine film", "awful plot", "a joy", "dull", "loved it", "boring"]
RECORDS = [{"text": f"{w} {i}", "label": i % 2} for i, w in enumerate(WORDS * 3)]
SPECS = {
    "norm-scale": ParametrizationSpec(kind="scale", patterns=("model.norm.weight",)),
    "last-block-scale": ParametrizationSpec(kind="scale", last_k_blocks=1),
    "select-norms": ParametrizationSpec(kind="select", patterns=("*norm*",)),
    "full": ParametrizationSpec(kind="full"),
}


def evaluator(spec: ParametrizationSpec, **kwargs: bool) -> CandidateEvaluator:
    model = build_tiny_llama(seed=1)
    parametrization = build_parametrization(spec)
    parametrization.attach(model)
    fitness = build_fitness(FITNESS, build_tiny_tokenizer())
    return CandidateEvaluator(model, parametrization, fitness, max_batch=8, **kwargs)


def test_suffix_start_finds_first_touched_layer() -> None:
    model = build_tiny_llama()
    assert suffix_start(model, ["model.norm"]) == 2
    assert suffix_start(model, ["model.layers.1.mlp.down_proj", "model.norm"]) == 1
    assert suffix_start(model, ["model.layers.0.self_attn.q_proj"]) is None
    assert suffix_start(model, ["model.embed_tokens", "lm_head"]) is None


@pytest.mark.parametrize("name", sorted(SPECS))
def test_reuse_paths_match_plain_forward(name: str) -> None:
    fast = evaluator(SPECS[name])
    plain = evaluator(SPECS[name], reuse_prefix=False, cache_head_inputs=False)
    candidates = [Candidate(seed=11, scale=0.5), Candidate(seed=12, scale=-0.5)]
    for _ in range(2):  # the second pass is served from the head cache where it applies
        inc_fast, cand_fast = fast.score(RECORDS, candidates)
        inc_plain, cand_plain = plain.score(RECORDS, candidates)
        np.testing.assert_allclose(inc_fast, inc_plain, rtol=1e-5, atol=1e-6)
        for a, b in zip(cand_fast, cand_plain, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        assert not np.allclose(cand_plain[0], inc_plain)  # the candidates did change something


def test_head_cache_skips_the_body_on_repeat() -> None:
    fast = evaluator(SPECS["norm-scale"])
    fast.score(RECORDS, [Candidate(seed=1, scale=0.3)])
    first = fast.forward_passes
    fast.score(RECORDS, [Candidate(seed=2, scale=0.3)])
    assert first > 0 and fast.forward_passes == first


def test_head_cache_runs_the_body_only_for_examples_it_has_not_seen() -> None:
    fast = evaluator(SPECS["norm-scale"])
    fast.max_batch = len(RECORDS)  # one batch holding both cached and new examples
    plain = evaluator(SPECS["norm-scale"], reuse_prefix=False, cache_head_inputs=False)
    candidate = [Candidate(seed=5, scale=0.3)]
    fast.score(RECORDS[:2], candidate)  # two examples cached
    body_rows: list[int] = []
    handle = fast.model.register_forward_pre_hook(
        lambda _, args, kwargs: body_rows.append(int(kwargs["input_ids"].shape[0])),
        with_kwargs=True,
    )
    _, (mixed,) = fast.score(RECORDS, candidate)  # one batch: two cached, the rest new
    handle.remove()
    assert body_rows == [len(RECORDS) - 2]  # one body pass, on the new examples only
    _, (reference,) = plain.score(RECORDS, candidate)
    np.testing.assert_allclose(mixed, reference, rtol=1e-5, atol=1e-6)


def test_restore_is_exact_after_many_choices() -> None:
    ev = evaluator(SPECS["select-norms"])
    before = {k: v.clone() for k, v in ev.model.state_dict().items()}
    for seed in range(20):
        ev.choose(RECORDS[:8], [Candidate(seed=seed, scale=0.25)], AnswerKind.COMPARE)
    for key, value in ev.model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_apply_step_moves_incumbent_to_the_candidate() -> None:
    ev = evaluator(SPECS["last-block-scale"])
    candidate = Candidate(seed=99, scale=0.5)
    _, (as_candidate,) = ev.score(RECORDS, [candidate])
    ev.apply_steps([Step(seed=99, coefficient=0.5)])
    incumbent, _ = ev.score(RECORDS, [])
    np.testing.assert_allclose(incumbent, as_candidate, rtol=1e-6, atol=1e-7)


def test_held_out_cache_scores_two_models_from_one_prefix() -> None:
    ev = evaluator(SPECS["norm-scale"], cache_head_inputs=False)
    cache = PrefixCache()
    before, _ = ev.score_incumbent(RECORDS, cache)
    passes = ev.forward_passes
    ev.apply_steps([Step(seed=5, coefficient=0.5)])
    after, correct = ev.score_incumbent(RECORDS, cache)
    assert ev.forward_passes == passes  # only the suffix ran again, from the cached prefix
    assert not np.allclose(before, after) and correct.dtype == bool


def test_prefix_cache_across_tasks_runs_the_prefix_once_and_changes_no_bit() -> None:
    """A full-split run on the last block (``cache_prefixes``, as the holder sets it): later
    tasks, after log steps, run only the suffix, and score exactly what fresh prefixes do."""
    cached = evaluator(SPECS["last-block-scale"], cache_prefixes=True, cache_head_inputs=False)
    fresh = evaluator(SPECS["last-block-scale"], cache_head_inputs=False)
    assert cached.split == 1  # the tiny model has 2 blocks: block 0 is the shared prefix
    candidates = [Candidate(seed=21, scale=0.5), Candidate(seed=21, scale=-0.5)]
    cached.score(RECORDS, candidates)
    first = cached.forward_passes
    for seed in (31, 32):
        for ev in (cached, fresh):
            ev.apply_steps([Step(seed=seed, coefficient=0.25)])
        inc_cached, cand_cached = cached.score(RECORDS, candidates)
        inc_fresh, cand_fresh = fresh.score(RECORDS, candidates)
        assert np.array_equal(inc_cached, inc_fresh)
        for a, b in zip(cand_cached, cand_fresh, strict=True):
            assert np.array_equal(a, b)
    assert first > 0 and cached.forward_passes == first  # no prefix ran after the first task
    assert fresh.forward_passes == 2 * first  # ... where the uncached one ran it each task
