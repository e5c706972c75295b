"""`corinfomax train` and `corinfomax eval`. Nothing heavy is imported until a handler runs."""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing

from corinfomax.training.config import PRESETS, TrainConfig

_SKIP = {"preset"}


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One option per TrainConfig field (default None: only what is given overrides the preset)."""
    hints = typing.get_type_hints(TrainConfig)
    group = parser.add_argument_group("config (defaults come from the preset)")
    for field in dataclasses.fields(TrainConfig):
        if field.name in _SKIP:
            continue
        flag = "--" + field.name.replace("_", "-")
        kind = hints[field.name]
        if kind is bool:
            group.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction, default=None)
        elif typing.get_origin(kind) is tuple:  # (R, G, B) statistics, or a (low, high) range
            arity = len(typing.get_args(kind))
            group.add_argument(flag, dest=field.name, type=float, nargs=arity, default=None,
                               metavar=("R", "G", "B") if arity == 3 else ("LOW", "HIGH"))
        else:
            group.add_argument(flag, dest=field.name, type=kind, default=None)


def register(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser("train", help="train a CorInfoMax backbone on an image folder (auto-resumes)",
                           description="Train CorInfoMax. Presets: " + ", ".join(PRESETS) + ". Every config field "
                           "can be overridden; the resolved config is saved as OUT/config.json.")
    train.add_argument("--preset", default="cpu", help="recipe to start from (default: cpu)")
    train.add_argument("--allow-config-change", action="store_true",
                       help="resume a run even though the config differs from the saved one")
    train.add_argument("--list-backbones", action="store_true", help="print the accepted backbone names and exit")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_config_arguments(train)
    train.set_defaults(handler=_train)

    from corinfomax.training.eval_cli import add_eval_arguments, run_eval_command

    evaluate = sub.add_parser("eval", help="kNN and linear-probe accuracy of a checkpoint vs a random-init baseline")
    add_eval_arguments(evaluate)
    evaluate.set_defaults(handler=run_eval_command)

    report = sub.add_parser("report", help="one self-contained HTML page of a run's curves (and eval table)",
                            description="Write RUN/report.html: loss terms, lr, images/s, accuracy and the "
                            "covariance spectrum from RUN/metrics.jsonl, and RUN/eval.json's table if present.")
    report.add_argument("run", help="the run folder (--out of `corinfomax train`)")
    report.add_argument("--out", default=None, help="where to write the page (default: RUN/report.html)")
    report.set_defaults(handler=_report)


def _train(args: argparse.Namespace) -> int:
    if args.list_backbones:
        from corinfomax.training.models import available_backbones

        print("\n".join(available_backbones()))
        return 0
    from corinfomax.core.errors import DataError
    from corinfomax.training.config import resolve
    from corinfomax.training.trainer import train

    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if f.name not in _SKIP}
    config = resolve(args.preset, overrides)
    if not config.data:
        raise DataError("no training data: pass --data DIR (an ImageFolder tree or a folder of images)")
    checkpoint = train(config, allow_config_change=args.allow_config_change, progress=not args.no_progress)
    print(json.dumps({"checkpoint": str(checkpoint)}))
    return 0


def _report(args: argparse.Namespace) -> int:
    from corinfomax.training.report import write_report

    print(json.dumps({"report": str(write_report(args.run, args.out))}))
    return 0
