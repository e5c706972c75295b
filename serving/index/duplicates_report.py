"""`corinfomax index duplicates`: the near-duplicate groups of a whole collection, written as a JSON or CSV report.

The vectors are streamed from the collection's live generation (``VectorIndex.scan``, either backend) into
``duplicates.find_duplicates``; the report is written to a temporary file and renamed into place, so an
interrupted job never leaves a half-written report under the name asked for.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

from tqdm import tqdm

from corinfomax.core.errors import UserError
from corinfomax.serving.index.duplicates import Report, check_threshold, find_duplicates
from corinfomax.serving.index.factory import open_index

FORMATS = (".json", ".csv")


def report_duplicates(location: str, out: str | Path, threshold: float, collection: str | None = None,
                      progress: bool = True) -> dict[str, Any]:
    """Find the near-duplicate groups of ``collection`` at ``location`` and write them to ``out`` (``.json``:
    groups and summary; ``.csv``: one row per group member); return the summary."""
    out = Path(out)
    if out.suffix.lower() not in FORMATS:
        raise UserError(f"--out {out}: the report is written as .json or .csv, by its suffix")
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: folder {out.parent} does not exist")
    threshold = check_threshold(threshold)
    with open_index(location, collection=collection) as store:
        with tqdm(total=store.count(), unit="item", desc="duplicates", disable=not progress) as bar:
            report = find_duplicates(store.scan(), threshold, bar.update)
    summary = {"index": str(location), "collection": collection or "default", **summarise(report)}
    partial = out.with_name(f".{out.name}.partial")
    with partial.open("w", newline="") as file:
        if out.suffix.lower() == ".json":
            json.dump({"summary": summary, "groups": [{"ids": g.ids, "scores": rounded(g.scores)}
                                                      for g in report.groups]}, file, indent=1)
        else:
            write_csv(report, file)
    os.replace(partial, out)
    return summary


def summarise(report: Report) -> dict[str, Any]:
    return {"threshold": report.threshold, "items": report.items, "pairs": report.pairs,
            "groups": len(report.groups), "items_in_groups": sum(len(g.ids) for g in report.groups)}


def rounded(scores: list[float]) -> list[float]:
    return [round(score, 6) for score in scores]  # float32 similarities: more digits are noise


def write_csv(report: Report, file: Any) -> None:
    """One row per group member: ``group`` (1, 2, ... in report order), ``id``, ``score`` (its highest
    similarity to another member of its group)."""
    writer = csv.writer(file)
    writer.writerow(["group", "id", "score"])
    for number, group in enumerate(report.groups, 1):
        writer.writerows((number, item, score) for item, score in zip(group.ids, rounded(group.scores)))
