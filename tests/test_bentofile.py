"""bentofile.yaml installs what pyproject's serving install does: the base dependencies plus the [serve] extra."""

from __future__ import annotations

from pathlib import Path

import tomllib
import yaml

REPO = Path(__file__).resolve().parents[1]


def test_bento_packages_match_the_serve_extra() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    bento = yaml.safe_load((REPO / "bentofile.yaml").read_text())
    assert bento["python"]["packages"] == project["dependencies"] + project["optional-dependencies"]["serve"]


def test_bento_ships_the_wheel_and_serves_the_packaged_service() -> None:
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    bento = yaml.safe_load((REPO / "bentofile.yaml").read_text())
    assert bento["python"]["wheels"] == [f"dist/corinfomax-{version}-py3-none-any.whl"]
    assert bento["service"] == "corinfomax.serving.api.service:CorInfoMax"
