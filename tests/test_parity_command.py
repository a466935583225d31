"""``python -m vlmkern parity`` (table of every drop-in vs its original) and the ``bench`` subcommand."""
import os
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
