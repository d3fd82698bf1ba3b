"""Output of the benchmarks: plain-text tables and JSON files written atomically."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# A table column: (title, row key, format applied to a non-None value).
Column = tuple[str, str, str]


def format_table(columns: Sequence[Column], rows: Sequence[Mapping[str, Any]]) -> str:
    """Rows as a left-aligned text table under a title line; a missing or None value prints as ``-``."""
    cells = [[title for title, _, _ in columns]]
    for row in rows:
        cells.append(["-" if row.get(key) is None else fmt.format(row[key]) for _, key, fmt in columns])
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = [" | ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in cells]
    lines.insert(1, "-+-".join("-" * width for width in widths))
    return "\n".join(lines)


def write_json(path: str | os.PathLike, payload: Any) -> None:
    """Writes ``payload`` as indented JSON to ``path`` through a temporary file in the same folder + rename, so a
    reader never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(payload, fh, indent=1)
            fh.write("\n")
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
