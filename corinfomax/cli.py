"""The `corinfomax` command: one entry point, one subcommand per job.

Each stage registers its own subcommands (``training.cli``, ``export.cli``, ``serving.cli``). Those
modules import nothing heavy at module level, so ``corinfomax extract`` works in a serving-only
environment without PyTorch. Nothing imports this module: it sits on top of every stage.
"""

from __future__ import annotations

import argparse
import logging
import sys

from corinfomax.core.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    from corinfomax.export import cli as export_cli
    from corinfomax.serving import cli as serving_cli
    from corinfomax.training import cli as training_cli

    parser = argparse.ArgumentParser(
        prog="corinfomax",
        description="CorInfoMax image embeddings: train -> eval -> export -> extract -> index/probe -> serve.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (training_cli, export_cli, serving_cli):
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:  # FAISS reports each instruction set it tries (AVX512, AVX2...) at INFO
        logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    try:
        return int(args.handler(args) or 0)
    except UserError as err:
        print(f"corinfomax {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"corinfomax {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # `python -m corinfomax.cli`, the same as the `corinfomax` command
    sys.exit(main())
