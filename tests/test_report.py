"""Training you can look at: a tiny real run with --tensorboard, then `corinfomax report` on its folder."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import pytest
from datakit import small_folder
from PIL import Image
from trainkit import tiny_config

from corinfomax.cli import main
from corinfomax.training.evaluate import one_cpu_thread
from corinfomax.training.report import spectrum_plot
from corinfomax.training.trainer import train


@pytest.fixture(scope="module")
def run(cifar10: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("report")
    data = small_folder(cifar10, root / "data", per_class=10)
    with pytest.MonkeyPatch.context() as patch, one_cpu_thread():
        patch.setenv("CORINFOMAX_CACHE", str(root / "cache"))
        train(tiny_config(data, root / "run", tensorboard=True), progress=False)
    return root / "run"


def test_metrics_log_the_covariance_spectrum_and_tensorboard_the_same_numbers(run: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "lr" in r]
    epochs = [r for r in records if "elapsed_s" in r]
    assert len(epochs) == 2
    for epoch in epochs:
        eigenvalues = epoch["eigenvalues"]
        assert len(eigenvalues) == 32 and eigenvalues == sorted(eigenvalues, reverse=True)  # projector 64-32
        assert eigenvalues[0] == pytest.approx(epoch["eig_max"]) and eigenvalues[-1] == pytest.approx(epoch["eig_min"])
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    logged = events.Scalars("step/loss")
    assert [e.step for e in logged] == [r["step"] for r in steps]
    assert [e.value for e in logged] == pytest.approx([r["loss"] for r in steps], rel=1e-6)  # float32 in TB
    assert len(events.Scalars("epoch/effective_rank")) == 2 and "epoch/eigenvalues" in events.Tags()["histograms"]


def test_report_is_one_self_contained_page(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    evaluation = {"format": "corinfomax-eval/1", "data": {"num_test": 100}, "protocol": {"knn": {"k": 20}},
                  "results": {"trained": {"knn_top1": 0.5, "linear_top1": 0.625},
                              "random_init": {"knn_top1": 0.25, "linear_top1": 0.375},
                              "raw_pixels": {"knn_top1": 0.3, "linear_top1": 0.4}}}
    (run / "eval.json").write_text(json.dumps(evaluation))
    assert main(["report", str(run)]) == 0
    page = Path(json.loads(capsys.readouterr().out)["report"]).read_text()
    assert "<h1>Training report: run</h1>" in page  # a folder named `run` reads once, not "Training run run"
    pngs = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(pngs) == 3 and all(Image.open(io.BytesIO(base64.b64decode(p))).size[0] > 500 for p in pngs)
    assert not re.search(r'(src|href)="(?!data:)', page)  # nothing to fetch: opens offline, anywhere
    table = page[page.index("<table>"):page.index("</table>")]
    rows = [re.sub("<[^>]+>", "|", row).strip("|").split("||")
            for row in re.findall(r"<tr><th>[^<]+</th>.*?</tr>", table)]
    assert rows == [["this run", "50.0%", "62.5%"], ["same backbone, random init", "25.0%", "37.5%"],
                    ["raw pixels", "30.0%", "40.0%"]]


def test_report_of_a_folder_without_metrics_is_a_one_line_error(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(tmp_path)]) == 2
    assert "has no metrics.jsonl" in capsys.readouterr().err


def test_a_long_run_colours_its_spectra_by_epoch_with_a_colour_bar() -> None:
    """40 epochs of spectra: a colour bar over the epoch number, no legend covering the curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [{"epoch": e, "eigenvalues": [e * 0.5**i for i in range(32)]} for e in range(1, 41)]
    figure, ax = plt.subplots()
    try:
        bar = spectrum_plot(ax, epochs)
        assert ax.get_legend() is None and len(ax.get_lines()) == 40
        assert bar.ax.get_ylabel() == "epoch" and (bar.norm.vmin, bar.norm.vmax) == (1, 40)
        lines = ax.get_lines()
        assert lines[0].get_color() == bar.mappable.to_rgba(1) and lines[-1].get_color() == bar.mappable.to_rgba(40)
        assert all(float(t).is_integer() for t in bar.get_ticks())
        figure.canvas.draw()
        assert spectrum_plot(plt.subplots()[1], [{"epoch": 1, "eigenvalues": [1.0, 0.5]}]) is not None  # one epoch
        assert spectrum_plot(plt.subplots()[1], [{"epoch": 1}]) is None
    finally:
        plt.close("all")
