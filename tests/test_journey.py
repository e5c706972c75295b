"""The user's journey end to end (issue 16): the README's CLI walk-through run as written on tiny data, files
others can read, the model card free of host paths, and a Bento built with the network cut, then served."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import httpx
import pytest
from datakit import small_folder

from bench.launcher import Server

pytestmark = pytest.mark.slow  # subprocesses, servers, DDP jobs or model exports

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
OUTPUTS = ("runs", "bundles", "features", "index")
# What the issue found owner-only before: each must be among the files checked.
SHARED_FILES = ("runs/quick/checkpoint.pt", "runs/quick/config.json", "runs/quick/eval.json",
                "bundles/quick/model.onnx", "bundles/quick/model.json", "bundles/quick/probe.npz",
                "features/test/shards/00000.parquet", "features/test/shards/00000.npy", "index/test/faiss.index")


def walkthrough_commands() -> list[str]:
    """The walk-through's shell commands, continuation lines joined, without comments and the install line."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## From images to a service: the CLI walk-through"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "the walk-through has no bash block"
    commands = []
    for line in block.group(1).replace("\\\n", " ").splitlines():
        command = line.split("#", 1)[0].strip()
        if command and not command.startswith("pip install"):
            commands.append(" ".join(command.split()))
    return commands


def nobody_else_reads(root: Path) -> list[str]:
    """Paths under ``root`` another user could not read (files) or enter (folders) under umask 022."""
    bad = []
    for path in [root, *root.rglob("*")]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        wanted = 0o755 if path.is_dir() else 0o644
        if not path.is_symlink() and mode != wanted:
            bad.append(f"{path.relative_to(root.parent)} {oct(mode)}")
    return bad


@pytest.fixture(scope="module")
def project(cifar10: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkout's working folder beside ../shared/datasets/cifar10 (tiny: 15 images per class and split),
    after the walk-through's steps 1-5 ran there as written, under umask 022."""
    root = tmp_path_factory.mktemp("journey")
    data = root / "shared" / "datasets" / "cifar10"
    for split in ("train", "test"):
        small_folder(cifar10, data / split, per_class=15, split=split)
    project = root / "project"
    project.mkdir()
    commands = walkthrough_commands()
    assert commands[0] == "D=../shared/datasets/cifar10" and commands[-1].endswith("corinfomax serve"), commands
    steps = commands[:-1]  # the last one serves: see test_walkthrough_serves_what_it_built
    script = "set -euo pipefail\numask 022\n" + "\n".join(steps) + "\n"
    result = subprocess.run(["bash", "-c", script], cwd=project, env=walkthrough_env(root), capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, f"{script}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    (root / "walkthrough.log").write_text(result.stdout + result.stderr)
    return project


def walkthrough_env(root: Path) -> dict[str, str]:
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
            "CORINFOMAX_CACHE": str(root / "cache"), "BENTOML_HOME": str(root / "bentoml"),
            "BENTOML_DO_NOT_TRACK": "True"}


def test_walkthrough_runs_quietly_and_files_are_readable_by_others(project: Path) -> None:
    assert "Could not load library" not in (project.parent / "walkthrough.log").read_text()  # FAISS's loader
    for name in SHARED_FILES:
        assert (project / name).is_file(), name
    for folder in OUTPUTS:
        assert nobody_else_reads(project / folder) == []


def test_model_card_records_data_paths_as_typed(project: Path) -> None:
    text = (project / "bundles" / "quick" / "model.json").read_text()
    assert str(project.parent) not in text  # no host path in a bundle meant to be published
    card = json.loads(text)
    assert card["training"]["data"] == "../shared/datasets/cifar10/test"
    assert card["evaluation"]["data"]["train"] == "../shared/datasets/cifar10/train"
    assert card["parity"]["data"] == "../shared/datasets/cifar10/test"


@pytest.fixture(scope="module")
def served(project: Path) -> Iterator[Server]:
    """The walk-through's serve line, run as written; its port comes from PORT."""
    serve_line = walkthrough_commands()[-1]
    server = Server(walkthrough_env(project.parent), project.parent / "serve.log", cwd=project,
                    command=["bash", "-c", serve_line]).start()
    yield server
    server.stop()


def test_walkthrough_serves_what_it_built(served: Server, project: Path, cifar10: Path) -> None:
    image = cifar10 / "test" / "cat" / "0000.jpg"
    with httpx.Client(base_url=served.url, timeout=60) as http:
        info = http.post("/info", json={}).json()
        assert info["model"]["name"] == "quick" and info["index"]["count"] == 150
        hits = http.post("/search", files={"images": image.read_bytes()}, data={"k": "3"}).json()["results"][0]
        assert hits[0]["score"] == pytest.approx(1.0, abs=1e-4) and hits[0]["label"] == "cat"
        assert http.post("/classify", files={"images": image.read_bytes()}).json()["method"] == "probe"
    log = (project.parent / "serve.log").read_text()
    assert f"index {project / 'index' / 'test'}:" in log  # where the index is, absolute
    assert "Could not load library" not in log


def _network_cut() -> list[str]:
    """`unshare -n` (a network namespace with no interfaces) when this machine allows it (root or user
    namespaces), else skip: the point of the test is that nothing is downloaded."""
    try:
        allowed = subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0
    except FileNotFoundError:
        allowed = False
    if not allowed:
        pytest.skip("`unshare -n` is not allowed here (needs root or unprivileged user namespaces)")
    return ["unshare", "-n"]


def test_bento_builds_with_the_network_cut_and_serves(tmp_path: Path, cifar10: Path) -> None:
    offline = _network_cut()
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml"), "BENTOML_DO_NOT_TRACK": "True"}
    env.pop("CORINFOMAX_INDEX", None)
    wheel = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", "dist", "."]
    subprocess.run([*offline, *wheel], cwd=REPO, env=env, check=True, capture_output=True, timeout=300)
    build = subprocess.run([*offline, sys.executable, "-m", "bentoml", "build", "-o", "tag"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    tag = build.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    stored = tmp_path / "bentoml" / "bentos" / Path(*tag.split(":"))
    assert (stored / "env" / "python" / "requirements.txt").read_text().startswith(
        (REPO / "requirements" / "serve.lock.txt").read_text())

    log = tmp_path / "serve.log"
    server = Server(env, log, cwd=tmp_path,
                    command=[sys.executable, "-m", "bentoml", "serve", tag, "--host", "127.0.0.1"]).start()
    try:
        image = (cifar10 / "test" / "cat" / "0000.jpg").read_bytes()
        hits = httpx.post(f"{server.url}/search", files={"images": image}, data={"k": "3"}, timeout=60)
        assert hits.status_code == 200 and len(hits.json()["results"][0]) == 3, hits.text
    finally:
        server.stop()
    index = tmp_path / "bentoml" / "data" / "index"
    assert (index / "index.sqlite").is_file()  # under BentoML's home: the stored Bento does not grow
    assert not any(path.name == "index.sqlite" for path in stored.rglob("*"))
    assert f"index {index}:" in log.read_text()
    assert f"probe {stored / 'src' / 'models' / 'default' / 'probe.npz'}" in log.read_text()  # the Bento's model
