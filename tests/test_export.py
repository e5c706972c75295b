"""Export stage: real checkpoints -> real ONNX bundles, checked with onnxruntime on real CIFAR-10 images."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from servekit import run_cli

from corinfomax.core.bundle import VERIFY_IMAGES, read_card, read_verification
from corinfomax.core.errors import UserError
from corinfomax.export import parity
from corinfomax.export.bundle import export_bundle
from corinfomax.export.card import METADATA_KEY
from corinfomax.serving.embedder import Embedder
from corinfomax.training.checkpoint import load_checkpoint, save_checkpoint

pytestmark = pytest.mark.slow  # subprocesses, servers, DDP jobs or model exports

REPO = Path(__file__).resolve().parents[1]
CARD_KEYS = {"format", "name", "version", "embedding_dim", "precision", "backbone", "input", "training",
             "evaluation", "parity", "checkpoint_sha256", "exported_at"}
# Small samples keep each export to a few seconds on 2 cores.
SMALL: dict[str, Any] = dict(verify_images=200, calibration_images=64, knn_images=500)


@pytest.fixture(scope="module")
def bundles(tiny_checkpoint: Path, cifar10: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny checkpoint exported and verified in each precision."""
    root = tmp_path_factory.mktemp("bundles")
    return {
        precision: export_bundle(tiny_checkpoint, root / precision, precision, verify_data=cifar10 / "test",
                                 calibration_data=cifar10 / "train", **SMALL)
        for precision in ("fp32", "fp16", "int8")
    }


def _left_over(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_bundle_card_metadata_and_parity(bundles: dict[str, Path], tiny_checkpoint: Path, precision: str) -> None:
    bundle = bundles[precision]
    card = read_card(bundle).to_json()
    assert CARD_KEYS <= set(card)
    assert card["precision"] == precision and card["embedding_dim"] == 256 and card["backbone"] == "tiny_resnet"
    assert card["input"]["size"] == [32, 32]
    assert card["input"]["resize"] == {"shorter_side": 32, "interpolation": "bicubic"}
    assert card["checkpoint_sha256"][:12] == card["version"] and card["name"] == tiny_checkpoint.parent.name
    assert card["training"]["dataset"] is None and card["exported_at"].endswith("+00:00")  # it records no --data
    assert "reduced to 32x32" in card["intended_use"] and "--preset photo" in card["intended_use"]
    model = onnx.load(str(bundle / "model.onnx"))
    assert json.loads({p.key: p.value for p in model.metadata_props}[METADATA_KEY]) == card
    assert model.opset_import[0].version >= 17
    figures = card["parity"]
    assert figures["verified"] and figures["images"] == SMALL["verify_images"]
    assert not parity.failures(precision, figures)
    verification = read_verification(bundle, read_card(bundle))  # the check a service repeats before serving it
    assert verification is not None and verification.pixels.shape == (VERIFY_IMAGES, 32, 32, 3)
    assert verification.embeddings.shape == (VERIFY_IMAGES, 256)
    if precision == "fp32":
        assert figures["min_cosine"] >= 0.99999 and figures["max_abs_diff"] <= 1e-4
    if precision == "fp16":
        assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    if precision == "int8":
        assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in model.graph.node}
        assert figures["mean_cosine"] >= 0.98 and abs(figures["knn_top1_drop"]) <= 0.01
        assert card["quantization"]["calibration_images"] == SMALL["calibration_images"]


def test_graph_contract_dynamic_batch_and_torch_match(bundles: dict[str, Path], tiny_checkpoint: Path,
                                                      cifar10: Path) -> None:
    """uint8 NHWC in at any batch size; embedding = features / |features|; features = PyTorch backbone."""
    embedder = Embedder(bundles["fp32"], providers=["CPUExecutionProvider"])
    (spec,) = embedder.session.get_inputs()
    assert spec.name == "pixels" and spec.type == "tensor(uint8)" and spec.shape[1:] == [32, 32, 3]
    assert not isinstance(spec.shape[0], int)
    files = sorted((cifar10 / "test" / "cat").glob("*.jpg"))[:5]
    pixels = np.stack([embedder.preprocess(f) for f in files])
    for batch in (1, 5):
        embedding, features = embedder.session.run(["embedding", "features"], {"pixels": pixels[:batch]})
        assert embedding.shape == features.shape == (batch, 256) and embedding.dtype == np.float32
        np.testing.assert_allclose(embedding, features / np.linalg.norm(features, axis=1, keepdims=True), atol=1e-6)

    from corinfomax.training.models import CorInfoMaxModel

    state = load_checkpoint(tiny_checkpoint)
    config = state["config"]
    model = CorInfoMaxModel(config["backbone"], config["projector"], config["cifar_stem"]).eval()
    model.load_state_dict(state["model"])
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(config["mean"]).view(1, 3, 1, 1)) / torch.tensor(config["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = model.backbone(x).numpy()
    np.testing.assert_allclose(features, expected, atol=1e-4, rtol=1e-4)


def test_parity_failure_writes_nothing(tiny_checkpoint: Path, cifar10: Path, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(parity.THRESHOLDS, "fp32", {"min_cosine": 1.5})
    with pytest.raises(parity.ParityError, match="min_cosine .* No bundle was written"):
        export_bundle(tiny_checkpoint, tmp_path / "b", verify_data=cifar10 / "test", verify_images=20)
    assert _left_over(tmp_path) == []


def test_card_of_a_cpu_preset_model_trained_on_photos_names_them(tiny_checkpoint: Path, imagewoof: Path,
                                                                  tmp_path: Path) -> None:
    """The cpu preset says cifar10 and normalises with CIFAR-10's statistics; trained on a folder of photos, the
    card names that folder and says whose statistics the model uses."""
    photos = tmp_path / "holiday"
    photos.mkdir()
    for image in sorted((imagewoof / "val" / "beagle").iterdir())[:4]:
        (photos / image.name).symlink_to(image)
    state = load_checkpoint(tiny_checkpoint)
    assert state["config"]["preset"] == "cpu" and state["config"]["dataset_name"] == "cifar10"
    trained_on_photos = {**state, "config": {**state["config"], "data": str(photos)}}
    checkpoint = _save(tmp_path / "run" / "checkpoint.pt", trained_on_photos)
    card = read_card(export_bundle(checkpoint, tmp_path / "bundle", verify=False)).to_json()
    assert card["training"]["dataset"] == "holiday" and card["training"]["data"] == str(photos)
    assert "(holiday)" in card["intended_use"] and "cifar" not in card["intended_use"].lower()
    assert card["training"]["normalisation"] == "the cpu preset's CIFAR-10 mean and std, not computed from the " \
        "training data"
    assert card["input"]["mean"] == list(state["config"]["mean"])  # what the graph applies, as trained


def _save(path: Path, state: dict) -> Path:
    save_checkpoint(path, state)
    return path


def _bad_checkpoints(tiny_checkpoint: Path, root: Path) -> dict[str, tuple[Path, str]]:
    good = load_checkpoint(tiny_checkpoint)
    truncated = root / "truncated.pt"
    truncated.write_bytes(tiny_checkpoint.read_bytes()[:5000])
    text = root / "notes.pt"
    text.write_text("not a checkpoint")
    foreign = root / "foreign.pt"
    torch.save({"state_dict": good["model"]}, foreign)
    other_arch = {**good, "config": {**good["config"], "backbone": "resnet18"}}
    return {
        "missing": (root / "nope.pt", "does not exist"),
        "truncated": (truncated, "not a readable checkpoint"),
        "text": (text, "not a readable checkpoint"),
        "foreign": (foreign, "not a CorInfoMax checkpoint"),
        "no-config": (_save(root / "noconfig.pt", {"model": good["model"]}), "no 'config' entry"),
        "architecture": (_save(root / "arch.pt", other_arch), "another architecture.*resnet18"),
    }


def test_bad_checkpoints_give_clear_errors_and_no_bundle(tiny_checkpoint: Path, cifar10: Path, tmp_path: Path) -> None:
    (tmp_path / "ckpts").mkdir()
    out_root = tmp_path / "out"
    out_root.mkdir()
    for case, (path, message) in _bad_checkpoints(tiny_checkpoint, tmp_path / "ckpts").items():
        with pytest.raises(UserError, match=message):
            export_bundle(path, out_root / case, verify_data=cifar10 / "test")
    assert _left_over(out_root) == []


def test_bad_requests(tiny_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="unsupported precision 'int4'.*fp32, fp16, int8"):
        export_bundle(tiny_checkpoint, tmp_path / "b", "int4", verify=False)
    with pytest.raises(UserError, match="no 'val_data'.*--verify-data"):
        export_bundle(tiny_checkpoint, tmp_path / "b")
    with pytest.raises(UserError, match="--verify-data .*missing-folder does not exist"):
        export_bundle(tiny_checkpoint, tmp_path / "b", verify_data=tmp_path / "missing-folder")
    with pytest.raises(UserError, match="no 'data'.*--calibration-data"):
        export_bundle(tiny_checkpoint, tmp_path / "b", "int8", verify=False)
    with pytest.raises(UserError, match="invalid model name 'Bad Name'"):
        export_bundle(tiny_checkpoint, tmp_path / "b", verify=False, name="Bad Name")
    assert _left_over(tmp_path) == []
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("keep me")
    with pytest.raises(UserError, match="already exists; pass --overwrite"):
        export_bundle(tiny_checkpoint, precious, verify=False)
    with pytest.raises(UserError, match="not a model bundle"):
        export_bundle(tiny_checkpoint, precious, verify=False, overwrite=True)
    assert _left_over(precious) == ["thesis.txt"]


def test_overwrite_replaces_a_bundle(tiny_checkpoint: Path, tiny_bundle: Path, tmp_path: Path) -> None:
    out = Path(shutil.copytree(tiny_bundle, tmp_path / "b"))
    export_bundle(tiny_checkpoint, out, verify=False, version="v2", overwrite=True)
    assert read_card(out).version == "v2" and _left_over(tmp_path) == ["b"]


def test_cli_exports_registers_and_refuses(tiny_checkpoint: Path, tmp_path: Path) -> None:
    env = {"BENTOML_HOME": str(tmp_path / "bentoml"), "BENTOML_DO_NOT_TRACK": "True"}
    out = tmp_path / "bundle"
    (tmp_path / "eval.json").write_text(json.dumps({"results": {"trained": {"knn_top1": 0.5}}}))
    (tmp_path / "how.json").write_text(json.dumps({"hardware": "2-core CPU"}))
    done = run_cli("export", "--checkpoint", str(tiny_checkpoint.parent), "--out", str(out), "--no-verify",
                   "--name", "tiny", "--version", "t1", "--register", "--evaluation", str(tmp_path / "eval.json"),
                   "--provenance", str(tmp_path / "how.json"), **env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["bentoml_tag"] == "tiny:t1"
    card = json.loads((out / "model.json").read_text())
    assert card["evaluation"]["results"]["trained"]["knn_top1"] == 0.5
    assert card["provenance"] == {"hardware": "2-core CPU"}
    listed = subprocess.run([sys.executable, "-m", "bentoml", "models", "list", "-o", "json"],
                            env={**os.environ, **env},
                            capture_output=True, text=True, timeout=120)
    assert "tiny:t1" in listed.stdout, listed.stderr


def test_cli_bad_input_exits_2_without_traceback(tiny_checkpoint: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    import corinfomax.cli

    for args, message in [
        (["--precision", "int4"], "unsupported precision 'int4'"),
        (["--verify-images", "0"], "--verify-images must be at least 1"),
        (["--evaluation", str(tmp_path / "missing.json")], "--evaluation"),
    ]:
        code = corinfomax.cli.main(
            ["export", "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "b"), *args])
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err
    assert _left_over(tmp_path) == []
