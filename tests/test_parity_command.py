"""``python -m vlmkern parity`` (table of every drop-in vs its original) and the ``bench`` subcommand."""
import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vlmkern import __main__ as cli
from vlmkern import parity

ROOT = Path(__file__).resolve().parents[1]


def test_every_row_passes_and_transformers_rows_run():
    rows = {r.component: r for r in parity.run_parity()}
    out = parity.format_table(list(rows.values()))
    assert set(rows) == {c for c, _, _ in parity.CASES}
    for comp, row in rows.items():
        assert comp in out
        assert row.status == "ok", (comp, row)  # transformers is installed and tests/ ports are importable here
    assert "FAIL" not in out


def test_failures_and_unavailable_originals_are_reported(monkeypatch):
    def broken():
        raise RuntimeError("boom")

    def missing():
        raise parity.Unavailable("no original here")

    def wrong():
        x = torch.ones(3)
        return x + 1, x, x
    monkeypatch.setattr(parity, "CASES", [("a", "A", broken), ("b", "B", missing), ("c", "C", wrong)])
    rows = parity.run_parity()
    assert [r.status for r in rows] == ["FAIL", "skip", "FAIL"]
    assert "boom" in rows[0].note and "no original" in rows[1].note
    table = parity.format_table(rows)
    assert "RuntimeError: boom" in table and table.count("FAIL") == 2
    assert parity.main() == 1


def test_cli_subprocess_only_filter():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-m", "vlmkern", "parity", "--only", "PLoRA"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "nn.PLoRA" in res.stdout and "Blip2" not in res.stdout


def test_every_row_runs_from_an_installed_package(tmp_path):
    """Outside the repository, with only the package on the path (what ``pip install`` gives): every row runs,
    none is skipped for a missing original, and the ports come from the package (``tests`` is not importable)."""
    site = tmp_path / "site"
    shutil.copytree(ROOT / "vlmkern", site / "vlmkern", ignore=shutil.ignore_patterns("__pycache__"))
    work = tmp_path / "work"
    work.mkdir()
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "PYTHONPATH": str(site)}
    where = subprocess.run([sys.executable, "-c", "import importlib.util, vlmkern; print(vlmkern.__file__); "
                            "print(importlib.util.find_spec('tests'))"], cwd=work, env=env, capture_output=True,
                           text=True, timeout=120)
    assert where.returncode == 0, where.stderr
    assert where.stdout.split() == [str(site / "vlmkern" / "__init__.py"), "None"]
    res = subprocess.run([sys.executable, "-m", "vlmkern", "parity"], cwd=work, env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    lines = {line.split()[0]: line for line in res.stdout.splitlines() if line.strip()}
    for component, _, _ in parity.CASES:
        assert component in lines, (component, res.stdout)
        assert lines[component].split()[-1] == "ok", lines[component]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    return names | {n.module or "." for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}


def test_originals_are_plain_pytorch_and_vlmkern_never_reaches_into_tests():
    """The ports are the oracle: nothing of what they check (ops, nn, models) in them, only what the originals
    themselves import (CogVLM's MLP takes its activation from transformers' ACT2FN); and no module of the package
    imports the repository's tests (by name or through a string)."""
    allowed = {"math", "types", "numpy", "torch", "torch.nn", "torch.nn.functional", "PIL",
               "torchvision.transforms", "transformers.activations"}
    ports = sorted((ROOT / "vlmkern" / "reference" / "originals").glob("*.py"))
    assert {p.stem for p in ports} >= {"qwen_vl", "internlm_xcomposer2", "cogvlm", "cogagent", "mini_gemini"}
    for path in ports:
        assert _imports(path) <= allowed, (path.name, _imports(path) - allowed)
    for path in (ROOT / "vlmkern").rglob("*.py"):
        strings = {n.value for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Constant)
                   and isinstance(n.value, str)}
        assert not any(m == "tests" or m.startswith("tests.") for m in _imports(path) | strings), path


def test_bench_without_checkout_explains(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "benchmarks", None)   # as if vlmkern were installed without the repository
    assert cli.main(["bench", "--list"]) == 2
    assert "repository" in capsys.readouterr().err


def test_bench_passes_arguments_on(monkeypatch):
    from benchmarks import run as bench_run
    seen = []
    monkeypatch.setattr(bench_run, "main", lambda argv: seen.append(argv) or 0)
    assert cli.main(["bench", "--op", "patch_embed", "--quick"]) == 0
    assert seen == [["--op", "patch_embed", "--quick"]]


def test_unknown_arguments_are_rejected():
    with pytest.raises(SystemExit):
        cli.main(["parity", "--bogus"])
