"""Print how a training run was made, as JSON for the model card: command, epochs, hardware, wall time.

    python scripts/provenance.py RUN_DIR > RUN_DIR/provenance.json
"""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

from corinfomax.training.config import PRESETS, TrainConfig

# Fields that name where a run reads and writes, or how it is run, not what it learns.
NOT_RECIPE = {"data", "out", "preset", "epochs", "time_budget_min", "workers", "device", "log_every", "knn_every",
              "val_data", "tensorboard", "checkpoint_every"}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def train_command(config: dict, run: Path) -> str:
    """The `corinfomax train` command that makes this run: the preset plus every field that differs from it."""
    preset = TrainConfig.from_dict({**PRESETS[config["preset"]], "preset": config["preset"]}).to_dict()
    flags = []
    for key, value in config.items():
        default = preset.get(key)
        default = list(default) if isinstance(default, tuple) else default  # config.json holds lists
        if key in NOT_RECIPE or key not in preset or value == default:
            continue
        name = key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(f"--{name}" if value else f"--no-{name}")
        else:
            flags.append(f"--{name} " + (" ".join(map(str, value)) if isinstance(value, list) else str(value)))
    return " ".join([f"corinfomax train --preset {config['preset']} --data {config['data']} --out {run}", *flags,
                     f"--epochs {config['epochs']} --time-budget-min 0"])


def main(run: Path) -> None:
    config = json.loads((run / "config.json").read_text())
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
              if '"elapsed_s"' in line]
    last = epochs[-1] if epochs else {}
    print(json.dumps({
        "commands": [
            train_command(config, run),
            f"corinfomax eval --checkpoint {run} --train-data <cifar10>/train --test-data <cifar10>/test --linear fast",
            "bash scripts/make_default_model.sh (the whole pipeline)",
        ],
        "epochs": last.get("epoch"),
        "steps": last.get("step"),
        "train_wall_time_s": round(last.get("elapsed_s", 0.0)),
        "hardware": f"{os.cpu_count()} CPU cores ({cpu_model()}), no GPU",
        "threads": os.environ.get("TRAIN_THREADS", "see the run's log"),
        "final_train_metrics": {k: last[k] for k in ("loss", "attraction", "big_bang", "effective_rank",
                                                      "online_probe_acc") if k in last},
    }, indent=2))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
