"""Every ```python block of the README and docs/ runs as written (examples users copy must work)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


def _blocks() -> list:
    out = []
    for doc in DOCS:
        for i, code in enumerate(BLOCK.findall(doc.read_text())):
            marks = [pytest.mark.slow] if "bc.train.fit" in code or "epochs" in code else []
            out.append(pytest.param(code, id=f"{doc.name}-{i}", marks=marks))
    return out


@pytest.mark.parametrize("code", _blocks())
def test_doc_example_runs(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write files (cm.export("out/net")) write here
    exec(compile(code, "<doc example>", "exec"), {"__name__": "__doc_example__"})  # noqa: S102 - our own docs
