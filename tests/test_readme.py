"""The README's config and policy examples are the files the demo uses, verbatim."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
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


def test_the_dev_chosen_dpzero_example_differs_from_the_example_only_where_it_says() -> None:
    """examples/dpzero-whole.toml is sweep_drift's dev-chosen DPZero row (25 steps, lr 0.02,
    max coefficient 0.002, noise for epsilon 6 over those 25 steps) and nothing else."""
    base = load_config(ROOT / "examples/dpzero.toml").model_dump()
    whole = load_config(ROOT / "examples/dpzero-whole.toml").model_dump()
    changed = {
        (section, key)
        for section in base
        for key in base[section]
        if base[section][key] != whole[section][key]
    }
    assert changed == {
        ("run", "name"),
        ("run", "max_rounds"),
        ("run", "bit_budget"),
        ("dpzero", "learning_rate"),
        ("dpzero", "max_coefficient"),
    }
    assert (whole["run"]["max_rounds"], whole["run"]["bit_budget"]) == (25, 96.0 * 25)
    assert (whole["dpzero"]["learning_rate"], whole["dpzero"]["max_coefficient"]) == (0.02, 0.002)
    spec = load_config(ROOT / "examples/dpzero-whole.toml").dp_spec()
    assert spec.epsilon == 6.0 and spec.noise_multiplier > 0


# -- the README's shell blocks, run as a newcomer would copy them ---------------------------
# ```bash: run by this file's default test; ```bash slow: the demo, DPZero, evaluate and
# Docker blocks, run in the repository by the slow test, in order (each may use the runs the
# ones before it made); ```bash no-test: templates for other machines (a coordinator's host
# name, certificates, /abs/ paths), never run.
FENCES = ("bash", "bash slow", "bash no-test")


def shell_blocks(text: str) -> list[tuple[str, str]]:
    """(fence info, body) of every ```bash... block, in order."""
    found = re.findall(r"^[ \t]*```(bash[^\n]*)\n(.*?)^[ \t]*```", text, flags=re.S | re.M)
    return [(info.strip(), textwrap.dedent(body)) for info, body in found]


def run_block(body: str, cwd: Path, timeout_s: float) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", body],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def test_every_readme_shell_block_is_fenced_as_what_it_is() -> None:
    blocks = shell_blocks((ROOT / "README.md").read_text(encoding="utf-8"))
    assert blocks and {info for info, _ in blocks} <= set(FENCES)
    assert any(info == "bash" for info, _ in blocks)


@pytest.mark.parametrize(
    "body",
    [b for i, b in shell_blocks((ROOT / "README.md").read_text(encoding="utf-8")) if i == "bash"],
)
def test_readme_shell_block_runs_as_written(body: str, tmp_path: Path) -> None:
    done = run_block(body, tmp_path, timeout_s=120)
    assert done.returncode == 0, f"{body}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"


@pytest.mark.slow
def test_readme_slow_shell_blocks_run_in_a_fresh_clone(tmp_path: Path) -> None:
    """The demo and what follows it, typed in a fresh clone of the committed tree (with this
    .venv: installing one is the Makefile's business), in README order."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    (clone / ".venv").symlink_to(ROOT / ".venv")
    (ROOT / ".venv" / ".installed-stamp").touch()  # newer than the clone's pyproject.toml
    for info, body in shell_blocks((ROOT / "README.md").read_text(encoding="utf-8")):
        if info != "bash slow":
            continue
        if "docker compose" in body and shutil.which("docker") is None:
            continue  # no engine here; tests/test_docker.py checks the files it uses
        if "docker compose" in body:  # `up` serves until stopped: stop with the coordinator
            body = body.replace("up --build", "up --build --exit-code-from coordinator")
        # `make test` is this suite itself
        script = "\n".join(line for line in body.splitlines() if not line.startswith("make test"))
        done = run_block(script, clone, timeout_s=3600)
        assert done.returncode == 0, f"{body}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"


def test_the_cma_example_is_a_rank_run_within_its_budget() -> None:
    config = load_config(ROOT / "examples/cma.toml")
    per_answer = ranking_bits(config.optimizer.candidates, config.optimizer.rank_depth)
    answers = config.run.max_rounds * config.simulate.holders
    assert config.run.bit_budget >= answers * per_answer
    assert config.parametrization.dimension == 576
