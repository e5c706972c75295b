"""The training loop on tiny CPU runs: resume, config guard, NaN guard, metrics, both pipelines (issue 2 s.4)."""

from __future__ import annotations

import json
import math
import runpy
import sys
from pathlib import Path

import pytest
import torch
from datakit import small_folder
from trainkit import tiny_config

from corinfomax.training import batches, budget, evaluate, run_folder, step, trainer
from corinfomax.training.checkpoint import CheckpointError, load_checkpoint, non_finite, save_checkpoint
from corinfomax.training.evaluate import one_cpu_thread as one_thread
from corinfomax.training.guard import StepGuard
from corinfomax.training.loss import CorInfoMaxLoss, CorInfoMaxOutput
from corinfomax.training.run_folder import ResumeConflict
from corinfomax.training.step import TrainingDiverged
from corinfomax.training.trainer import train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _private_cache_one_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("CORINFOMAX_CACHE", str(tmp_path / "cache"))
    with one_thread():
        yield


@pytest.fixture(scope="module")
def data(cifar10: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """100 labelled images: 3 steps of 32 per epoch."""
    return small_folder(cifar10, tmp_path_factory.mktemp("data"), per_class=10)


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_run_writes_checkpoint_config_and_metrics(data: Path, tmp_path: Path, recwarn) -> None:
    run = tmp_path / "run"
    ckpt = train(tiny_config(data, run), progress=False)
    state = load_checkpoint(ckpt)
    assert state["epoch"] == 2 and state["step"] == 6
    assert set(state["loss"]) == {"mu1", "mu2", "R1", "R2"} and state["loss"]["R1"].dtype == torch.float64
    assert json.loads((run / "config.json").read_text())["projector"] == "64-32"
    rows = records(run)
    steps = [r for r in rows if "lr" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert all({"loss", "attraction", "big_bang", "images_per_s"} <= set(r) for r in steps)
    assert steps[0]["lr"] < steps[1]["lr"] and steps[-1]["lr"] < steps[2]["lr"]  # warm-up, then cosine
    epochs = [r for r in rows if "effective_rank" in r]
    assert [r["epoch"] for r in epochs] == [1, 2]
    assert all({"eig_min", "eig_max", "online_probe_acc"} <= set(r) for r in epochs)
    assert rows[0]["event"] == "data" and rows[0]["images"] == 100 and rows[0]["skipped"] == 0
    assert not [w for w in recwarn if "requires_grad" in str(w.message)]
    assert not list(run.glob("*.tmp")) and not list(run.glob(".*.tmp"))


def test_bf16_autocast_trains_on_any_cpu(data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a CPU with native bf16 (AMX, AVX512-BF16) the steps run under bf16 autocast. Forced here on whatever CPU
    runs the tests: the run trains (its losses differ from float32's from the first step: autocast took effect),
    every loss is finite, and the loss's running statistics stay float64."""
    train(tiny_config(data, tmp_path / "fp32"), progress=False)
    fp32 = [r["loss"] for r in records(tmp_path / "fp32") if "lr" in r]
    monkeypatch.setattr(step, "bf16_is_fast", lambda device: True)
    state = load_checkpoint(train(tiny_config(data, tmp_path / "bf16", amp=True), progress=False))
    bf16 = [r["loss"] for r in records(tmp_path / "bf16") if "lr" in r]
    assert len(bf16) == len(fp32) == 6 and all(map(math.isfinite, bf16)) and bf16[0] != fp32[0]
    assert state["loss"]["R1"].dtype == torch.float64


@pytest.mark.parametrize("views", [{}, {"local_views": 2, "local_size": 8}], ids=["two views", "multi-crop"])
def test_resume_after_interruption_matches_an_uninterrupted_run(data: Path, tmp_path: Path, views: dict[str, int],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    reference = load_checkpoint(train(tiny_config(data, tmp_path / "straight", **views), progress=False))

    original = batches.BatchSource.epoch

    def interrupted(self, epoch: int, *args):
        if epoch == 1:
            raise KeyboardInterrupt
        return original(self, epoch, *args)

    monkeypatch.setattr(batches.BatchSource, "epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(data, tmp_path / "resumed", **views), progress=False)
    assert load_checkpoint(tmp_path / "resumed")["epoch"] == 1
    monkeypatch.setattr(batches.BatchSource, "epoch", original)
    resumed = load_checkpoint(train(tiny_config(data, tmp_path / "resumed", **views), progress=False))

    assert resumed["epoch"] == reference["epoch"] == 2
    # Both runs execute the same kernels in the same order on the same machine (one thread), so they agree
    # bit for bit on any CPU (exact equality holds; the bound is loose on purpose). A resume bug (lost
    # optimizer momentum, a replayed or skipped batch, a reset loss state) moves weights far more than that.
    for part in ("model", "loss", "probe"):
        for key, value in reference[part].items():
            torch.testing.assert_close(resumed[part][key], value, rtol=1e-5, atol=1e-6, msg=f"{part}.{key}")
    for key in ("loss", "attraction", "big_bang", "effective_rank"):
        assert resumed["metrics"][key] == pytest.approx(reference["metrics"][key], rel=1e-5)
    steps = [r["step"] for r in records(tmp_path / "resumed") if "lr" in r]
    assert steps == [1, 2, 3, 4, 5, 6]  # nothing logged twice


def test_changed_config_is_refused_unless_allowed(data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    train(tiny_config(data, run, epochs=1), progress=False)
    before = (run / "checkpoint.pt").read_bytes()
    with pytest.raises(ResumeConflict, match=r"lr: 0\.05 -> 0\.1.*--allow-config-change"):
        train(tiny_config(data, run, epochs=1, lr=0.1), progress=False)
    assert (run / "checkpoint.pt").read_bytes() == before
    # Runtime-only fields may change; with permission, so may the recipe (here: one more epoch).
    train(tiny_config(data, run, epochs=2, log_every=5), allow_config_change=True, progress=False)
    assert load_checkpoint(run)["epoch"] == 2
    starts = [r for r in records(run) if r.get("event") == "data"]  # the change is on record, for provenance
    assert [r["step"] > 0 for r in starts] == [False, True] and "config_changes" not in starts[0]
    assert starts[1]["config_changes"] == {"epochs": [1, 2]}
    # `python scripts/provenance.py RUN`, run in this process (the quick lane starts no subprocess).
    monkeypatch.setattr(sys, "argv", ["provenance.py", str(run)])
    capsys.readouterr()
    runpy.run_path(str(REPO / "scripts" / "provenance.py"), run_name="__main__")
    commands = [c for c in json.loads(capsys.readouterr().out)["commands"] if c.startswith("corinfomax train")]
    assert len(commands) == 2 and "--epochs 1 " in commands[0] and "--allow-config-change" not in commands[0]
    assert "--epochs 2 " in commands[1] and commands[1].endswith("--allow-config-change")


def test_a_run_saved_before_a_config_field_existed_resumes(data: Path, tmp_path: Path) -> None:
    """A field added since a run was saved counts as its default, so the same command resumes the old run."""
    run = tmp_path / "run"
    train(tiny_config(data, run, epochs=1), progress=False)
    state = load_checkpoint(run)
    for name in ("global_views", "local_views", "local_size", "crop_scale", "local_scale"):
        del state["config"][name]
    torch.save(state, run / "checkpoint.pt")
    train(tiny_config(data, run, epochs=1), progress=False)  # nothing to do, and no ResumeConflict
    with pytest.raises(ResumeConflict, match="local_views: None -> 2"):
        train(tiny_config(data, run, epochs=1, local_views=2), progress=False)


def test_checkpoint_of_another_architecture_is_refused(data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(tiny_config(data, run, epochs=1), progress=False)
    with pytest.raises(CheckpointError, match="another architecture"):
        train(tiny_config(data, run, epochs=1, projector="64-16"), allow_config_change=True, progress=False)


def _nan_after(monkeypatch: pytest.MonkeyPatch, good_calls: int, bad_calls: int) -> None:
    """Make the loss non-finite for calls good_calls+1 .. good_calls+bad_calls."""
    original, calls = CorInfoMaxLoss.forward, [0]

    def forward(self, z1, z2) -> CorInfoMaxOutput:
        out = original(self, z1, z2)
        calls[0] += 1
        if good_calls < calls[0] <= good_calls + bad_calls:
            return CorInfoMaxOutput(out.loss * float("nan"), out.attraction, out.big_bang)
        return out

    monkeypatch.setattr(CorInfoMaxLoss, "forward", forward)


def test_repeated_nan_stops_and_keeps_the_last_good_checkpoint(data: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    _nan_after(monkeypatch, good_calls=3, bad_calls=100)  # epoch 1 fine, epoch 2 diverges
    run = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match="3 consecutive steps with a non-finite loss.*checkpoint.*intact"):
        train(tiny_config(data, run, max_bad_steps=3), progress=False)
    state = load_checkpoint(run)
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert [r["consecutive"] for r in records(run) if r.get("event") == "skipped_step"] == [1, 2, 3]


def test_one_nan_step_is_skipped_and_training_goes_on(data: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    _nan_after(monkeypatch, good_calls=1, bad_calls=1)
    run = tmp_path / "run"
    train(tiny_config(data, run, max_bad_steps=2), progress=False)
    assert load_checkpoint(run)["epoch"] == 2
    assert [r["step"] for r in records(run) if r.get("event") == "skipped_step"] == [1]


def test_divergence_in_the_first_epoch_leaves_no_run_folder(data: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    _nan_after(monkeypatch, good_calls=0, bad_calls=100)
    with pytest.raises(TrainingDiverged, match="nothing was saved"):
        train(tiny_config(data, tmp_path / "run", max_bad_steps=2), progress=False)
    assert not (tmp_path / "run").exists()


def test_huge_lr_stops_with_a_clear_error_and_leaves_only_finite_state(data: Path, tmp_path: Path) -> None:
    # lr 1e6 keeps the loss finite (BatchNorm normalises the exploding activations away) while the running
    # variances overflow: only a guard over the whole state notices. 12 steps per epoch, 20 bad ones allowed,
    # so epoch 1 ends, and is checkpointed, between bad steps.
    run = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match="20 consecutive steps with a non-finite loss or model state"):
        train(tiny_config(data, run, lr=1e6, batch_size=8, warmup_epochs=0, max_bad_steps=20), progress=False)
    state = load_checkpoint(run)
    assert state["epoch"] == 1 and non_finite(state) == []
    assert len([r for r in records(run) if r.get("event") == "skipped_step"]) >= 20


def test_guard_rolls_back_parameters_buffers_and_optimizer_state() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.LazyLinear(2))
    model(torch.randn(2, 3, 6, 6))  # materialise the lazy layer
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    guard = StepGuard([model], [optimizer])

    def step(scale: float) -> bool:
        guard.save()
        optimizer.zero_grad()
        model(torch.randn(8, 3, 6, 6) * scale).square().mean().backward()
        optimizer.step()
        return bool(guard.finite(torch.device("cpu")))

    assert step(1.0)  # a good step: momentum buffers now exist
    before = {k: v.clone() for k, v in model.state_dict().items()}
    momentum = [optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    assert not step(1e25)  # the batch variance overflows float32: running_var becomes inf
    guard.restore()
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key  # num_batches_tracked too
    for p, m in zip(model.parameters(), momentum):
        assert torch.equal(optimizer.state[p]["momentum_buffer"], m)
    assert step(1.0)

    fresh = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)  # a bad first step creates no state
    guard = StepGuard([model], [fresh])
    guard.save()
    fresh.zero_grad()
    (model(torch.randn(8, 3, 6, 6)).sum() * float("nan")).backward()
    fresh.step()
    assert not bool(guard.finite(torch.device("cpu")))
    guard.restore()
    assert len(fresh.state) == 0 and non_finite(model.state_dict()) == []


def test_checkpoint_writer_refuses_non_finite_tensors(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"config": {}, "model": {"w": torch.ones(2)}})
    before = path.read_bytes()
    bad = {"config": {}, "model": {"bn.running_var": torch.tensor([1.0, float("inf")]), "w": torch.ones(2)},
           "optimizer": {"state": {0: {"momentum_buffer": torch.tensor([float("nan")])}}}}
    with pytest.raises(CheckpointError, match=r"2 tensor\(s\) hold NaN or inf \(model\.bn\.running_var, "
                                              r"optimizer\.state\.0\.momentum_buffer\)"):
        save_checkpoint(path, bad)
    assert path.read_bytes() == before


def test_time_budget_is_fitted_after_the_warm_up_steps(data: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # Warm-up steps (cuDNN autotuning, compilation) are not timed; short epochs are fitted too.
    assert budget.budget_window(100) == (10, 30)
    assert budget.budget_window(12) == (6, 12)
    assert budget.budget_window(1) == (0, 1)
    run = tmp_path / "run"
    monkeypatch.setattr(trainer, "budget_spent", lambda run, state: False)  # the fit alone, not the hard stop
    train(tiny_config(data, run, epochs=50, batch_size=8, time_budget_min=1e-4), progress=False)
    assert json.loads((run / "config.json").read_text())["epochs"] == 1  # 6 ms cannot hold two epochs
    assert load_checkpoint(run)["epoch"] == 1


def test_a_spent_time_budget_stops_mid_epoch_and_the_same_command_resumes(data: Path, tmp_path: Path,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    """A budget shorter than one epoch stops at a step boundary with a mid-epoch checkpoint and says so; the
    resumed run (here without a budget) ends where an uninterrupted run ends."""
    reference = load_checkpoint(train(tiny_config(data, tmp_path / "straight"), progress=False))
    run = tmp_path / "run"
    with caplog.at_level("WARNING", logger=budget.log.name):
        train(tiny_config(data, run, time_budget_min=1e-6), progress=False)  # 60 us: spent by the first step
    saved = load_checkpoint(run)
    assert (saved["epoch"], saved["epoch_batch"], saved["step"]) == (0, 1, 1)
    assert "time budget of 1e-06 min spent: stopped at step 1 (epoch 1 of 2, batch 1 of 3)" in caplog.text
    assert "run the same command to continue" in caplog.text
    stop = [r for r in records(run) if r.get("event") == "budget_stop"]
    assert stop == [{**stop[0], "step": 1, "epoch": 0, "epoch_batch": 1}]

    resumed = load_checkpoint(train(tiny_config(data, run), progress=False))
    assert resumed["epoch"] == 2 and resumed["step"] == 6 and "epoch_batch" not in resumed
    for part in ("model", "loss", "probe"):
        for key, value in reference[part].items():
            torch.testing.assert_close(resumed[part][key], value, rtol=1e-5, atol=1e-6, msg=f"{part}.{key}")


def test_knn_during_training_uses_a_bounded_bank_of_each_class(data: Path, cifar10: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    """--val-data: the kNN bank is the first KNN_BANK_IMAGES / classes training images of each class, and the
    log and metrics say how many."""
    val = small_folder(cifar10, tmp_path / "val", per_class=2, split="test")
    monkeypatch.setattr(evaluate, "KNN_BANK_IMAGES", 35)  # 3 of the 10 per class
    run = tmp_path / "run"
    with caplog.at_level("INFO", logger=evaluate.log.name):
        state = load_checkpoint(train(tiny_config(data, run, epochs=1, val_data=str(val)), progress=False))
    assert "a bank of 30 training images (up to 3 per class, 10 classes; at most 35 in all)" in caplog.text
    epoch = [r for r in records(run) if "knn_top1" in r]
    assert len(epoch) == 1 and epoch[0]["knn_bank"] == 30 and 0 <= epoch[0]["knn_top1"] <= 1
    assert state["metrics"]["knn_bank"] == 30

    flat = tmp_path / "flat"
    flat.mkdir()
    for path in sorted(data.rglob("*.png"))[:40]:
        (flat / f"{path.parent.name}-{path.name}").symlink_to(path.resolve())
    with pytest.raises(trainer.ConfigError, match="--val-data needs class sub-folders"):
        train(tiny_config(flat, tmp_path / "flat-run", val_data=str(val)), progress=False)
    assert not (tmp_path / "flat-run").exists()


def test_a_folder_too_large_for_the_cache_streams_from_the_files(data: Path, tmp_path: Path, caplog,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(batches, "CACHE_MAX_BYTES", 100 * 3 * 16**2 - 1)  # one byte short of these 100 images
    with caplog.at_level("INFO", logger=batches.log.name):
        train(tiny_config(data, tmp_path / "run", epochs=1), progress=False)
    assert "a uint8 cache would need 0.0 GiB > 0 GiB: streaming 100 files" in caplog.text
    assert load_checkpoint(tmp_path / "run")["step"] == 3 and not (tmp_path / "cache").exists()


def test_pil_pipeline_with_persistent_workers(data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(tiny_config(data, run, augment="pil", workers=2), progress=False)
    state = load_checkpoint(run)
    assert state["epoch"] == 2 and torch.isfinite(torch.tensor(state["metrics"]["loss"]))


def test_a_budget_fitted_run_resumes_with_the_same_command(data: Path, tmp_path: Path) -> None:
    """A time budget rewrites the saved epochs (e.g. 100 -> 4); the same command asks for 100 again and must
    resume, not conflict. Without a budget, other epochs are a real change."""
    saved = tiny_config(data, tmp_path / "run", time_budget_min=15.0, epochs=4).to_dict()
    assert run_folder.check_resume(tiny_config(data, tmp_path / "run", time_budget_min=15.0, epochs=100), saved,
                                 False) == {}
    # Asking on purpose for other epochs (a longer schedule on top of a budget-fitted run) is a recorded change.
    assert run_folder.check_resume(tiny_config(data, tmp_path / "run", time_budget_min=15.0, epochs=100), saved,
                                 True) == {"epochs": [4, 100]}
    with pytest.raises(ResumeConflict, match="epochs: 4 -> 100"):
        run_folder.check_resume(tiny_config(data, tmp_path / "run", epochs=100), {**saved, "time_budget_min": 0.0},
                              False)


def test_time_budget_says_when_it_shortens_epochs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The cpu preset's budget overrides --epochs: the log must name both numbers and how to keep --epochs."""
    from corinfomax.training.distributed import Dist

    config = tiny_config(tmp_path, tmp_path / "run", epochs=30, time_budget_min=1.0)
    with caplog.at_level("INFO", logger=budget.log.name):
        # 0.1 s/step, 100 steps per epoch -> 10 s per epoch -> 5 epochs in 90% of 1 minute
        assert budget.fit_budget(config, 100, 0.1, Dist(), torch.device("cpu")) == 5  # 90% of 60 s, 10 s/epoch
        assert budget.fit_budget(config, 1, 0.1, Dist(), torch.device("cpu")) == 30
    shortened, kept = caplog.records[-2:]
    assert shortened.levelname == "WARNING" and "shortened from --epochs 30 to 5" in shortened.getMessage()
    assert "--time-budget-min 0" in shortened.getMessage()
    assert kept.levelname == "INFO" and "all 30 epoch(s) fit" in kept.getMessage()
