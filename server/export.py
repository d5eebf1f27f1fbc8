"""Export: replay a run's log on the base weights and write a normal Hugging Face checkpoint.

The exported folder is complete (safetensors weights, config, tokenizer, generation
config) and loads with ``AutoModelForCausalLM.from_pretrained``. Next to the weights it
carries the log itself (a few bytes per step) and a model card naming the base model's
fingerprint, the log's hash, the bits spent and the parametrization, so anyone can check
the weights against base + log.

A ``lora`` run is also written as a ``peft`` adapter (``adapter/``: ``adapter_config.json``
and ``adapter_model.safetensors``, loadable with ``PeftModel.from_pretrained`` on the base
model), built by peft itself from the run's A and B factors; the merged checkpoint beside
it folds them in (``W + B A``, float32 math), equal to the adapter up to float rounding.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from peft import LoraConfig, get_peft_model

from sottovoce.common.config import RunConfig
from sottovoce.common.errors import ConfigError, LogIntegrityError
from sottovoce.common.models import LoadedModel, load_model
from sottovoce.common.parametrizations.lora import LoraParametrization
from sottovoce.common.parametrizations.registry import build_parametrization
from sottovoce.common.steplog import StepLog, genesis_hash
from sottovoce.common.storage import read_json_lines
from sottovoce.server.run_state import (
    JOURNAL,
    LOG,
    REPORT,
    RUN_META,
    coordinator_dir,
    journal_steps,
    read_meta,
    read_run_config,
)

LOG_FILE = "sottovoce_log.json"
ADAPTER_DIR = "adapter"


@dataclass(frozen=True)
class ExportResult:
    out_dir: Path
    steps: int
    log_head: str
    bits_spent: float


def replay(loaded: LoadedModel, config: RunConfig, log: StepLog) -> dict[str, Any]:
    """Base weights + the log, folded into a plain state dict (the canonical replay)."""
    return _replayed(loaded, config, log)[0]


def _replayed(
    loaded: LoadedModel, config: RunConfig, log: StepLog
) -> tuple[dict[str, Any], dict[str, tuple[torch.Tensor, torch.Tensor]] | None]:
    """The folded state dict, and a lora run's adapter factors (None for other kinds)."""
    parametrization = build_parametrization(config.parametrization)
    parametrization.attach(loaded.model)
    for step in log:
        parametrization.apply_step(step)
    state = parametrization.export_state_dict()
    adapter = (
        parametrization.adapter_tensors()
        if isinstance(parametrization, LoraParametrization)
        else None
    )
    parametrization.detach()
    return state, adapter


def write_peft_adapter(
    base: torch.nn.Module,
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    rank: int,
    out_dir: Path,
) -> None:
    """``factors`` (module name -> (A, B)) as a peft LoRA adapter of ``base`` in ``out_dir``.

    peft builds the adapter (``lora_alpha = r``, so its scaling is 1, no dropout, no bias)
    and writes it; ``base`` is wrapped and unwrapped again, its weights untouched.
    """
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        lora_dropout=0.0,
        bias="none",
        target_modules=sorted(factors),
        init_lora_weights=False,
    )
    wrapped = get_peft_model(base, config)  # injects peft's LoRA layers into base in place
    try:
        with torch.no_grad():
            for name, module in base.named_modules():
                if name in factors:
                    a, b = factors[name]
                    for factor, value in (("lora_A", a), ("lora_B", b)):
                        layer = cast(torch.nn.ModuleDict, getattr(module, factor))["default"]
                        cast(torch.nn.Linear, layer).weight.copy_(value)
        wrapped.save_pretrained(str(out_dir))
    finally:
        wrapped.unload()


def read_run_log(run_dir: Path, config: RunConfig, fingerprint: str) -> tuple[StepLog, float]:
    """The run's verified log of accepted steps and the bits its answers cost.

    Checks that ``fingerprint`` (the base model as loaded here) is the one the run was made
    on and that the log's genesis matches it and the parametrization.
    """
    meta = read_meta(run_dir / RUN_META)
    if fingerprint != meta["model_fingerprint"]:
        raise ConfigError(
            f"model {config.model.name} loads as {fingerprint}, the run was made on "
            f"{meta['model_fingerprint']}"
        )
    genesis = genesis_hash(fingerprint, config.parametrization.canonical_id())
    if genesis != meta["genesis"]:
        raise LogIntegrityError(f"{run_dir}: log genesis does not match model + parametrization")
    bits = sum(
        float(r.get("bits", 0.0))
        for r in read_json_lines(run_dir / JOURNAL)
        if r.get("type") == "answer"
    )
    log = StepLog.open(run_dir / LOG, genesis)
    check_log_matches_journal(run_dir, log)
    return log, bits


def check_log_matches_journal(run_dir: Path, log: StepLog) -> None:
    """Refuse a damaged run: the log must hold exactly the steps the journal accepted.

    The coordinator journals each round before it appends its step, so a log with fewer
    steps (deleted, truncated) or different ones is damage; exporting it would silently
    write another model under the run's name.
    """
    accepted = journal_steps(run_dir)
    logged = list(log)
    if logged == accepted:
        return
    if logged == accepted[: len(logged)]:
        problem = f"{LOG} holds {len(logged)} steps, {JOURNAL} accepted {len(accepted)}"
        hint = (
            "; the log is missing or truncated (restart `sottovoce server --run-dir` on it to "
            "restore the steps from the journal)"
        )
    else:
        first = next(
            (i for i, (a, b) in enumerate(zip(logged, accepted, strict=False)) if a != b),
            min(len(logged), len(accepted)),
        )
        problem = (
            f"{LOG} ({len(logged)} steps) and {JOURNAL} ({len(accepted)} accepted) disagree "
            f"from step {first}"
        )
        hint = ""
    raise LogIntegrityError(f"{run_dir}: {problem}{hint}; refusing to export")


def export_run(run_dir: Path, out_dir: Path, *, cache_dir: Path | None = None) -> ExportResult:
    """Write ``out_dir`` as a complete checkpoint of the run's current model; all or nothing.

    ``run_dir``: the coordinator's state folder, or a ``sottovoce simulate`` run directory
    (its ``coordinator/`` subfolder is used).
    """
    run_dir = coordinator_dir(run_dir)
    config, meta = read_run_config(run_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConfigError(f"{out_dir}: exists and is not empty; choose a new --out")
    loaded = load_model(config.model.name, dtype="float32", cache_dir=cache_dir)
    log, bits = read_run_log(run_dir, config, loaded.fingerprint)
    spec = config.parametrization
    genesis = log.genesis
    state, adapter = _replayed(loaded, config, log)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=out_dir.parent))
    try:
        if adapter is not None:  # on the base weights, before the merged ones replace them
            write_peft_adapter(loaded.model, adapter, spec.rank, staging / ADAPTER_DIR)
        loaded.model.load_state_dict(state)
        loaded.model.save_pretrained(staging, safe_serialization=True)
        loaded.tokenizer.save_pretrained(staging)
        if getattr(loaded.model, "generation_config", None) is not None:
            loaded.model.generation_config.save_pretrained(staging)
        card = {
            "base_model": config.model.name,
            "base_fingerprint": loaded.fingerprint,
            "parametrization": json.loads(spec.canonical_id()),
            "log_genesis": genesis,
            "log_head": log.head,
            "steps": log.version,
            "bits_spent": bits,
            "run_id": meta["run_id"],
            "run_name": config.run.name,
            "algorithm": config.run.algorithm,
            "tuned_for": tuned_for(config),
            "quality_on_public_sets": _public_quality(run_dir),
            "log": log.to_records(),
        }
        (staging / LOG_FILE).write_text(json.dumps(card, indent=2), encoding="utf-8")
        (staging / "README.md").write_text(_model_card(card), encoding="utf-8")
        if out_dir.exists():
            out_dir.rmdir()
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ExportResult(out_dir=out_dir, steps=log.version, log_head=log.head, bits_spent=bits)


def tuned_for(config: RunConfig) -> str:
    """One sentence: the task the holders scored the candidates on."""
    fitness = config.fitness
    if fitness.kind == "classification":
        words = ", ".join(repr(w) for w in fitness.label_words)
        return (
            f"classification: the next token after the prompt {fitness.prompt_template!r} "
            f"should be the record's label word ({words}), scored on the holders' private data"
        )
    return (
        f"completion: the log-likelihood of the record's {fitness.target_field!r} after the "
        f"prompt {fitness.prompt_template!r}, scored on the holders' private data"
    )


def _public_quality(run_dir: Path) -> dict[str, Any] | None:
    """The run report's quality on public sets (perplexity ratio, out-of-domain), if any."""
    try:
        report = json.loads((run_dir / REPORT).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    quality = report.get("quality_on_public_sets") if isinstance(report, dict) else None
    return quality if isinstance(quality, dict) else None


def _quality_lines(quality: dict[str, Any] | None) -> str:
    if not quality or not quality.get("perplexity"):
        return (
            "Perplexity on general text: not measured for this run (its report.json has no "
            "quality_on_public_sets; `sottovoce server` and `sottovoce simulate` write it).\n"
        )
    ppl = quality["perplexity"]
    lines = [
        f"Perplexity on the bundled general text: {ppl['base']:.4g} (base) -> "
        f"{ppl['tuned']:.4g} (this model), ratio {ppl['ratio']:.4g} (1 = unchanged; measured "
        "by the coordinator when the run finished)."
    ]
    for name, entry in sorted(quality.get("sets", {}).items()):
        if "accuracy_base" in entry and "accuracy_tuned" in entry:
            lines.append(
                f"Out-of-domain accuracy, {name} ({entry.get('examples', '?')} examples): "
                f"{entry['accuracy_base']:.4f} -> {entry['accuracy_tuned']:.4f}."
            )
    return "\n".join(lines) + "\n"


def _model_card(card: dict[str, Any]) -> str:
    parametrization = json.dumps(card["parametrization"], sort_keys=True)
    return f"""---
base_model: {card["base_model"]}
tags: [sottovoce, bboxer, zeroth-order, privacy]
---
# {card["base_model"]} post-trained with sottovoce

This checkpoint is the base model plus a log of {card["steps"]} accepted steps, found by a
coordinator that heard only answers about candidates from the data holders
(`{card["algorithm"]}`, run `{card["run_name"]}`).

Tuned for: {card["tuned_for"]}. It is not tuned for anything else, and may be worse at it.

{_quality_lines(card["quality_on_public_sets"])}
| | |
|---|---|
| base model fingerprint | `{card["base_fingerprint"]}` |
| parametrization | `{parametrization}` |
| log genesis | `{card["log_genesis"]}` |
| log head (sha256 chain) | `{card["log_head"]}` |
| steps | {card["steps"]} |
| bits heard by the coordinator | {card["bits_spent"]:.2f} |
| run | `{card["run_id"]}` |

The log itself is in `{LOG_FILE}`; replaying it on the base weights (`sottovoce export`)
reproduces these weights.
"""
