"""bentofile.yaml installs what pyproject's serving install does (the base dependencies plus the [serve] extra),
pinned by requirements/serve.lock.txt, and builds without an index (no BentoML locking)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements" / "serve.lock.txt"


def read_pins(path: Path) -> dict[str, str]:
    lines = [line for line in path.read_text().splitlines() if line and not line.startswith("#")]
    pins = dict(line.split("==") for line in lines)
    assert len(pins) == len(lines), "every line pins one package with =="
    return {canonicalize_name(name): version for name, version in pins.items()}


def serve_requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [Requirement(line) for line in project["dependencies"] + project["optional-dependencies"]["serve"]]


def test_bento_installs_the_lock_without_relocking() -> None:
    python = yaml.safe_load((REPO / "bentofile.yaml").read_text())["python"]
    assert python["requirements_txt"] == str(LOCK.relative_to(REPO)) and python["lock_packages"] is False
    assert "packages" not in python  # one list of what the Bento installs


def test_lock_pins_every_serving_requirement_within_pyproject_ranges() -> None:
    """The lock is for the container's platform, Linux x86_64 (onnxruntime-gpu there)."""
    pins = read_pins(LOCK)
    linux = {"platform_system": "Linux", "platform_machine": "x86_64", "sys_platform": "linux"}
    for requirement in serve_requirements():
        name = canonicalize_name(requirement.name)
        if requirement.marker is not None and not requirement.marker.evaluate(linux):
            assert name not in pins, requirement
            continue
        assert name in pins, f"{requirement} is not pinned: run `make lock`"
        assert pins[name] in requirement.specifier, f"{name}=={pins[name]} is outside {requirement}: run `make lock`"
    assert not {"torch", "torchvision"} & set(pins), "the serving install needs no PyTorch"


@pytest.mark.slow  # runs scripts/lock_serve.py in a subprocess
def test_lock_script_pins_the_installed_closure(tmp_path: Path) -> None:
    out = tmp_path / "lock.txt"
    subprocess.run([sys.executable, str(REPO / "scripts" / "lock_serve.py"), "--out", str(out)], check=True,
                   capture_output=True)
    pins = read_pins(out)
    for requirement in serve_requirements():
        if requirement.marker is None or requirement.marker.evaluate():
            assert canonicalize_name(requirement.name) in pins, requirement
    assert "starlette" in pins  # a dependency of BentoML: the whole closure, not only the top level


def test_bento_ships_the_wheel_and_serves_the_packaged_service() -> None:
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    bento = yaml.safe_load((REPO / "bentofile.yaml").read_text())
    assert bento["python"]["wheels"] == [f"dist/corinfomax-{version}-py3-none-any.whl"]
    assert bento["service"] == "corinfomax.serving.api.service:CorInfoMax"
