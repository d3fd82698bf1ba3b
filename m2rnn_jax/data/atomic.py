"""Files that appear complete or not at all: written under a temporary name, renamed when finished."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path next to ``path``; on success renames it to ``path``, on error deletes it.

    The temporary name (``.<name>.tmp-<pid>``) starts with a dot and never ends in the final suffix, so an
    interrupted run leaves nothing that looks like a finished file.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
