"""lowrank and lora: the population in one batch, exact replay and restore, peft export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    FITNESS,
    TINY,
    accepted_round,
    tiny_fingerprint,
    tiny_records,
    write_run_config,
)
from peft import PeftModel
from transformers import AutoModelForCausalLM

from sottovoce.api import open_coordinator
from sottovoce.client.evaluator import CandidateEvaluator
from sottovoce.common.directions import add_float32_, rademacher
from sottovoce.common.fitness import build_fitness
from sottovoce.common.models import load_model
from sottovoce.common.parametrizations.base import ParametrizationSpec
from sottovoce.common.parametrizations.drift import DriftTracker
from sottovoce.common.parametrizations.lowrank import add_group_terms, low_rank_factors
from sottovoce.common.parametrizations.registry import build_parametrization
from sottovoce.common.protocol.messages import Candidate
from sottovoce.common.steplog import Step, as_float32
from sottovoce.server.export import ADAPTER_DIR, export_run

LOWRANK = ParametrizationSpec(
    kind="lowrank", rank=1, patterns=("model.layers.*.mlp.*", "model.layers.1.self_attn.*")
)
LOWRANK_2 = ParametrizationSpec(kind="lowrank", rank=2, last_k_blocks=1)
# every Linear of every block (the throughput bench's setting): 14 matrices on the tiny model
LOWRANK_ALL = ParametrizationSpec(kind="lowrank", rank=1, patterns=("model.layers.*_proj.weight",))
LOWRANK_ALL_4 = ParametrizationSpec(
    kind="lowrank", rank=4, patterns=("model.layers.*_proj.weight",)
)
LORA = ParametrizationSpec(
    kind="lora",
    rank=1,
    patterns=("model.layers.1.self_attn.o_proj.weight", "model.layers.0.mlp.down_proj.weight"),
)
STEPS = [Step(seed=11, coefficient=0.25), Step(seed=12, coefficient=as_float32(-0.1))]
CANDIDATES = [Candidate(seed=100 + i, scale=as_float32(0.5 * (-1) ** i)) for i in range(4)]


@pytest.mark.parametrize(
    "spec",
    [LOWRANK, LOWRANK_2, LOWRANK_ALL, LOWRANK_ALL_4, LORA],
    ids=["lowrank", "lowrank-r2", "lowrank-all", "lowrank-all-r4", "lora"],
)
def test_the_population_in_one_batch_scores_as_one_at_a_time(spec: ParametrizationSpec) -> None:
    """Batched low-rank terms (W x + a (b^T x)) give the scores of each candidate evaluated
    alone (allclose; lowrank's one-at-a-time form merges the weights exactly), in one
    forward per batch, and every weight byte is restored."""
    loaded = load_model(TINY)
    parametrization = build_parametrization(spec)
    parametrization.attach(loaded.model)
    for step in STEPS:
        parametrization.apply_step(step)
    fitness = build_fitness(FITNESS, loaded.tokenizer)
    records = tiny_records(40)
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    batched = CandidateEvaluator(loaded.model, parametrization, fitness, max_batch=16)
    alone = CandidateEvaluator(
        loaded.model, parametrization, fitness, max_batch=16, batch_population=False
    )
    calls: list[int] = []
    counter = loaded.model.model.layers[-1].register_forward_hook(lambda *_: calls.append(1))
    incumbent_b, per_b = batched.score(records, CANDIDATES)
    batched_calls = len(calls)
    incumbent_a, per_a = alone.score(records, CANDIDATES)
    counter.remove()
    assert batched_calls == 3 and len(calls) - batched_calls == 3 * 5  # 40 records, batches of 16
    np.testing.assert_allclose(incumbent_b, incumbent_a, rtol=1e-4, atol=1e-5)
    for b, a in zip(per_b, per_a, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
    assert max(np.abs(a - incumbent_a).max() for a in per_a) > 1e-3  # the candidates differ
    after = loaded.model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)  # restored exactly


@pytest.mark.parametrize("rank", [1, 2])
def test_the_population_generates_each_candidates_own_factors(rank: int) -> None:
    """The population draws every candidate's factors of every matrix in one vectorized
    pass: each group's A must be exactly its candidate's A times s / r, its B exactly B, as
    low_rank_factors (the one-at-a-time definition) draws them; the incumbent's are zero."""
    loaded = load_model(TINY)
    spec = ParametrizationSpec(kind="lowrank", rank=rank, patterns=("model.layers.*_proj.weight",))
    parametrization = build_parametrization(spec)
    parametrization.attach(loaded.model)
    models: list[Candidate | None] = [None, *CANDIDATES]
    factors = parametrization._population_factors(models)  # type: ignore[attr-defined]
    tensors = parametrization.tensors  # type: ignore[attr-defined]
    assert len(factors) == len(tensors) == 14
    for tensor, (a_stack, b_stack) in zip(tensors, factors, strict=True):
        rows, columns = tensor.param.shape
        assert a_stack.shape == (5, rows, rank) and b_stack.shape == (5, columns, rank)
        assert not a_stack[0].any() and not b_stack[0].any()
        for group, candidate in enumerate(CANDIDATES, 1):
            a, b = low_rank_factors(candidate.seed, tensor.index, (rows, columns), rank, "cpu")
            assert torch.equal(a_stack[group], a * (as_float32(candidate.scale) / rank))
            assert torch.equal(b_stack[group], b)


def test_group_terms_in_place_and_out_of_place_agree() -> None:
    """The hook adds each group's term into the Linear's output in place (baddbmm_); an
    output it cannot write in place (another dtype, not contiguous) gets the same sum out of
    place. Both equal the explicit per-group sum."""
    generator = torch.Generator().manual_seed(3)
    groups, rows, n, m, rank = 3, 5, 7, 6, 2
    inputs = torch.randn(groups * rows, n, generator=generator)
    right = torch.randn(groups, n, rank, generator=generator)
    left_t = torch.randn(groups, rank, m, generator=generator)
    output = torch.randn(groups * rows, m, generator=generator)
    expected = torch.cat(
        [
            output[g * rows : (g + 1) * rows]
            + inputs[g * rows : (g + 1) * rows] @ right[g] @ left_t[g]
            for g in range(groups)
        ]
    )
    in_place = output.clone()
    result = add_group_terms(inputs, in_place, right, left_t)
    assert result.data_ptr() == in_place.data_ptr()  # written into the output, no new tensor
    torch.testing.assert_close(result, expected, rtol=1e-6, atol=1e-6)
    strided = output.t().contiguous().t()  # same values, not contiguous
    out_of_place = add_group_terms(inputs, strided, right, left_t)
    assert out_of_place.data_ptr() != strided.data_ptr()
    torch.testing.assert_close(out_of_place, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(strided, output)  # left as it was
    with pytest.raises(ValueError):
        add_group_terms(inputs[:-1], output[:-1], right, left_t)


def test_lowrank_replay_is_its_definition_bit_for_bit() -> None:
    """W += float32(c a b^T) with a, b the seed's +-1 vectors (r = 1), in tensor order."""
    loaded = load_model(TINY)
    parametrization = build_parametrization(LOWRANK)
    parametrization.attach(loaded.model)
    for step in STEPS:
        parametrization.apply_step(step)
    reference = load_model(TINY).model
    names = [t.name for t in parametrization.tensors]  # type: ignore[attr-defined]
    params = dict(reference.named_parameters())
    for step in STEPS:
        for index, name in enumerate(names):
            weight = params[name].data
            rows, columns = weight.shape
            a = rademacher(step.seed, 2 * index, rows)
            b = rademacher(step.seed, 2 * index + 1, columns)
            add_float32_(weight, torch.outer(a, b) * step.coefficient)
    mine = loaded.model.state_dict()
    assert all(torch.equal(mine[k], v) for k, v in reference.state_dict().items())


@pytest.mark.parametrize("spec", [LOWRANK, LORA], ids=["lowrank", "lora"])
def test_the_drift_tracker_follows_x_exactly(spec: ParametrizationSpec) -> None:
    loaded = load_model(TINY)
    parametrization = build_parametrization(spec)
    parametrization.attach(loaded.model)
    base = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    tracker = DriftTracker(parametrization.direction_blocks(), add=parametrization.add_direction_)
    pending = tracker.preview(STEPS)
    for step in STEPS:
        parametrization.apply_step(step)
    assert pending.drift.exact and pending.x is not None
    if spec.kind == "lora":  # x is the B factors themselves: the same float32 adds
        assert torch.equal(pending.x, parametrization.x)  # type: ignore[attr-defined]
    else:  # x = sum of the deltas; the weights round each add, so W - W_base is within ulps
        tensors = parametrization.tensors  # type: ignore[attr-defined]
        moved = torch.cat([(t.param - base[t.name]).detach().reshape(-1) for t in tensors])
        torch.testing.assert_close(pending.x, moved, rtol=0, atol=1e-6)
    assert pending.drift.linf == pytest.approx(0.35)  # |0.25| + |-0.1|, signs aligned somewhere


def test_a_lora_run_exports_a_peft_adapter_and_merged_weights(tmp_path: Path) -> None:
    config = write_run_config(
        tmp_path / "run.toml",
        parametrization={
            "kind": "lora",
            "rank": 1,
            "patterns": list(LORA.patterns),
        },
    )
    coordinator = open_coordinator(config, tmp_path / "run", model_fingerprint=tiny_fingerprint())
    for index, step in enumerate(STEPS):  # journaled, then logged, as the coordinator does
        coordinator.state.record_round(accepted_round(index, step))
    out = tmp_path / "exported"
    export_run(tmp_path / "run", out)
    merged = AutoModelForCausalLM.from_pretrained(out, local_files_only=True, dtype=torch.float32)
    adapted = PeftModel.from_pretrained(load_model(TINY).model, out / ADAPTER_DIR)
    assert json.loads((out / ADAPTER_DIR / "adapter_config.json").read_text())["r"] == 1
    # the hooks' evaluation, the merged checkpoint and peft's adapter agree
    loaded = load_model(TINY)
    parametrization = build_parametrization(
        ParametrizationSpec(kind="lora", rank=1, patterns=LORA.patterns)
    )
    parametrization.attach(loaded.model)
    for step in STEPS:
        parametrization.apply_step(step)
    ids = torch.tensor([[1, 5, 9, 77, 100, 3]])
    with torch.no_grad():
        hooks = loaded.model(input_ids=ids).logits
        from_merged = merged(input_ids=ids).logits
        from_adapter = adapted(input_ids=ids).logits
        base = load_model(TINY).model(input_ids=ids).logits
    assert not torch.allclose(hooks, base, atol=1e-4)
    torch.testing.assert_close(from_merged, hooks, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(from_adapter, hooks, rtol=1e-5, atol=1e-5)
