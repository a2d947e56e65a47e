"""The README's Python snippets, run as pasted, so they cannot rot."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
# Every fenced ```python block, in order (bash blocks are commands, not checked here).
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(), re.S | re.M)


def test_the_readme_has_python_snippets():
    """The extraction finds them (a changed fence would otherwise check nothing)."""
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=lambda i: f"block{i + 1}")
def test_readme_snippet_runs_as_pasted(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where a snippet's files (model.onnx) land
    code = compile(BLOCKS[index], f"README.md python block {index + 1}", "exec")
    exec(code, {"__name__": "__readme__"})  # noqa: S102 - our own documentation
