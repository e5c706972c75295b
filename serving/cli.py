"""Serving-side subcommands: `extract`, `index build`, `index migrate`, `index duplicates`, `index snapshot`,
`index restore`, `probe fit`, `serve`, and `collection ...` (the service's collection verbs for a stopped service).

Imports happen inside the handlers so that `corinfomax --help` stays fast and nothing here pulls in
PyTorch (serving environments do not have it).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

MAX_FAILURES_SHOWN = 10
DEFAULT_PORT = 3000


def register(subparsers: Any) -> None:
    """Add this stage's subcommands to the `corinfomax` parser."""
    _register_extract(subparsers)
    _register_index(subparsers)
    _register_probe(subparsers)
    _register_serve(subparsers)
    _register_collection(subparsers)


def _register_extract(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "extract", help="embed image files into a features folder (resumable)",
        description="Embed images into OUT: .npy shards + Parquet metadata + manifest.json. Rerun the same "
                    "command to resume a stopped run. Unreadable files are skipped and listed.",
    )
    p.add_argument("sources", nargs="+", metavar="SOURCE",
                   help="image file, folder (recursive; FOLDER/<class>/... gives labels), glob, or .txt list of paths")
    p.add_argument("--model", required=True, metavar="BUNDLE", help="model bundle folder (from `corinfomax export`)")
    p.add_argument("--out", required=True, metavar="DIR", help="features folder to create or resume")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="dtype of the stored embeddings")
    p.add_argument("--batch-size", type=int, default=256, help="images per inference call")
    p.add_argument("--shard-rows", type=int, default=4096, help="files per shard (the unit of resuming)")
    p.add_argument("--workers", type=int, default=None,
                   help="batches decoded and embedded at a time, one thread each (default: one per core)")
    p.add_argument("--threads", type=int, default=None,
                   help="onnxruntime intra-op threads per batch (default 1: the workers already use every core)")
    p.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="local: this machine; ray: a Ray cluster (needs the `ray` extra)")
    p.add_argument("--ray-address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local instance)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=_extract)


def _register_index(subparsers: Any) -> None:
    index = subparsers.add_parser("index", help="build the search index from features, or move it")
    index_sub = index.add_subparsers(dest="index_command", required=True, metavar="ACTION")
    p = index_sub.add_parser("build", help="build an index the service loads from a features folder",
                             description="Bulk-load features into an index folder (--out: picks the FAISS index kind "
                                         "from collection size and memory budget, reports recall@10 vs exact "
                                         "search) or into a Milvus collection (--to: resumable, rerun to finish).")
    p.add_argument("--features", required=True, metavar="DIR", help="features folder (from `corinfomax extract`)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", metavar="INDEX_DIR", help="index folder to create")
    where.add_argument("--to", metavar="LOCATION",
                       help="Milvus collection to add to: a Milvus Lite FILE.db or milvus://HOST:PORT/COLLECTION")
    p.add_argument("--memory-budget", default=None, metavar="SIZE",
                   help="memory the FAISS index may use, e.g. 512M, 4G (default: no limit)")
    p.add_argument("--kind", default=None, help="force a FAISS index kind (e.g. Flat, HNSW32, IVF1024,PQ32)")
    p.add_argument("--thumbnail-px", type=int, default=None, metavar="PX",
                   help="side of the thumbnails the search page shows, made from the image files (default: the "
                        "service's, 128; 0: none)")
    p.set_defaults(handler=_index_build)
    p = index_sub.add_parser("migrate", help="copy an index to another backend (folder, .db, milvus://) and verify",
                             description="Copy every item (vector, metadata, label, thumbnail) from one index to "
                                         "another, in either direction, then check the counts and a sample of "
                                         "vectors. The target gives new ids (--id-map writes old -> new); rerun "
                                         "an interrupted migration to finish it.")
    p.add_argument("--from", dest="source", required=True, metavar="LOCATION",
                   help="index folder, Milvus Lite FILE.db or milvus://HOST:PORT/COLLECTION")
    p.add_argument("--to", dest="target", required=True, metavar="LOCATION", help="the same kinds; created if missing")
    p.add_argument("--batch", type=int, default=1000, help="items per insert (keep it when resuming)")
    p.add_argument("--id-map", default=None, metavar="FILE", help="write {old id: new id} as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=_index_migrate)
    p = index_sub.add_parser("duplicates", help="group the near-duplicates of a whole collection into a report",
                             description="Find every pair of items at or above --threshold cosine similarity in a "
                                         "collection (exact range search over its stored vectors, read in batches), "
                                         "group them, and write a JSON report (groups with ids and scores, and a "
                                         "summary) or a CSV one (one row per group member), by --out's suffix.")
    p.add_argument("--index", required=True, metavar="LOCATION",
                   help="index folder, Milvus Lite FILE.db or milvus://HOST:PORT/COLLECTION")
    p.add_argument("--collection", default=None, help="the collection to scan (default: default)")
    p.add_argument("--threshold", type=float, default=None,
                   help="similarity at or above which two items are duplicates, in (0, 1] (default: the measured "
                        "default of POST /duplicates)")
    p.add_argument("--out", required=True, metavar="REPORT", help="report.json or report.csv")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=_index_duplicates)
    p = index_sub.add_parser("snapshot", help="copy an index, while it is served and written, into a checked folder",
                             description="Copy an index folder as of one point in time (SQLite's online backup of "
                                         "the catalog and every generation, their FAISS files, the originals they "
                                         "name) into DIR, with a manifest of sizes and sha256 written last. A Milvus "
                                         "index is copied into the same folder format through `index migrate`.")
    p.add_argument("--index", required=True, metavar="LOCATION",
                   help="index folder, Milvus Lite FILE.db or milvus://HOST:PORT/COLLECTION")
    p.add_argument("--to", required=True, metavar="DIR", help="a new (or empty) folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=_index_snapshot)
    p = index_sub.add_parser("restore", help="check a snapshot and make it the index at a location",
                             description="Check every file of a snapshot against its manifest (a partial or "
                                         "changed snapshot is refused before anything is written), then restore "
                                         "it: an index folder as a whole, a Milvus index through `index migrate` "
                                         "(new ids; --id-map writes old -> new).")
    p.add_argument("--from", dest="source", required=True, metavar="DIR", help="a folder `index snapshot` wrote")
    p.add_argument("--index", required=True, metavar="LOCATION",
                   help="index folder, Milvus Lite FILE.db or milvus://HOST:PORT/COLLECTION; must not hold an index")
    p.add_argument("--force", action="store_true",
                   help="replace the index folder or Milvus Lite file at LOCATION (stop its service first)")
    p.add_argument("--id-map", default=None, metavar="FILE", help="Milvus: write {old id: new id} as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=_index_restore)


def _register_probe(subparsers: Any) -> None:
    probe = subparsers.add_parser("probe", help="fit a linear probe on labelled features")
    probe_sub = probe.add_subparsers(dest="probe_command", required=True, metavar="ACTION")
    p = probe_sub.add_parser("fit", help="fit a logistic-regression probe and write probe.npz",
                             description="Fit a multinomial logistic regression on labelled features (or the "
                                         "labelled items of an index), choosing L2 on a held-out split; report "
                                         "held-out accuracy; write probe.npz.")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--features", metavar="DIR", help="features folder with labels")
    source.add_argument("--index", metavar="LOCATION",
                        help="index folder, Milvus Lite FILE.db or milvus://HOST:PORT/COLLECTION (needs --out)")
    p.add_argument("--out", default=None, metavar="PATH",
                   help="probe file, or a model bundle folder to write probe.npz into (default: DIR/probe.npz)")
    p.add_argument("--holdout", type=float, default=0.2, help="fraction of each class held out for evaluation")
    p.add_argument("--l2", type=float, nargs="+", default=None, help="L2 strengths to try (default: 0.1 0.01 0.001)")
    p.add_argument("--max-iter", type=int, default=300, help="L-BFGS iterations per fit")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out split")
    p.set_defaults(handler=_probe_fit)


def _register_serve(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "serve", help="start the HTTP service (bentoml serve) on a model bundle and an index",
        description="Start `bentoml serve corinfomax.serving.api.service:CorInfoMax`. Options override the "
                    "CORINFOMAX_* environment variables (see the README); with none, the default model and the "
                    "demo index are served.",
    )
    p.add_argument("--model", default=None, help="bundle folder or BentoML model tag (CORINFOMAX_MODEL)")
    p.add_argument("--index", default=None,
                   help="index folder, Milvus Lite FILE.db or milvus://HOST:PORT/COLLECTION (CORINFOMAX_INDEX)")
    p.add_argument("--probe", default=None, help="probe.npz (CORINFOMAX_PROBE)")
    p.add_argument("--workers", type=int, default=None, help="API worker processes (CORINFOMAX_WORKERS)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=None, help=f"port (default: the PORT variable, else {DEFAULT_PORT})")
    p.set_defaults(handler=_serve)


def _register_collection(subparsers: Any) -> None:
    group = subparsers.add_parser(
        "collection", help="list, create, drop, re-embed or roll back the collections of a stopped service's index",
        description="The service's collection verbs (POST /collections, /create_collection, /drop_collection, "
                    "/reembed, /rollback, /drop_generation) for an index no service has open. Models are named as "
                    "in requests (name or name@version) among the bundles of --models.")
    verbs = group.add_subparsers(dest="collection_command", required=True, metavar="ACTION")
    for verb, text in (("list", "every collection with its model, size and generation"),
                       ("create", "a new, empty collection bound to --model"),
                       ("drop", "drop a collection, its generations and originals"),
                       ("reembed", "build a new generation with --model, then switch to it (resumes a stopped job)"),
                       ("rollback", "make the previous generation live again"),
                       ("drop-generation", "free the previous generation"),
                       ("field-index", "index a metadata field that filters read (as POST /index_field does)")):
        p = verbs.add_parser(verb, help=text, description=text[0].upper() + text[1:] + ".")
        if verb != "list":
            p.add_argument("name", metavar="COLLECTION")
        p.add_argument("--index", required=True, metavar="LOCATION",
                       help="index folder, Milvus Lite FILE.db or milvus://HOST:PORT/COLLECTION (CORINFOMAX_INDEX)")
        p.add_argument("--models", default=None, metavar="DIR",
                       help="folder of model bundles (default: CORINFOMAX_MODELS, else the shipped models/)")
        p.add_argument("--default-model", default=None, metavar="BUNDLE",
                       help="the bundle an index without collections was built with (default: CORINFOMAX_MODEL)")
        if verb in ("create", "reembed"):
            p.add_argument("--model", required=verb == "create", help="model name or name@version")
        if verb in ("reembed", "rollback"):
            p.add_argument("--allow-missing", action="store_true",
                           help="leave out items that cannot be embedded (added as vectors, original gone)")
        if verb == "create":
            p.add_argument("--keep-originals", action="store_true", help="keep the images added over HTTP")
        if verb == "reembed":
            p.add_argument("--no-progress", action="store_true", help="no progress bar")
        if verb == "field-index":
            p.add_argument("--field", required=True, help="metadata.<path>, as filters name it")
        p.set_defaults(handler=_collection)


def _collection(args: argparse.Namespace) -> int:
    from corinfomax.serving.admin import Admin
    from corinfomax.serving.api.config import Settings
    from corinfomax.serving.index.filters import metadata_field

    settings = Settings.from_env()
    models = Path(args.models) if args.models else settings.models_dir
    default = Path(args.default_model) if args.default_model else settings.bundle_dir()
    admin = Admin(args.index, models, default, settings.originals_max_bytes, settings.keep_originals,
                  settings.thumbnail_side)
    try:
        verb = args.collection_command
        if verb == "list":
            answer: Any = admin.collections.describe()
        elif verb == "create":
            answer = admin.create(args.name, args.model, args.keep_originals)
        elif verb == "drop":
            admin.drop(args.name)
            answer = {"dropped": args.name}
        elif verb == "reembed":
            answer = admin.reembed(args.name, args.model, args.allow_missing, not args.no_progress).public()
        elif verb == "rollback":
            answer = admin.rollback(args.name, args.allow_missing)
        elif verb == "field-index":
            answer = admin.collections.index_field(args.name, metadata_field(args.field))
        else:
            answer = admin.drop_generation(args.name)
    finally:
        admin.close()
    print(json.dumps(answer, indent=2))
    return 1 if isinstance(answer, dict) and answer.get("state") == "failed" else 0


def _extract(args: argparse.Namespace) -> int:
    from corinfomax.serving.extract.extract import extract
    from corinfomax.serving.extract.features import failures

    summary = extract(
        args.sources, args.model, args.out, dtype=args.dtype, batch_size=args.batch_size,
        shard_rows=args.shard_rows, workers=args.workers, threads=args.threads, engine=args.engine,
        ray_address=args.ray_address, show_progress=not args.no_progress,
    )
    failed = failures(args.out)
    print(f"{summary['images'] - len(failed)} of {summary['images']} images embedded into {args.out} "
          f"({summary['images_per_s']} images/s this run)")
    if failed:
        print(f"{len(failed)} files skipped (see the `error` column of {Path(args.out) / 'shards'}/*.parquet):")
        for path, error in failed[:MAX_FAILURES_SHOWN]:
            print(f"  {path}: {error}")
        if len(failed) > MAX_FAILURES_SHOWN:
            print(f"  ... and {len(failed) - MAX_FAILURES_SHOWN} more")
    return 0


def _index_build(args: argparse.Namespace) -> int:
    from corinfomax.core.thumbnails import DEFAULT_SIDE
    from corinfomax.serving.index.build import build_index, build_into, parse_size

    side = DEFAULT_SIDE if args.thumbnail_px is None else args.thumbnail_px
    if args.to:
        stats = build_into(args.features, args.to, side)
        print(json.dumps(stats, indent=2))
        print(f"index {args.to}: {stats['count']} vectors ({stats['labelled']} labelled), {stats['kind']}")
        return 0
    budget = parse_size(args.memory_budget) if args.memory_budget else None
    report = build_index(args.features, args.out, memory_budget_bytes=budget, kind=args.kind,
                         thumbnail_side=side)
    print(json.dumps(report, indent=2))
    recall = report.get("recall_at_10")
    recall_text = f"{recall:.4f}" if isinstance(recall, (int, float)) else "n/a"
    print(f"index {args.out}: {report['count']} vectors, kind {report['kind']}, recall@10 vs exact {recall_text}")
    return 0


def _index_migrate(args: argparse.Namespace) -> int:
    from corinfomax.serving.index.migrate import migrate

    summary = migrate(args.source, args.target, batch=args.batch, id_map=args.id_map, progress=not args.no_progress)
    print(json.dumps(summary, indent=2))
    print(f"copied {summary['copied']} items from {args.source} to {args.target} ({summary['target_count']} there "
          f"now); counts and {summary['verified_sample']} sampled items verified")
    return 0


def _index_snapshot(args: argparse.Namespace) -> int:
    from corinfomax.serving.index.snapshot import snapshot

    manifest = snapshot(args.index, args.to, progress=not args.no_progress)
    items = sum(gen["count"] for entry in manifest["collections"].values() for gen in entry["generations"].values())
    print(f"snapshot of {args.index} in {args.to}: {len(manifest['collections'])} collections, {items} items over "
          f"every generation, {len(manifest['files'])} files; every write acknowledged before "
          f"{manifest['started_at']} is in it")
    if manifest["missing_originals"]:
        print(f"{len(manifest['missing_originals'])} originals were deleted while it ran (their items cannot be "
              "re-embedded)")
    return 0


def _index_restore(args: argparse.Namespace) -> int:
    from corinfomax.serving.index.restore import restore

    summary = restore(args.source, args.index, force=args.force, id_map=args.id_map, progress=not args.no_progress)
    print(json.dumps(summary, indent=2))
    print(f"restored {args.source} (taken at {summary['snapshot_started_at']}) as {args.index}: "
          f"{summary['items']} items")
    return 0


def _index_duplicates(args: argparse.Namespace) -> int:
    from corinfomax.serving.index.duplicates import DEFAULT_THRESHOLD
    from corinfomax.serving.index.duplicates_report import report_duplicates

    threshold = DEFAULT_THRESHOLD if args.threshold is None else args.threshold
    summary = report_duplicates(args.index, args.out, threshold, args.collection, progress=not args.no_progress)
    print(json.dumps(summary, indent=2))
    print(f"{summary['groups']} groups of near-duplicates ({summary['items_in_groups']} of {summary['items']} items, "
          f"similarity >= {summary['threshold']}) written to {args.out}")
    return 0


def _probe_fit(args: argparse.Namespace) -> int:
    from corinfomax.core.errors import UserError
    from corinfomax.serving.probe import DEFAULT_L2_GRID, fit_probe_on_features, fit_probe_on_index

    options = {"l2_grid": args.l2 or DEFAULT_L2_GRID, "holdout": args.holdout, "max_iter": args.max_iter,
               "seed": args.seed}
    if args.index is not None:
        if args.out is None:
            raise UserError("probe fit --index needs --out (a probe file or a model bundle folder)")
        report = fit_probe_on_index(args.index, args.out, **options)
    else:
        report = fit_probe_on_features(args.features, args.out, **options)
    print(json.dumps(report, indent=2))
    print(f"probe: held-out accuracy {report['holdout_accuracy']:.4f} over {report['classes']} classes "
          f"(l2={report['l2']}); written to {report['path_written']}")
    return 0


def _port(option: int | None) -> int:
    """--port, else PORT (as `make serve` and most hosting platforms set it), else 3000."""
    import os

    from corinfomax.core.errors import UserError

    if option is not None:
        return option
    raw = os.environ.get("PORT", "")
    if not raw:
        return DEFAULT_PORT
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise UserError(f"PORT={raw!r} is not a port number (1-65535)")
    return int(raw)


def _serve(args: argparse.Namespace) -> int:
    import os
    import sys

    for option, variable in (("model", "CORINFOMAX_MODEL"), ("index", "CORINFOMAX_INDEX"),
                             ("probe", "CORINFOMAX_PROBE"), ("workers", "CORINFOMAX_WORKERS")):
        if getattr(args, option) is not None:
            os.environ[variable] = str(getattr(args, option))
    # Check the bundle here, so a wrong path is one clear line instead of a worker crash log.
    from corinfomax.core.bundle import read_card
    from corinfomax.serving.api.config import Settings

    read_card(Settings.from_env().bundle_dir())
    command = [sys.executable, "-m", "bentoml", "serve", "corinfomax.serving.api.service:CorInfoMax",
               "--host", args.host, "--port", str(_port(args.port))]
    os.execv(sys.executable, command)  # bentoml takes over this process: signals reach it directly
