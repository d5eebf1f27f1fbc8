"""The README's config and policy examples are the files the demo uses, verbatim."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from sottovoce.client.policy import load_policy
from sottovoce.common.config import load_config
from sottovoce.common.protocol.answers import ranking_bits

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


def test_the_dpzero_example_is_valid_and_calibrates() -> None:
    config = load_config(ROOT / "examples/dpzero.toml")
    spec = config.dp_spec()
    assert config.run.algorithm == "dpzero" and spec.noise_multiplier > 0
    assert config.sampling_rate == config.evaluation.batch_size / 500


def test_the_cma_example_is_a_rank_run_within_its_budget() -> None:
    config = load_config(ROOT / "examples/cma.toml")
    per_answer = ranking_bits(config.optimizer.candidates, config.optimizer.rank_depth)
    answers = config.run.max_rounds * config.simulate.holders
    assert config.run.bit_budget >= answers * per_answer
    assert config.parametrization.dimension == 576
