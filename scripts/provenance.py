"""Print how a training run was made, as JSON for the model card: command, epochs, hardware, wall time.

    python scripts/provenance.py RUN_DIR > RUN_DIR/provenance.json
"""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

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


def invocations(config: dict, records: list[dict]) -> list[tuple[dict, float]]:
    """Each `corinfomax train` invocation that changed the recipe: its config and its training seconds.

    Every invocation logs a "data" record; one that resumed with --allow-config-change names what it changed, so
    walking back from the final config gives each earlier one. A plain resume repeats the previous command.
    """
    starts = [r for r in records if r.get("event") == "data"]
    configs = [config]
    for start in reversed(starts[1:]):
        configs.insert(0, {**configs[0], **{k: old for k, (old, _new) in start.get("config_changes", {}).items()}})
    # Each invocation's epoch records report the seconds since it started; its last one is its training time.
    bounds = [-1, *(s["step"] for s in starts[1:]), float("inf")]
    seconds = [max((r["elapsed_s"] for r in records if "elapsed_s" in r and low < r["step"] <= high), default=0.0)
               for low, high in zip(bounds, bounds[1:])]
    kept = [0] + [i for i in range(1, len(starts)) if starts[i].get("config_changes")]
    # The seconds of plain resumes count towards the invocation they continued.
    totals = [sum(seconds[i:j]) for i, j in zip(kept, kept[1:] + [len(starts)])]
    return [(configs[i], total) for i, total in zip(kept, totals)]


def main(run: Path) -> None:
    config = json.loads((run / "config.json").read_text())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = invocations(config, records)
    last: dict[str, Any] = next((r for r in reversed(records) if "elapsed_s" in r), {})
    print(json.dumps({
        "commands": [
            *(train_command(c, run) + (" --allow-config-change" if i else "") for i, (c, _) in enumerate(steps)),
            f"corinfomax eval --checkpoint {run} --train-data <cifar10>/train --test-data <cifar10>/test --linear fast",
            "bash scripts/make_default_model.sh (the whole pipeline)",
        ],
        "epochs": last.get("epoch"),
        "steps": last.get("step"),
        "train_wall_time_s": round(sum(seconds for _, seconds in steps)),
        "hardware": f"{os.cpu_count()} CPU cores ({cpu_model()}), no GPU",
        "threads": os.environ.get("TRAIN_THREADS", "see the run's log"),
        "final_train_metrics": {k: last[k] for k in ("loss", "attraction", "big_bang", "effective_rank",
                                                      "online_probe_acc") if k in last},
    }, indent=2))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
