"""Every ```python block of README.md and docs/*.md runs as written, on the CPU, each in a fresh namespace.

A block right after ``<!-- docs-test: skip: REASON -->`` is not run; the page says why (a GPU, a download).
"""
from __future__ import annotations

import logging
import pathlib
import re

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"(?:<!--\s*docs-test:\s*skip:(?P<why>[^>]*)-->\s*\n)?^```python\n(?P<code>.*?)^```", re.S | re.M)


def _blocks():
    for page in PAGES:
        text = page.read_text()
        for m in BLOCK.finditer(text):
            line = text.count("\n", 0, m.start("code")) + 1
            name = f"{page.relative_to(ROOT)}:{line}"
            why = (m["why"] or "").strip()
            marks = [pytest.mark.skip(reason=f"{name}: {why}")] if m["why"] is not None else []
            yield pytest.param(name, line, m["code"], why, marks=marks, id=name)


@pytest.fixture
def restore_logging():
    """Snippets may configure logging (basicConfig, the vlmkern level): undo it for the tests that follow."""
    root, vlm = logging.getLogger(), logging.getLogger("vlmkern")
    saved = (list(root.handlers), root.level, vlm.level)
    yield
    root.handlers[:], root.level = saved[0], saved[1]
    vlm.setLevel(saved[2])


@pytest.mark.parametrize("name, line, code, why", list(_blocks()))
def test_snippet_runs(name, line, code, why, monkeypatch, restore_logging):
    monkeypatch.delenv("VLMKERN_BACKEND", raising=False)
    torch.manual_seed(0)
    # padded so that a traceback's line number is the page's
    exec(compile("\n" * (line - 1) + code, str(ROOT / name.split(":")[0]), "exec"), {"__name__": "__docs__"})


def test_every_skip_gives_a_reason_and_pages_have_snippets():
    blocks = list(_blocks())
    assert all(p.values[3] for p in blocks if p.marks), "a docs-test skip marker needs a reason"
    assert len([p for p in blocks if not p.marks]) >= 10
