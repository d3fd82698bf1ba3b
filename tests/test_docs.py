"""The documentation site: every page under docs/ is in the nav of mkdocs.yml, ``mkdocs build --strict`` passes, and
(slow) the python snippets of every page run and print what they compute.

The strict build needs the ``docs`` extra (``pip install -e ".[docs]"``, which CI installs); without it that test
skips. The nav check needs only PyYAML.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
DOCS_EXTRA = ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python")

# python blocks (page, index) the snippet test does not run, and why
NOT_RUN = {
    ("document_masking.md", 1): "a GPU measurement: forward + backward timing of a 400M-width layer at B=8, S=2048",
    ("context_parallelism.md", 0): "needs 8 devices (a mesh of context 4 x data 2), which a test process cannot add",
}

needs_docs_extra = pytest.mark.skipif(
    any(importlib.util.find_spec(name.split(".")[0]) is None for name in DOCS_EXTRA),
    reason='mkdocs, mkdocs-material or mkdocstrings[python] not installed (pip install -e ".[docs]")',
)


def _nav_pages(entries: list) -> list[str]:
    """The page paths (relative to docs/) of a nav list, depth first."""
    pages = []
    for entry in entries:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        if isinstance(value, list):
            pages += _nav_pages(value)
        elif not value.startswith(("http://", "https://")):
            pages.append(value)
    return pages


def _load_config() -> dict:
    with open(REPO / "mkdocs.yml", encoding="utf-8") as f:
        return yaml.safe_load(f)


def _strict_build(config_file: Path, site_dir: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")  # Material's end-of-life banner, not a build message
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "--config-file",
            str(config_file),
            "--site-dir",
            str(site_dir),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_every_docs_page_is_in_the_nav():
    nav = _nav_pages(_load_config()["nav"])
    on_disk = sorted(path.relative_to(DOCS).as_posix() for path in DOCS.rglob("*.md"))
    missing = [page for page in on_disk if page not in nav]
    assert not missing, f"mkdocs.yml nav: expected every page under docs/, missing {missing}"
    absent = [page for page in nav if not (DOCS / page).is_file()]
    assert not absent, f"mkdocs.yml nav: expected existing pages, got {absent}"
    assert len(nav) == len(set(nav)), f"mkdocs.yml nav: a page listed twice in {nav}"


@needs_docs_extra
def test_strict_build_passes(tmp_path):
    result = _strict_build(REPO / "mkdocs.yml", tmp_path / "site")
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    assert (tmp_path / "site" / "api" / "ops" / "index.html").is_file()
    ops_page = (tmp_path / "site" / "api" / "ops" / "index.html").read_text(encoding="utf-8")
    assert "cu_seqlens" in ops_page, "the API page of the ops does not show the docstring of m2rnn"


@needs_docs_extra
def test_strict_build_rejects_a_broken_link(tmp_path):
    """The project's validation settings turn a link to a missing page into a failure (so the check can fail)."""
    config = _load_config()
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "index.md").write_text("# Home\n\nSee [the missing page](missing.md).\n", encoding="utf-8")
    small = {
        "site_name": "broken-link check",
        "docs_dir": str(docs),
        "validation": config["validation"],
        "nav": [{"Home": "index.md"}],
    }
    config_file = tmp_path / "mkdocs.yml"
    config_file.write_text(yaml.safe_dump(small), encoding="utf-8")
    result = _strict_build(config_file, tmp_path / "site")
    assert result.returncode != 0
    assert "missing.md" in result.stdout + result.stderr


def _pages_with_snippets() -> list[str]:
    return sorted(
        path.relative_to(DOCS).as_posix()
        for path in DOCS.rglob("*.md")
        if "```python" in path.read_text(encoding="utf-8")
    )


@pytest.mark.slow
@pytest.mark.parametrize("page", _pages_with_snippets())
def test_docs_snippets_run_and_print(page, tmp_path, monkeypatch):
    """The ```python blocks of one page run in order in one namespace (in a scratch directory) and each prints."""
    monkeypatch.chdir(tmp_path)  # snippets that train write their run directories here
    blocks = re.findall(r"^```python\n(.*?)^```", (DOCS / page).read_text(encoding="utf-8"), flags=re.S | re.M)
    namespace: dict = {"__name__": "docs_snippets"}
    for index, block in enumerate(blocks):
        if (page, index) in NOT_RUN:
            continue
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(block, f"docs/{page} python block {index}", "exec"), namespace)
        assert out.getvalue().strip(), f"docs/{page} python block {index}: expected it to print what it computes"
