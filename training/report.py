"""`corinfomax report RUN`: one self-contained HTML page of a training run, to look at rather than parse.

Curves from ``RUN/metrics.jsonl`` (docs/FORMATS.md section 1): the loss and its two terms, the learning rate,
images/s, online-probe (and kNN) accuracy, and the covariance eigenvalue spectrum per epoch (the view of
dimensional collapse in the CorInfoMax paper); and, when ``RUN/eval.json`` exists, the kNN/linear table against
random init (and raw pixels when the evaluation has them). Figures are matplotlib PNGs inlined as base64, so
the file opens anywhere, offline. Needs no PyTorch.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from corinfomax.core.errors import DataError
from corinfomax.core.files import atomic_write_text

# Rows of the evaluation table, in this order when present; other result names follow as they are.
BASELINES = {"trained": "this run", "random_init": "same backbone, random init", "raw_pixels": "raw pixels"}

STYLE = ("body{font:14px/1.4 system-ui,sans-serif;color:#1d2433;max-width:1200px;margin:20px auto;padding:0 20px}"
         "h2{font-size:15px;margin-top:24px}img{max-width:100%}dl{display:grid;grid-template-columns:auto 1fr;"
         "gap:2px 12px}dt{color:#6b7386}dd{margin:0}table{border-collapse:collapse}caption{color:#6b7386;"
         "text-align:left;padding-bottom:4px}td,th{border:1px solid #d9dde6;padding:4px 10px;text-align:right}"
         "th:first-child{text-align:left}")


def read_metrics(run: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The per-step and per-epoch records of ``RUN/metrics.jsonl`` (a torn last line is ignored)."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise DataError(f"{run} has no metrics.jsonl: give the --out folder of `corinfomax train`")
    steps: list[dict[str, Any]] = []
    epochs: list[dict[str, Any]] = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a run killed mid-write
        if "event" in record:
            continue
        (epochs if "elapsed_s" in record else steps).append(record)
    if not steps and not epochs:
        raise DataError(f"{path} holds no logged steps or epochs yet")
    return steps, epochs


def _png(figure: Any) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode()


def _series(records: list[dict[str, Any]], x: str, y: str) -> tuple[list[float], list[float]]:
    pairs = [(r[x], r[y]) for r in records if r.get(y) is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def figures(steps: list[dict[str, Any]], epochs: list[dict[str, Any]]) -> dict[str, str]:
    """Title -> base64 PNG of each curve the records allow."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display
    import matplotlib.pyplot as plt

    out: dict[str, str] = {}
    if steps:
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.2))
        for ax, key, title in zip(axes, ("loss", "attraction", "big_bang"),
                                  ("loss", "attraction term (views agree)", "big-bang term (log det of R)")):
            ax.plot(*_series(steps, "step", key), lw=1)
            ax.set(title=title, xlabel="step")
            ax.grid(alpha=0.3)
        out["Loss and its two terms"] = _png(fig)
        fig, axes = plt.subplots(1, 2, figsize=(13, 3.2))
        axes[0].plot(*_series(steps, "step", "lr"), lw=1)
        axes[0].set(title="learning rate", xlabel="step")
        axes[1].plot(*_series(steps, "step", "images_per_s"), lw=1)
        axes[1].set(title="images/s", xlabel="step")
        for ax in axes:
            ax.grid(alpha=0.3)
        out["Learning rate and throughput"] = _png(fig)
    if epochs:
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.4), layout="constrained")  # room for the colour bar
        for key, label in (("online_probe_acc", "online linear probe (train)"), ("knn_top1", "kNN top-1 (val)")):
            xs, ys = _series(epochs, "epoch", key)
            if xs:
                axes[0].plot(xs, ys, marker="o", label=label)
        axes[0].set(title="accuracy", xlabel="epoch", ylim=(0, 1))
        axes[0].legend(loc="best")
        spectrum_plot(axes[1], epochs)
        axes[2].plot(*_series(epochs, "epoch", "effective_rank"), marker="o")
        axes[2].set(title="effective rank of the covariance", xlabel="epoch")
        for ax in axes:
            ax.grid(alpha=0.3)
        out["Accuracy and the embedding spectrum"] = _png(fig)
    plt.close("all")
    return out


def spectrum_plot(ax: Any, epochs: list[dict[str, Any]]) -> Any:
    """Each epoch's covariance eigenvalues on ``ax``, coloured by epoch, with a colour bar for the epoch number (a
    legend of every epoch would cover the curves of a long run); returns the colour bar, or None without spectra."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.ticker import MaxNLocator

    ax.set(title="covariance eigenvalues, largest first", xlabel="rank")
    spectra = [(r["epoch"], r["eigenvalues"]) for r in epochs if r.get("eigenvalues")]
    if not spectra:
        return None
    first, last = spectra[0][0], spectra[-1][0]
    colours = ScalarMappable(Normalize(first, max(last, first + 1)), "viridis")
    for epoch, eigenvalues in spectra:
        ax.semilogy(range(1, len(eigenvalues) + 1), [max(v, 1e-12) for v in eigenvalues],
                    color=colours.to_rgba(epoch), lw=1)
    bar = ax.figure.colorbar(colours, ax=ax, label="epoch", pad=0.02)
    bar.locator = MaxNLocator(integer=True)  # epochs are whole numbers
    bar.update_ticks()
    return bar


def evaluation_table(evaluation: dict[str, Any]) -> str:
    """The kNN / linear top-1 of each evaluated representation as an HTML table."""
    results = evaluation.get("results", {})
    names = [n for n in BASELINES if n in results] + [n for n in results if n not in BASELINES]
    rows = []
    for name in names:
        cells = [f"{100 * results[name][key]:.1f}%" if isinstance(results[name].get(key), (int, float)) else "-"
                 for key in ("knn_top1", "linear_top1")]
        title = html.escape(BASELINES.get(name) or name)
        rows.append(f"<tr><th>{title}</th><td>{cells[0]}</td><td>{cells[1]}</td></tr>")
    knn = evaluation.get("protocol", {}).get("knn", {})
    data = evaluation.get("data", {})
    caption = (f"test images: {data.get('num_test', '?')}, kNN k={knn.get('k', '?')}, "
               f"linear probe: {evaluation.get('protocol', {}).get('linear', '?')}")
    return (f"<table><caption>{html.escape(caption)}</caption><tr><th></th><th>kNN top-1</th>"
            f"<th>linear top-1</th></tr>{''.join(rows)}</table>")


def render(run: Path) -> str:
    """The report page of a run folder."""
    steps, epochs = read_metrics(run)
    config = json.loads((run / "config.json").read_text()) if (run / "config.json").is_file() else {}
    facts = {key: config.get(key) for key in ("preset", "backbone", "projector", "image_size", "epochs", "batch_size",
                                              "optimizer", "lr", "alpha", "data") if config.get(key) is not None}
    if epochs:
        last = epochs[-1]
        facts.update(epochs_done=last["epoch"], steps=last["step"], minutes=round(last["elapsed_s"] / 60, 1))
    name = html.escape(run.resolve().name)
    parts = [f"<h1>Training report: {name}</h1>",
             "<dl>" + "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(str(v))}</dd>" for k, v in facts.items())
             + "</dl>"]
    if (run / "eval.json").is_file():
        evaluation = json.loads((run / "eval.json").read_text())
        parts += ["<h2>Evaluation (frozen features)</h2>", evaluation_table(evaluation)]
    for title, png in figures(steps, epochs).items():
        parts += [f"<h2>{html.escape(title)}</h2>",
                  f'<img alt="{html.escape(title)}" src="data:image/png;base64,{png}">']
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>corinfomax report: {name}</title>'
            f"<style>{STYLE}</style></head><body>{''.join(parts)}</body></html>")


def write_report(run: str | Path, out: str | Path | None = None) -> Path:
    """Write the report of ``run`` (default ``RUN/report.html``); return its path."""
    run = Path(run)
    if not run.is_dir():
        raise DataError(f"run folder {run} does not exist")
    target = Path(out) if out else run / "report.html"
    atomic_write_text(target, render(run))
    return target
