"""The README's config and policy examples are the files the demo uses, verbatim."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from sottovoce.client.policy import load_policy
from sottovoce.common.config import load_config

ROOT = Path(__file__).resolve().parent.parent


def toml_blocks(text: str) -> list[str]:
    return [block.strip() for block in re.findall(r"```toml\n(.*?)```", text, flags=re.S)]


@pytest.mark.parametrize("example", ["examples/run.toml", "examples/policy.toml"])
def test_readme_shows_the_example_files(example: str) -> None:
    blocks = toml_blocks((ROOT / "README.md").read_text(encoding="utf-8"))
    assert (ROOT / example).read_text(encoding="utf-8").strip() in blocks


def test_examples_are_valid_and_agree() -> None:
    config = load_config(ROOT / "examples/run.toml")
    policy = load_policy(ROOT / "examples/policy.toml")
    assert config.fitness == policy.fitness
    assert config.run.algorithm in policy.allowed_algorithms
    assert config.parametrization in policy.parametrizations
    assert config.optimizer.candidates <= policy.max_lambda
    assert config.optimizer.max_step <= policy.max_perturbation_scale


@pytest.mark.parametrize(
    "example", ["examples/chunkvote-demo-data.toml", "examples/chunkvote-data-rich.toml"]
)
def test_the_chunk_vote_examples_are_valid_and_their_holders_require_them(example: str) -> None:
    from sottovoce.federation import simulated_policy

    config = load_config(ROOT / example)
    spec = config.dp_spec()
    assert spec.chunks > 0 and spec.vote_noise > 0 and spec.epsilon == config.privacy.epsilon
    policy = simulated_policy(config, "sha256:" + "0" * 64, ROOT / "unused", min_examples=500)
    assert policy.answer_mechanisms == ("chunk-vote",) and policy.min_chunks == spec.chunks
    assert policy.require_dp and policy.max_answer_epsilon is not None


def test_the_dpzero_example_is_valid_and_calibrates() -> None:
    config = load_config(ROOT / "examples/dpzero.toml")
    spec = config.dp_spec()
    assert config.run.algorithm == "dpzero" and spec.noise_multiplier > 0
    assert config.sampling_rate == config.evaluation.batch_size / 500
