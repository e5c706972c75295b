"""Reading docs/FORMATS.md, for the tests that hold what the code writes to what the document says."""

from __future__ import annotations

import re

from servekit import REPO


def section(title: str) -> str:
    """The text of docs/FORMATS.md's section whose heading starts with ``title``."""
    text = (REPO / "docs" / "FORMATS.md").read_text()
    start = text.index(f"\n## {title}")
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end]


def table_keys(text: str) -> list[set[str]]:
    """The keys of each `| key | content |` table in ``text``: the backticked names of the first column."""
    tables: list[set[str]] = []
    for block in re.split(r"\n(?!\|)", text):
        rows = [line for line in block.splitlines() if line.startswith("| `")]
        if rows:
            tables.append({key for row in rows for key in re.findall(r"`([^`]+)`", row.split("|")[1])})
    return tables
