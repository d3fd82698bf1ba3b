"""Every ```python block of README.md runs, in order, in one namespace, and prints what its comments say.

A ``print(...)  # text`` line in a README snippet documents the output: the text after ``#`` must be exactly the line
that the print writes. The snippets use tiny shapes, so they run in the default suite (a few seconds).
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str) -> list[str]:
    """The bodies of the ```python fenced blocks of a markdown text, in order."""
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def documented_output(block: str) -> list[str]:
    """The expected output lines: the comment of every line that starts with ``print(``."""
    return [line.split("#", 1)[1].strip() for line in block.splitlines() if line.startswith("print(") and "#" in line]


def test_python_blocks_are_found():
    blocks = python_blocks("```python\nx = 1\n```\ntext\n```bash\nls\n```\n```python\nprint(x)  # 1\n```\n")
    assert blocks == ["x = 1\n", "print(x)  # 1\n"]
    assert documented_output(blocks[1]) == ["1"]


def test_readme_has_snippets_that_print():
    blocks = python_blocks(README.read_text(encoding="utf-8"))
    assert blocks, "README.md: expected at least one ```python block"
    for index, block in enumerate(blocks):
        assert "print(" in block, f"README.md python block {index}: expected it to print what it computes"


def test_readme_snippets_run_and_print_their_documented_output():
    namespace: dict = {"__name__": "readme_snippets"}
    for index, block in enumerate(python_blocks(README.read_text(encoding="utf-8"))):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(block, f"README.md python block {index}", "exec"), namespace)
        printed = [line.strip() for line in out.getvalue().splitlines()]
        expected = documented_output(block)
        assert printed[: len(expected)] == expected, f"README.md python block {index}: printed {printed}"
