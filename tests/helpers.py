"""Builders shared by the end-to-end tests: tiny data, policies, run configs, run specs, tasks.

Everything runs on the tiny model built in code (``tiny-llama``, byte-level tokenizer), so
the label words are single bytes ("0", "1") and every prompt is a handful of tokens.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import random
import string
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from sottovoce.client.policy import HolderPolicy
from sottovoce.common.data import write_jsonl
from sottovoce.common.directions import add_scaled_direction_
from sottovoce.common.messages import (
    AnswerKind,
    BatchSpec,
    Candidate,
    FitnessSpec,
    RunSpec,
    Task,
)
from sottovoce.common.models import load_model
from sottovoce.common.parametrizations.base import ParametrizationSpec
from sottovoce.common.parametrizations.registry import build_parametrization
from sottovoce.common.steplog import Step, extend_chain, genesis_hash

TINY = "tiny-llama"
TEMPLATE = "{text} ="
LABEL_WORDS = ("0", "1")
FITNESS = FitnessSpec(prompt_template=TEMPLATE, label_words=LABEL_WORDS)
FAR_FUTURE = 4_000_000_000.0  # a task deadline that never passes during a test

Record = dict[str, object]


@functools.cache
def tiny_fingerprint(name: str = TINY) -> str:
    """The fingerprint of the tiny model (what a holder's policy pins)."""
    return load_model(name).fingerprint


def tiny_records(count: int, seed: int = 0) -> list[Record]:
    """``count`` short records ``{"text", "label"}``; distinct seeds give distinct data sets."""
    rng = random.Random(seed)
    records: list[Record] = []
    for _ in range(count):
        text = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(4, 10)))
        records.append({"text": text, "label": rng.randint(0, 1)})
    return records


def write_records(path: Path, count: int, seed: int = 0) -> Path:
    write_jsonl(path, tiny_records(count, seed))
    return path


# -- TOML ----------------------------------------------------------------------------------
def toml_text(data: Mapping[str, Any]) -> str:
    """A TOML document for ``data``: scalars and lists at the top, one table per mapping."""
    lines = [f"{key} = {_toml_value(v)}" for key, v in data.items() if not isinstance(v, Mapping)]
    for key, value in data.items():
        if isinstance(value, Mapping):
            lines.append(f"\n[{key}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in value.items()]
    return "\n".join(lines) + "\n"


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))  # TOML basic strings accept JSON's escapes
    if isinstance(value, Sequence):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


def merged(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` applied, one level of tables deep."""
    out = {key: dict(v) if isinstance(v, Mapping) else v for key, v in base.items()}
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key].update(value)
        else:
            out[key] = value
    return out


# -- holder policies -----------------------------------------------------------------------
def policy_data(ledger_dir: Path, **overrides: Any) -> dict[str, Any]:
    """A policy (as TOML data) that allows what the tests' runs ask for."""
    base: dict[str, Any] = {
        "max_bits": 1000.0,
        "expected_model_fingerprint": tiny_fingerprint(),
        "allowed_algorithms": ["bboxer-1+1", "bboxer-1+lambda"],
        "allowed_parametrizations": ["scale", "select", "full"],
        "max_lambda": 4,
        "max_perturbation_scale": 0.5,
        "min_batch_size": 16,
        "allowed_batch_modes": ["minibatch", "full"],
        "ledger_dir": str(ledger_dir),
        "fitness": {
            "kind": "classification",
            "prompt_template": TEMPLATE,
            "label_words": list(LABEL_WORDS),
        },
    }
    return merged(base, overrides)


def write_policy(path: Path, ledger_dir: Path, **overrides: Any) -> Path:
    path.write_text(toml_text(policy_data(ledger_dir, **overrides)), encoding="utf-8")
    return path


def make_policy(ledger_dir: Path, **overrides: Any) -> HolderPolicy:
    """The same policy as :func:`policy_data`, as the holder's object."""
    data = policy_data(ledger_dir, **overrides)
    data["fitness"] = FitnessSpec(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in data["fitness"].items()}
    )
    for key in ("allowed_algorithms", "allowed_parametrizations", "allowed_batch_modes"):
        data[key] = tuple(data[key])
    data["ledger_dir"] = Path(data["ledger_dir"])
    return HolderPolicy(**data)


# -- run configs ---------------------------------------------------------------------------
def run_config_data(**overrides: Any) -> dict[str, Any]:
    """A small run on the tiny model (as TOML data)."""
    base: dict[str, Any] = {
        "run": {"name": "tiny", "seed": 7, "max_rounds": 10, "bit_budget": 1000.0},
        "model": {"name": TINY, "dtype": "float32"},
        "parametrization": {"kind": "scale"},
        "optimizer": {"initial_step": 0.05, "min_step": 0.001, "max_step": 0.2},
        "evaluation": {"mode": "minibatch", "batch_size": 16},
        "fitness": {"prompt_template": TEMPLATE, "label_words": list(LABEL_WORDS)},
        "server": {"min_holders": 2, "quorum": 2, "round_timeout_s": 60.0},
    }
    return merged(base, overrides)


def write_run_config(path: Path, **overrides: Any) -> Path:
    path.write_text(toml_text(run_config_data(**overrides)), encoding="utf-8")
    return path


# -- protocol messages ---------------------------------------------------------------------
def run_spec(
    *,
    run_id: str = "run-a",
    algorithm: str = "bboxer-1+1",
    fingerprint: str | None = None,
    parametrization: ParametrizationSpec | None = None,
    fitness: FitnessSpec = FITNESS,
    batch: BatchSpec | None = None,
) -> RunSpec:
    """A run spec on the tiny model whose genesis matches it (what a coordinator sends)."""
    fingerprint = fingerprint or tiny_fingerprint()
    parametrization = parametrization or ParametrizationSpec(kind="scale")
    return RunSpec(
        run_id=run_id,
        algorithm=algorithm,
        model_fingerprint=fingerprint,
        parametrization=parametrization,
        fitness=fitness,
        batch=batch or BatchSpec(mode="minibatch", batch_size=16),
        answer_kind=AnswerKind.COMPARE if algorithm == "bboxer-1+1" else AnswerKind.BEST_OF,
        bit_budget=1000.0,
        max_rounds=100,
        log_genesis=genesis_hash(fingerprint, parametrization.canonical_id()),
    )


def make_task(
    spec: RunSpec,
    task_id: str,
    *,
    history: Sequence[Step] = (),
    base_version: int | None = None,
    new_steps: Sequence[Step] = (),
    log_head: str | None = None,
    candidates: Sequence[Candidate] = (Candidate(seed=101, scale=0.05),),
    run_id: str | None = None,
) -> Task:
    """A task of ``spec``'s run for a holder that has applied ``history``.

    ``log_head`` defaults to the true head after ``history + new_steps``, ``base_version``
    to ``len(history)``; pass either to build a task that lies about them.
    """
    base = len(history) if base_version is None else base_version
    if log_head is None:
        log_head = extend_chain(extend_chain(spec.log_genesis, 0, history[:base]), base, new_steps)
    return Task(
        task_id=task_id,
        run_id=spec.run_id if run_id is None else run_id,
        round_index=0,
        base_version=base,
        new_steps=tuple(new_steps),
        log_head=log_head,
        candidates=tuple(candidates),
        answer_kind=spec.answer_kind,
        batch=spec.batch,
        deadline_unix=FAR_FUTURE,
    )


# -- replaying a log independently -----------------------------------------------------------
def base_plus_steps(steps: Sequence[Step], patterns: Sequence[str] = ()) -> dict[str, Any]:
    """Base weights + Σ c·z(seed), written out from the definition of ``select``/``full``.

    The selected tensors are the model's parameters in sorted-name order, each tied tensor
    once under its first name, kept if a name matches a pattern (all of them without
    patterns); tensor ``i`` of that list moves by ``c * z(seed, i)``, step after step.
    """
    model = load_model(TINY).model
    named = sorted(model.named_parameters(remove_duplicate=False))
    aliases: dict[int, list[str]] = {}
    for name, param in named:
        aliases.setdefault(id(param), []).append(name)
    unique = list({id(param): param for _, param in named}.values())  # first-seen order
    selected = [
        param
        for param in unique
        if not patterns
        or any(fnmatch.fnmatchcase(n, p) for n in aliases[id(param)] for p in patterns)
    ]
    for step in steps:
        for index, param in enumerate(selected):
            add_scaled_direction_(param.data, step.seed, index, step.coefficient)
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def replay_with_parametrization(spec: ParametrizationSpec, steps: Sequence[Step]) -> dict[str, Any]:
    """Base weights, the parametrization attached, the steps applied, folded into a state dict."""
    parametrization = build_parametrization(spec)
    parametrization.attach(load_model(TINY).model)
    for step in steps:
        parametrization.apply_step(step)
    return parametrization.export_state_dict()


def differing_tensors(expected: Mapping[str, Any], actual: Mapping[str, Any]) -> list[str]:
    """Names whose tensors are not bit-for-bit equal (or missing); empty if all match."""
    assert set(expected) <= set(actual), sorted(set(expected) - set(actual))
    return [name for name in expected if not torch.equal(expected[name], actual[name])]
