"""The Docker files: checked statically in the default run, and for real in a slow test.

Statically: the Dockerfiles install only from the wheels docker/build.sh puts in their
context (no package index), every container command is a real `sottovoce` command with
real options, the compose file wires each holder to its own folder and its own key on an
internal network, and the folders it mounts are what `sottovoce federation` writes. The
slow test runs docker/e2e.sh: a real engine builds the images offline, compose runs a
coordinator and three holders over mutual TLS on the tiny model, and the exported model
equals the native run's byte for byte.
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


def _source(volume: str) -> str:
    """A mount's host side, with the default folder (``${SOTTOVOCE_DIR:-.}`` is ``.``)."""
    volume = volume.replace("${SOTTOVOCE_DIR:-.}", ".")
    return volume.replace(
        "${SOTTOVOCE_CONFIG:-../examples/run.toml}", "../examples/run.toml"
    ).split(":")[0]


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
def test_dockerfile_installs_only_the_built_wheels_and_runs_sottovoce(name: str) -> None:
    text = (DOCKER / name).read_text(encoding="utf-8")
    copies = re.findall(r"^COPY (.+)$", text, flags=re.M)
    assert copies == ["wheels /wheels", "--from=build /opt/sottovoce /opt/sottovoce"]
    assert re.findall(r"^FROM (\S+)", text, flags=re.M) == ["sottovoce-base:bookworm"] * 2
    installs = re.findall(r"pip install[^&]*", text)
    assert installs and all("--no-index" in line for line in installs)
    assert "index-url" not in text
    assert not re.search(r"https?://", text)  # no index, no download
    assert 'ENTRYPOINT ["sottovoce"]' in text
    assert "sottovoce = " in (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert "USER sottovoce" in text and "HEALTHCHECK" in text
    cmd = re.search(r"^CMD (\[.*\])$", text, flags=re.M)
    if cmd:
        check_command(yaml.safe_load(cmd.group(1)))


def test_compose_wires_each_holder_to_its_own_folder_and_key() -> None:
    spec = compose()
    services = spec["services"]
    assert set(services) == {"coordinator", "holder-0", "holder-1", "holder-2"}
    assert spec["networks"] == {"federation": {"internal": True}}
    for name, service in services.items():
        role = "coordinator" if name == "coordinator" else "holder"
        assert service["image"] == f"sottovoce-{role}:${{SOTTOVOCE_TAG:-latest}}"
        assert "build" not in service and service["networks"] == ["federation"]
        assert "ports" not in service  # nothing published: metrics stay on 127.0.0.1 inside
        check_command(service["command"])
        mounts = [_source(volume) for volume in service["volumes"]]
        if name == "coordinator":
            assert "./certs/coordinator.key" in mounts
            assert "--metrics-address" not in service["command"]  # the default: 127.0.0.1
            continue
        argv = service["command"]
        assert argv[argv.index("--holder-id") + 1] == name
        assert "--metrics-address" not in argv  # a holder's metrics: off
        assert f"./holders/{name}" in mounts and f"./certs/{name}.key" in mounts
        assert not [m for m in mounts if m.endswith(".key") and name not in m]  # no other key
        assert service["depends_on"]["coordinator"]["condition"] == "service_healthy"
    for step in ("sottovoce federation", "sottovoce certs init", "sottovoce certs issue"):
        assert step in (DOCKER / "compose.yaml").read_text(encoding="utf-8")


def test_the_wheel_the_images_install_lists_every_package() -> None:
    """A wheel has only the packages pyproject names (the editable install hides a missing
    one; the first real image did not start without sottovoce.common.protocol)."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    setup = project["tool"]["setuptools"]
    folders = {name: Path(folder) for name, folder in setup["package-dir"].items()}
    found = set()
    for name, folder in folders.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder)
            found.add(".".join([name, *relative.parts]))
    assert found <= set(setup["packages"]), sorted(found - set(setup["packages"]))


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


def test_the_coordinators_metrics_bind_loopback_by_default() -> None:
    from sottovoce.server.metrics import DEFAULT_METRICS_ADDRESS

    assert DEFAULT_METRICS_ADDRESS.startswith("127.0.0.1:")
    option = next(p for p in main.commands["server"].params if p.name == "metrics_address")
    assert option.default is None  # None means DEFAULT_METRICS_ADDRESS


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("dockerd") is None or shutil.which("docker-compose") is None,
    reason="no Docker engine or docker-compose (apt-get install docker.io docker-compose)",
)
def test_the_compose_federation_runs_for_real_and_matches_the_native_run() -> None:
    import os

    if os.geteuid() != 0:
        pytest.skip("docker/e2e.sh starts its own dockerd: root only")
    result = subprocess.run(
        ["bash", str(DOCKER / "e2e.sh")], capture_output=True, text=True, timeout=3600
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "identical: model.safetensors" in result.stdout
    assert "DIFFERENT" not in result.stdout
    assert "metrics in the container: ok" in result.stderr
    assert "identical: config.json" in result.stdout
