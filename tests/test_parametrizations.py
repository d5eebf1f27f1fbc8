"""The four parametrizations on the tiny tied-embedding Llama: restore, replay, x = 0, hooks."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable

import pytest
import torch
from torch import nn

from sottovoce.common.directions import hash_words, rademacher
from sottovoce.common.errors import ConfigError
from sottovoce.common.parametrizations.base import (
    Parametrization,
    ParametrizationSpec,
    iter_unique_parameters,
)
from sottovoce.common.parametrizations.registry import PARAMETRIZATION_KINDS, build_parametrization
from sottovoce.common.parametrizations.scale import ScaleParametrization
from sottovoce.common.parametrizations.select import InPlaceParametrization
from sottovoce.common.parametrizations.subspace import SubspaceParametrization
from sottovoce.common.steplog import Step, as_float32
from sottovoce.common.tiny_model import build_tiny_llama

SPECS: dict[str, ParametrizationSpec] = {
    "full": ParametrizationSpec(kind="full"),
    "select": ParametrizationSpec(kind="select", patterns=("model.embed_tokens.weight", "*.mlp.*")),
    "select_last_block": ParametrizationSpec(kind="select", last_k_blocks=1),
    "subspace": ParametrizationSpec(kind="subspace", dimension=16, projection_seed=11),
    "scale_channel": ParametrizationSpec(kind="scale", granularity="channel"),
    "scale_tensor": ParametrizationSpec(kind="scale", granularity="tensor"),
}
IN_PLACE = ("full", "select", "select_last_block", "subspace")
SCALE = 0.02  # large enough to move the tiny model's logits visibly
STEPS = [Step(seed, as_float32(0.01 * (-1) ** seed / (1 + seed))) for seed in range(9)] + [
    Step(2**64 - 1, as_float32(0.003))
]

Model = nn.Module


def _ids() -> torch.Tensor:
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))


def _logits(model: Model) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = model(input_ids=_ids()).logits
    return out


def _attached(name: str, model: Model | None = None) -> tuple[Model, Parametrization]:
    model = build_tiny_llama(seed=0) if model is None else model
    parametrization = build_parametrization(SPECS[name])
    parametrization.attach(model)
    return model, parametrization


def _snapshot(model: Model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _weight(model: Model, module_name: str) -> torch.Tensor:
    weight = model.get_submodule(module_name).weight
    assert isinstance(weight, torch.Tensor)
    return weight.detach().clone()


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(
            a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8)
        )
    )


def _assert_same_state(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        assert _same_bits(actual[key], expected[key]), key


# -- (1) exact restore -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(SPECS))
def test_fifty_evaluations_restore_every_byte(name: str) -> None:
    model, parametrization = _attached(name)
    parametrization.apply_step(STEPS[0])  # restore to a moved incumbent, not just the base
    before, incumbent_logits = _snapshot(model), _logits(model)
    for seed in range(49):
        with parametrization.perturbed(seed, SCALE):
            logits = _logits(model)
            if seed % 10 == 0:  # several forwards inside one context see the same candidate
                assert torch.equal(_logits(model), logits)
        assert not torch.allclose(logits, incumbent_logits, atol=1e-4)
    seen_while_raising: list[bool] = []

    def explode(module: nn.Module, args: object, output: object) -> None:
        current = _weight(model, "model.embed_tokens")
        seen_while_raising.append(not torch.equal(current, before["model.embed_tokens.weight"]))
        raise RuntimeError("boom")

    handle = model.get_submodule("model.layers.1").register_forward_hook(explode)
    with pytest.raises(RuntimeError, match="boom"), parametrization.perturbed(49, SCALE):
        _logits(model)
    handle.remove()
    if name in ("full", "select", "subspace"):  # the tied embedding was moved when it raised
        assert seen_while_raising == [True]
    _assert_same_state(_snapshot(model), before)
    assert torch.equal(_logits(model), incumbent_logits)


# -- (2) replay determinism ------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(SPECS))
def test_replaying_ten_steps_on_two_fresh_models_gives_the_same_bytes(name: str) -> None:
    exports = []
    for _ in range(2):
        _, parametrization = _attached(name)
        for step in STEPS:
            parametrization.apply_step(step)
        exports.append(parametrization.export_state_dict())
    _assert_same_state(exports[0], exports[1])
    base = _snapshot(build_tiny_llama(seed=0))
    assert any(not _same_bits(exports[0][k], base[k]) for k in base)  # the steps did something


# -- (3) x = 0 is the base model -------------------------------------------------------------------
@pytest.mark.parametrize("name", list(SPECS))
def test_no_steps_exports_the_base_model_and_computes_it(name: str) -> None:
    reference = build_tiny_llama(seed=0)
    base_state, base_logits = _snapshot(reference), _logits(reference)
    model, parametrization = _attached(name)
    _assert_same_state(parametrization.export_state_dict(), base_state)
    assert torch.equal(_logits(model), base_logits)  # for scale: hooks at x = 0 change nothing
    parametrization.detach()
    assert torch.equal(_logits(model), base_logits)


# -- (4) apply_step == perturbed -------------------------------------------------------------------
@pytest.mark.parametrize("name", list(SPECS))
def test_perturbed_evaluation_equals_the_applied_step(name: str) -> None:
    """Exactly equal: both paths produce the same weight bits (in-place kinds) or the same x
    bits and hence the same hook arithmetic (scale), and the forward is deterministic."""
    candidate = Step(123, as_float32(SCALE))
    moved, moved_parametrization = _attached(name)
    probe, probe_parametrization = _attached(name)
    for parametrization in (moved_parametrization, probe_parametrization):
        parametrization.apply_step(STEPS[1])
    moved_parametrization.apply_step(candidate)
    with probe_parametrization.perturbed(candidate.seed, candidate.coefficient):
        perturbed_logits = _logits(probe)
    assert torch.equal(perturbed_logits, _logits(moved))
    assert not torch.equal(perturbed_logits, _logits(probe))


# -- (5) full / select: exported weights are base + sum of c * z, bit for bit ----------------------
def _selected_names(model: Model, patterns: tuple[str, ...]) -> list[str]:
    """The tensor_index order, recomputed here from the documented rule."""
    aliases: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(name)
    seen, names = set(), []
    for name, param in sorted(model.named_parameters(remove_duplicate=False)):
        if id(param) in seen:
            continue
        seen.add(id(param))
        if not patterns or any(
            fnmatch.fnmatchcase(a, p) for a in aliases[id(param)] for p in patterns
        ):
            names.append(name)
    return names


@pytest.mark.parametrize("name", ["full", "select"])
def test_exported_weights_are_base_plus_scaled_directions(name: str) -> None:
    model, parametrization = _attached(name)
    base = _snapshot(model)
    for step in STEPS[:4]:
        parametrization.apply_step(step)
    exported = parametrization.export_state_dict()
    selected = _selected_names(model, SPECS[name].patterns)
    assert [t.name for t in parametrization.tensors] == selected  # type: ignore[attr-defined]
    for index, tensor_name in enumerate(selected):
        expected = base[tensor_name]
        for step in STEPS[:4]:
            z = rademacher(step.seed, index, expected.numel()).view_as(expected)
            expected = expected + torch.tensor(step.coefficient) * z
        assert _same_bits(exported[tensor_name], expected), tensor_name
    untouched = set(base) - set(selected) - {"model.embed_tokens.weight"}
    assert untouched or name == "full"
    for key in untouched:
        assert _same_bits(exported[key], base[key]), key
    assert _same_bits(exported["model.embed_tokens.weight"], exported["lm_head.weight"])


def _projection(
    numel: int, projection_seed: int, tensor_index: int, dimension: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Buckets and signs of each element, straight from subspace.py's documented formulas."""
    element = torch.arange(numel)
    groups = int(element[-1]) // 32 + 1
    sign_words = hash_words(1, projection_seed, tensor_index, 0, groups)[element >> 5]
    bucket_words = hash_words(2, projection_seed, tensor_index, 0, groups)[element >> 5]
    signs = ((sign_words >> (element & 31)) & 1) * 2 - 1
    return bucket_words % dimension, signs


def test_subspace_export_is_base_plus_projected_step() -> None:
    model, parametrization = _attached("subspace")
    base = _snapshot(model)
    step = STEPS[3]
    parametrization.apply_step(step)
    z = rademacher(step.seed, 0, 16)
    assert isinstance(parametrization, SubspaceParametrization)
    assert torch.equal(parametrization.x, step.coefficient * z)
    exported = parametrization.export_state_dict()
    for tensor in parametrization.tensors:
        buckets, signs = _projection(tensor.param.numel(), 11, tensor.index, 16)
        delta = (signs.to(torch.float32) * z[buckets] * step.coefficient).view_as(tensor.param)
        assert _same_bits(exported[tensor.name], base[tensor.name] + delta), tensor.name
    buckets, signs = _projection(3_200_000, 11, 0, 16)
    counts = torch.bincount(buckets, minlength=16)
    assert counts.min() > 3_200_000 / 16 * 0.9  # buckets are spread over all of x (8 sigma)
    assert abs(int(signs.sum())) < 5 * 3_200_000**0.5  # signs are balanced


# -- (6) a tied tensor is one perturbed tensor for both of its users -------------------------------
@pytest.mark.parametrize("name", ["full", "subspace"])
def test_tied_embedding_and_head_see_the_same_perturbed_tensor(name: str) -> None:
    model, parametrization = _attached(name)
    materialized, materialized_parametrization = _attached(name)
    materialized_parametrization.apply_step(Step(7, as_float32(SCALE)))
    expected = _weight(materialized, "lm_head")
    seen: dict[str, torch.Tensor] = {}

    def capture(label: str) -> Callable[[nn.Module, object, object], None]:
        def hook(module: nn.Module, args: object, output: object) -> None:
            seen[label] = _weight(model, "lm_head")

        return hook

    for label in ("model.embed_tokens", "model.layers.0.mlp", "lm_head"):
        model.get_submodule(label).register_forward_hook(capture(label))  # runs before restore
    with parametrization.perturbed(7, SCALE):
        logits = _logits(model)
    assert set(seen) == {"model.embed_tokens", "model.layers.0.mlp", "lm_head"}
    for label, weight in seen.items():
        assert torch.equal(weight, expected), label
    assert torch.equal(logits, _logits(materialized))
    assert parametrization.touched_modules()[0] == "model.embed_tokens"
    assert "lm_head" in parametrization.touched_modules()


def test_scale_shares_one_log_scale_between_tied_users_and_export_matches_hooks() -> None:
    model, parametrization = _attached("scale_channel")
    assert isinstance(parametrization, ScaleParametrization)
    tied = [t for t in parametrization.tensors if len(t.aliases) == 2]
    assert len(tied) == 1 and len(tied[0].owners) == 2
    assert parametrization.dimension == 260 + 2 * (32 + 16 + 16 + 32 + 64 + 64 + 32 + 32 + 32) + 32
    for step in STEPS:
        parametrization.apply_step(step)
    hooked_logits = _logits(model)
    folded = build_tiny_llama(seed=0)
    folded.load_state_dict(parametrization.export_state_dict())
    # Same function; the hooks scale outputs while export scales weights, so the results
    # agree up to float32 rounding, not bit for bit (the weaker exactness scale documents).
    torch.testing.assert_close(_logits(folded), hooked_logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(hooked_logits, _logits(build_tiny_llama(seed=0)), atol=1e-3)


# -- (7) peak extra memory -------------------------------------------------------------------------
def test_backups_never_exceed_the_largest_selected_tensor_without_ties() -> None:
    model, parametrization = _attached("select_last_block")
    assert isinstance(parametrization, InPlaceParametrization)
    for seed in range(3):
        with parametrization.perturbed(seed, SCALE):
            _logits(model)
    largest = max(t.nbytes for t in parametrization.tensors)
    assert parametrization.max_backup_bytes == largest


def test_backups_with_a_tied_tensor_hold_it_plus_one_module() -> None:
    """The tied embedding stays perturbed (backed up) until the LM head ran, so the bound is
    that tensor plus the largest tensor of one other module: still far from a model copy."""
    model, parametrization = _attached("full")
    assert isinstance(parametrization, InPlaceParametrization)
    with parametrization.perturbed(0, SCALE):
        _logits(model)
    sizes = sorted(t.nbytes for t in parametrization.tensors)
    assert parametrization.max_backup_bytes == sizes[-1] + sizes[-2]
    assert parametrization.max_backup_bytes < 0.4 * sum(sizes)


# -- (8) configuration errors ----------------------------------------------------------------------
def test_a_pattern_matching_nothing_is_named() -> None:
    spec = ParametrizationSpec(kind="select", patterns=("*.mlp.*", "*.no_such_tensor"))
    with pytest.raises(ConfigError, match=r"no_such_tensor"):
        build_parametrization(spec).attach(build_tiny_llama(seed=0))


def test_bad_specs_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="dimension"):
        build_parametrization(ParametrizationSpec(kind="subspace", dimension=0))
    with pytest.raises(ConfigError, match="unknown"):
        build_parametrization(ParametrizationSpec(kind="lasso"))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="full"):
        build_parametrization(ParametrizationSpec(kind="full", patterns=("*",)))
    with pytest.raises(ConfigError, match="last_k_blocks"):
        build_parametrization(ParametrizationSpec(kind="select", last_k_blocks=3)).attach(
            build_tiny_llama(seed=0)
        )
    assert PARAMETRIZATION_KINDS == ("full", "select", "subspace", "scale", "lowrank", "lora")


def test_scale_rejects_tensors_it_cannot_apply_as_output_scaling() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Conv1d(4, 4, 3))
    with pytest.raises(ConfigError, match=r"1\.weight \(Conv1d\)"):
        build_parametrization(ParametrizationSpec(kind="scale", patterns=("1.weight",))).attach(
            model
        )
    with pytest.raises(ConfigError, match=r"0\.bias"):
        build_parametrization(ParametrizationSpec(kind="scale", patterns=("0.*",))).attach(model)


# -- selection details and misuse ------------------------------------------------------------------
def test_last_k_blocks_keeps_the_last_blocks_and_what_follows_but_not_the_tied_head() -> None:
    _, parametrization = _attached("select_last_block")
    names = [t.name for t in parametrization.tensors]  # type: ignore[attr-defined]
    assert "model.norm.weight" in names and "lm_head.weight" not in names
    assert all(n.startswith("model.layers.1.") for n in names if n != "model.norm.weight")
    assert len(names) == 10
    assert parametrization.touched_modules()[0] == "model.layers.1.self_attn.q_proj"


def test_default_scale_selection_is_every_linear_embedding_and_norm_weight() -> None:
    model, parametrization = _attached("scale_tensor")
    assert parametrization.dimension == len(list(iter_unique_parameters(model)))


def test_misuse_inside_a_perturbed_context_is_refused() -> None:
    for name in ("full", "scale_channel"):
        _, parametrization = _attached(name)
        with parametrization.perturbed(1, SCALE):
            with pytest.raises(RuntimeError, match="inside perturbed"):
                parametrization.apply_step(STEPS[0])
            with (
                pytest.raises(RuntimeError, match="inside perturbed"),
                parametrization.perturbed(2, SCALE),
            ):
                pass


def test_perturbed_works_under_inference_mode() -> None:
    model, parametrization = _attached("full")
    before = _snapshot(model)
    with torch.inference_mode(), parametrization.perturbed(3, SCALE):
        logits = model(input_ids=_ids()).logits
    _assert_same_state(_snapshot(model), before)
    assert not torch.allclose(logits, _logits(model), atol=1e-4)
