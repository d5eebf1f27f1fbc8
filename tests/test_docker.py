"""The Docker files, validated as far as a machine without a Docker engine allows.

Every COPY source exists, every container command is a real `sottovoce` command with
real options, the compose file parses and wires each holder to its own folder and its
own key, and the folders it mounts are what `sottovoce federation` writes.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import click
import pytest
import yaml
from helpers import TINY, run_config_data, toml_text

from sottovoce.cli import main
from sottovoce.client.policy import load_policy
from sottovoce.federation import write_federation

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
DOCKERFILES = ("coordinator.Dockerfile", "holder.Dockerfile")


def compose() -> dict[str, Any]:
    data = yaml.safe_load((DOCKER / "compose.yaml").read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def check_command(argv: list[str]) -> None:
    """``argv`` is a `sottovoce` command line whose command and options all exist."""
    command = main.commands.get(argv[0])
    assert isinstance(command, click.Command), f"no command {argv[0]!r}"
    known = {opt for param in command.params for opt in param.opts}
    used = [arg for arg in argv[1:] if arg.startswith("--")]
    assert set(used) <= known, f"{argv[0]}: unknown options {set(used) - known}"
    for param in command.params:
        if param.required:
            assert set(param.opts) & set(used), f"{argv[0]}: {param.opts} is required"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_copies_what_exists_and_runs_sottovoce(name: str) -> None:
    text = (DOCKER / name).read_text(encoding="utf-8")
    for source in re.findall(r"^COPY (\S+(?: \S+)*) \S+$", text, flags=re.M):
        for path in source.split():
            assert (ROOT / path).exists(), f"{name}: COPY {path} does not exist"
    assert 'ENTRYPOINT ["sottovoce"]' in text
    assert "sottovoce = " in (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert "USER sottovoce" in text and "HEALTHCHECK" in text
    cmd = re.search(r"^CMD (\[.*\])$", text, flags=re.M)
    if cmd:
        check_command(yaml.safe_load(cmd.group(1)))


def test_compose_wires_each_holder_to_its_own_folder_and_key() -> None:
    services = compose()["services"]
    assert set(services) == {"coordinator", "holder-0", "holder-1", "holder-2"}
    for name, service in services.items():
        dockerfile = service["build"]["dockerfile"]
        assert (ROOT / dockerfile).exists()
        check_command(service["command"])
        mounts = [volume.split(":")[0] for volume in service["volumes"]]
        if name == "coordinator":
            assert "./certs/coordinator.key" in mounts
            continue
        argv = service["command"]
        assert argv[argv.index("--holder-id") + 1] == name
        assert f"./holders/{name}" in mounts and f"./certs/{name}.key" in mounts
        assert not [m for m in mounts if m.endswith(".key") and name not in m]  # no other key
        assert service["depends_on"]["coordinator"]["condition"] == "service_healthy"
    for step in ("sottovoce federation", "sottovoce certs init", "sottovoce certs issue"):
        assert step in (DOCKER / "compose.yaml").read_text(encoding="utf-8")


def test_federation_writes_the_folders_compose_mounts(tmp_path: Path) -> None:
    config = tmp_path / "run.toml"
    data = run_config_data(simulate={"holders": 3, "train_size": 60, "test_size": 20})
    data["model"] = {"name": TINY}
    config.write_text(toml_text(data), encoding="utf-8")
    folders = write_federation(config, tmp_path / "holders")
    assert [f.name for f in folders] == ["holder-0", "holder-1", "holder-2"]
    for folder in folders:
        assert (folder / "data.jsonl").read_text(encoding="utf-8").count("\n") == 20
        policy = load_policy(folder / "policy.toml")
        assert policy.ledger_dir == folder.resolve() / "ledger"  # travels with the folder


@pytest.mark.skipif(shutil.which("docker") is None, reason="no docker client")
def test_docker_compose_accepts_the_file() -> None:
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.skip("this docker client has no compose plugin")
    result = subprocess.run(
        ["docker", "compose", "-f", str(DOCKER / "compose.yaml"), "config", "-q"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
