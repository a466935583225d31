"""scripts/gpu_suite.sh and its parts, cheaply: limits, packing into <= 3 files (also when killed), the T1 plugin's
poisoning and run-twice checks, the T2 cases' construction, the T3 summary. The full dry run is CI's
(``bash scripts/gpu_suite.sh --dry-run``)."""
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "gpu_suite.sh"
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _gpu_suite_plugin as plugin  # noqa: E402

OUT_FILES = {"gpu_suite_summary.txt", "gpu_suite_results.jsonl", "gpu_suite.tar.gz"}


def _default(name: str) -> int:
    """A limit's GPU default: ``NAME=${VAR:-$(( N * SCALE ))}`` or ``NAME=N`` in the script."""
    text = SCRIPT.read_text()
    m = re.search(rf"^{name}=\$\{{\w+:-\$\(\( (\d+) \* SCALE \)\)\}}$", text, re.M) or \
        re.search(rf"^{name}=(\d+)", text, re.M)
    assert m, name
    return int(m.group(1))


def test_tier_limits_fit_six_minutes():
    t0, t1, t2, margin, budget = (_default(n) for n in ("T0_S", "T1_S", "T2_S", "PACK_MARGIN", "BUDGET"))
    assert (t0, t1, t2) == (30, 150, 120)
    assert budget <= 360 and t0 + t1 + t2 + margin < budget     # T3 gets the rest, > 0
    text = SCRIPT.read_text()
    assert "trap 'pack' EXIT" in text and "trap 'on_signal TERM' TERM" in text
    assert "--no-index" in text and "HF_HUB_OFFLINE=1" in text and "pip install -e" not in text
    assert text.index("qformer routed_linear structured_cross_attention patch_embed projector packing") > 0


def _fake_python(tmp_path: Path, sleep_on: str = "") -> Path:
    """A stand-in interpreter: prints its arguments, succeeds at once (or sleeps when its arguments match)."""
    fake = tmp_path / "fakepy"
    fake.write_text(f'#!/usr/bin/env bash\ncase "$*" in *"{sleep_on or "@@none@@"}"*) exec sleep 30 ;; esac\n'
                    'echo "fake $*"\n')
    fake.chmod(0o755)
    return fake


def _env(tmp_path: Path, fake: Path) -> dict:
    return {**os.environ, "PYTHON": str(fake), "OUT": str(tmp_path / "out"), "TMPDIR": str(tmp_path)}


def test_suite_packs_at_most_three_files(tmp_path):
    fake = _fake_python(tmp_path)
    res = subprocess.run(["bash", str(SCRIPT), "--dry-run"], env=_env(tmp_path, fake), capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert {p.name for p in (tmp_path / "out").iterdir()} == OUT_FILES
    summary = (tmp_path / "out" / "gpu_suite_summary.txt").read_text()
    for tier in ("T0", "T1", "T2", "T3"):
        assert re.search(rf"^{tier} ", summary, re.M), tier
    assert "all steps passed" in summary
    listing = subprocess.run(["tar", "tzf", str(tmp_path / "out" / "gpu_suite.tar.gz")], capture_output=True,
                             text=True).stdout
    assert "logs/T1_kernel_tests.log" in listing and "logs/T2_headline.log" in listing


def test_suite_killed_mid_tier_still_packs(tmp_path):
    fake = _fake_python(tmp_path, sleep_on="-m pytest")       # T1 hangs
    proc = subprocess.Popen(["bash", str(SCRIPT), "--dry-run"], env=_env(tmp_path, fake),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not (tmp_path / "out" / "gpu_suite.tar.gz").exists():
        time.sleep(0.2)                                         # T0 packed: T1 is running
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 143, out
    assert {p.name for p in (tmp_path / "out").iterdir()} == OUT_FILES
    assert "killed by SIGTERM" in (tmp_path / "out" / "gpu_suite_summary.txt").read_text()


# ---------------------------------------------------------------------------------------------- T1 plugin
class _TestTwice(plugin.TwiceMode):
    namespaces = ("vlmkern_gst",)


@torch.library.custom_op("vlmkern_gst::noisy", mutates_args=())
def _noisy(x: torch.Tensor) -> torch.Tensor:
    return x + torch.rand_like(x)


@torch.library.custom_op("vlmkern_gst::steady", mutates_args=())
def _steady(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@torch.library.custom_op("vlmkern_gst::unwritten", mutates_args=())
def _unwritten(x: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(x)
    out[1:] = x[1:]                                           # row 0 never written
    return out


def test_twice_mode_flags_races_and_new_nans():
    x = torch.randn(4, 3)
    for op, expect in ((_steady, []), (_noisy, ["differs bit for bit"])):
        mode = _TestTwice()
        with mode:
            op(x)
        assert [f for f in mode.failures() if not any(e in f for e in expect)] == []
        assert all(any(e in f for f in mode.failures()) for e in expect), mode.failures()
    plugin.install_poison()
    try:
        assert torch.empty(3).isnan().all() and torch.empty(2, dtype=torch.int32).shape == (2,)
        mode = _TestTwice()
        with mode:
            _unwritten(x)
        assert any("holds NaN though no input does" in f for f in mode.failures())
    finally:
        plugin.uninstall_poison()
    assert not hasattr(torch.empty, "__wrapped__")


def test_kernel_test_selection_and_table(tmp_path):
    (tmp_path / "conftest.py").write_text("import pytest\n@pytest.fixture\ndef device():\n    return 'cpu'\n")
    (tmp_path / "test_projector.py").write_text(
        "def test_kernel(device):\n    assert device == 'cpu'\n\ndef test_plain():\n    pass\n")
    (tmp_path / "test_other.py").write_text("def test_plain():\n    pass\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent)}
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "_gpu_suite_plugin",
                          "--gpu-suite", "--gpu-suite-table", str(tmp_path / "t.txt"), str(tmp_path)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 passed, 2 deselected" in res.stdout
    table = (tmp_path / "t.txt").read_text()
    assert re.search(r"^projector\s+1\s+0\s+0$", table, re.M) and re.search(r"^total\s+1\s+0\s+0$", table, re.M)
    assert plugin.family_of("tests/ops/test_partial_lora.py::test_x[a]") == "routed_linear"
    assert all((REPO / f).is_file() for f in plugin.op_test_files())


# ------------------------------------------------------------------------------------------- T0, T2, T3
def test_ceilings_measure_on_cpu():
    from benchmarks import ceilings
    res = ceilings.measure("cpu", copy_bytes=1 << 16, n=32, reps=2)
    assert res["copy_gbps"] > 0 and res["gemm_tflops"] > 0 and math.isfinite(res["gemm_tflops"])


def test_headline_specs_cover_every_family_on_both_devices():
    from benchmarks import headline
    for device, tiny in (("cuda", False), ("cpu", True)):
        specs = headline.specs(device, tiny)
        assert {s.family for s in specs} == set(headline.FAMILIES)
        for s in specs:
            assert s.case.setup is not None and s.case.flops > 0
            assert not set(s.baselines) & set(s.bounds)
    big = {s.case.name: s for s in headline.specs("cuda", False)}
    assert "bfloat16" in big["fwd+bwd B=16"].case.shape


def test_headline_runs_a_tiny_spec_and_summarizes(tmp_path):
    from benchmarks import headline
    spec = next(s for s in headline.specs("cpu", True) if s.family == "projector")
    records = headline.run_spec(spec, "cpu", 2, {})
    assert {r["impl"] for r in records} == {"vlmkern", "nn.Sequential"}
    assert all(r["status"] == "ok" and r["median_ms"] > 0 for r in records), records
    assert "best baseline nn.Sequential" in headline.headline(records, spec)
    rows = [{"op": "projector", "case": "c", "impl": "vlmkern", "subject": True, "status": "ok", "median_ms": 2.0},
            {"op": "projector", "case": "c", "impl": "eager", "subject": False, "status": "ok", "median_ms": 3.0,
             "speedup": 1.5, "target": 2.0, "target_met": False},
            {"op": "projector", "case": "c", "impl": "nn.Linear", "subject": False, "status": "ok", "median_ms": 1.0,
             "speedup": 0.5}]
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (line,) = headline.summarize_jsonl(path, "projector")
    assert "fastest alternative eager x1.50" in line and "MISSED eager x1.50<x2" in line


@pytest.mark.parametrize("cuda", [False, True])
def test_t1_selects_what_can_run_on_the_host(monkeypatch, cuda):
    """On a GPU host a test that forces Triton on CPU tensors (``backend`` without ``device``) cannot run (no
    interpreter there) and the ``cuda_ext`` tests wait for T3 (the extension is built in the background)."""
    from types import SimpleNamespace

    import _gpu_suite_plugin as plugin
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)

    def item(*fixtures, marks=()):
        return SimpleNamespace(fixturenames=fixtures, get_closest_marker=lambda m: m if m in marks else None)

    assert plugin.is_kernel_test(item("device"))
    assert plugin.is_kernel_test(item("backend", "device"))
    assert plugin.is_kernel_test(item("backend", marks=("cuda",)))
    assert plugin.is_kernel_test(item("backend")) is not cuda
    assert not plugin.is_kernel_test(item("backend", marks=("cuda", "cuda_ext")))
    assert not plugin.is_kernel_test(item())
