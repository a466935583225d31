"""The benchmark harness (statistics, ratios, records) and a smoke run of ``python -m benchmarks.run``."""
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks import harness
from benchmarks.harness import Case, TimerConfig

REPO = Path(__file__).resolve().parent.parent
ENV_FIELDS = ("timestamp", "device", "device_name", "cpu", "cpu_count", "python", "torch", "triton", "transformers",
              "vlmkern", "git_commit", "git_dirty", "VLMKERN_BACKEND")


def _sleeper(ms: float):
    def fn():
        time.sleep(ms / 1e3)
        return torch.full((4, 3), ms)
    return fn


def test_quantile_matches_numpy_linear_rule():
    xs = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert harness.quantile(xs, 0.5) == 3.0
    assert harness.quantile(xs, 0.2) == pytest.approx(1.8)
    assert harness.quantile(xs, 0.8) == pytest.approx(4.2)
    assert harness.quantile([7.0], 0.2) == 7.0
    with pytest.raises(ValueError):
        harness.quantile([], 0.5)


def test_time_fn_statistics_on_fake_callable():
    durations = iter([0.0] + [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0])  # first call is warmup

    def fn():
        time.sleep(next(durations) / 1e3)

    times, _ = harness.time_fn(fn, "cpu", TimerConfig(budget_s=0.0, min_reps=10, max_reps=10, warmup_s=0.0))
    s = harness.summarize(times)
    assert len(times) == 10
    assert s["p20_ms"] <= s["median_ms"] <= s["p80_ms"]
    assert 5.0 <= s["median_ms"] < 9.0          # sleep overshoots a little, never undershoots
    assert s["p80_ms"] - s["p20_ms"] >= 3.0


def test_speedups_and_throughput():
    sp = harness.speedups({"vlmkern": 2.0, "slow": 6.0, "fast": 1.0}, "vlmkern")
    assert sp == {"slow": 3.0, "fast": 0.5}
    tflops, gbps = harness.throughput(2e12, 4e9, 1000.0)
    assert tflops == pytest.approx(2.0) and gbps == pytest.approx(4.0)
    assert harness.throughput(1.0, 1.0, 0.0) == (None, None)


def _fake_case(**kw) -> Case:
    def boom():
        raise RuntimeError("broken baseline")

    return Case(name="fake 1", shape="4x3", flops=1e6, bytes=1e6, group="g",
                impls={"slow": _sleeper(6.0), "vlmkern": _sleeper(2.0), "broken": boom},
                targets={"slow": 2.0, "missing": 1.0}, skipped={"missing": "not installed"}, **kw)


def test_cpu_round_robin_interleaves_and_rotates():
    """CPU timing calls the implementations of a case in rounds, rotating the order, so that a drift in the
    machine's load falls on all of them alike; a failing first call leaves that one out."""
    order = []

    def make(name):
        def fn():
            order.append(name)
            return name
        return fn

    def broken():
        raise RuntimeError("no")

    cfg = TimerConfig(budget_s=0.0, min_reps=3, max_reps=3, warmup_s=0.0)
    times, firsts, errors = harness.time_round_robin({"a": make("a"), "b": make("b"), "x": broken}, cfg)
    assert firsts == {"a": "a", "b": "b"} and set(errors) == {"x"}
    assert {n: len(t) for n, t in times.items()} == {"a": 3, "b": 3}
    assert order == ["a", "b", "a", "b", "b", "a", "a", "b"]    # first calls, then rounds ab / ba / ab


def test_run_cases_ratios_targets_errors_and_skips():
    cfg = TimerConfig(budget_s=0.0, min_reps=5, max_reps=5, warmup_s=0.0)
    rows = {r.impl: r for r in harness.run_cases([_fake_case()], "cpu", cfg, show_progress=False)}
    assert set(rows) == {"vlmkern", "slow", "broken", "missing"}
    subj, slow = rows["vlmkern"], rows["slow"]
    assert subj.subject and subj.speedup == 1.0 and subj.reps == 5
    assert subj.p20_ms <= subj.median_ms <= subj.p80_ms
    assert slow.speedup == pytest.approx(slow.median_ms / subj.median_ms)
    assert 1.5 < slow.speedup < 4.5
    assert slow.target == 2.0 and slow.target_met is True
    assert slow.max_abs_diff == pytest.approx(4.0)      # outputs full(6) vs full(2)
    assert subj.peak_mem_mb is None                     # not measured on the CPU, by design
    assert subj.tflops == pytest.approx(1e6 / (subj.median_ms * 1e-3) / 1e12)
    assert rows["broken"].status == "error" and "broken baseline" in rows["broken"].note
    assert rows["missing"].status == "skipped" and rows["missing"].target == 1.0
    assert rows["missing"].target_met is None


def test_setup_fills_impls_and_is_released():
    def setup(case):
        case.impls["vlmkern"] = _sleeper(0.1)
        case.backends["vlmkern"] = "reference"

    case = Case(name="lazy", shape="-", flops=0, bytes=0, setup=setup)
    rows = harness.run_cases([case], "cpu", TimerConfig(0.0, 2, 2, 0.0), show_progress=False)
    assert [(r.impl, r.backend, r.status) for r in rows] == [("vlmkern", "reference", "ok")]
    assert rows[0].tflops is None and case.impls == {}


def test_write_results_json_csv_png(tmp_path):
    cfg = TimerConfig(budget_s=0.0, min_reps=3, max_reps=3, warmup_s=0.0)
    cases = [_fake_case()]
    rows = harness.run_cases(cases, "cpu", cfg, show_progress=False)
    env = harness.environment("cpu")
    paths = harness.write_results("fakeop", "cpu", rows, env, tmp_path, extra={"cases": harness.case_records(cases)})
    record = json.loads(paths["json"].read_text())
    assert paths["json"] == tmp_path / "fakeop-cpu.json"
    for key in ENV_FIELDS:
        assert key in record["env"], key
    assert record["env"]["torch"] == torch.__version__
    assert record["cases"][0]["targets"] == {"slow": 2.0, "missing": 1.0}
    assert {r["impl"] for r in record["results"]} == {"vlmkern", "slow", "broken", "missing"}
    with open(paths["csv"]) as f:
        table = list(csv.DictReader(f))
    assert len(table) == 4 and set(harness.CSV_FIELDS) <= set(table[0])
    assert all(r["device_name"] == env["device_name"] for r in table)
    pytest.importorskip("matplotlib")
    assert paths["png"] == tmp_path / "fakeop-cpu.png" and paths["png"].stat().st_size > 1000
    assert "vlmkern" in harness.format_table(rows)


def test_git_commit_from_environment_when_no_repo(monkeypatch, tmp_path):
    monkeypatch.setattr(harness, "REPO_ROOT", tmp_path)      # no .git there
    monkeypatch.setenv("VLMKERN_GIT_COMMIT", "abc123")
    monkeypatch.setenv("VLMKERN_GIT_DIRTY", "1")
    state = harness.git_state()
    if state["git_source"] == "git":                          # tmp_path sits inside some other repository
        pytest.skip("tmp dir is inside a git repository")
    assert state == {"git_commit": "abc123", "git_dirty": True, "git_source": "VLMKERN_GIT_COMMIT"}


def test_dirty_flag_counts_untracked_files(monkeypatch, tmp_path):
    """An untracked (not yet added) file is code the recorded commit does not hold: the results say dirty."""
    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True,
                       env={**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                            "GIT_COMMITTER_EMAIL": "t@t"})
    git("init", "-q")
    (tmp_path / "kernel.py").write_text("x = 1\n")
    git("add", "kernel.py")
    git("commit", "-q", "-m", "one")
    monkeypatch.setattr(harness, "REPO_ROOT", tmp_path)
    assert harness.git_state()["git_dirty"] is False
    (tmp_path / "new_kernel.py").write_text("y = 2\n")
    assert harness.git_state()["git_dirty"] is True


def test_discover_finds_patch_embed():
    from benchmarks import run
    assert "patch_embed" in run.discover()


def test_smoke_run_patch_embed_cpu(tmp_path, capsys):
    """``python -m benchmarks.run --op patch_embed --device cpu --quick --smoke --out DIR`` in-process."""
    from benchmarks import run
    interpret = os.environ.get("TRITON_INTERPRET")
    rc = run.main(["--op", "patch_embed", "--device", "cpu", "--quick", "--smoke", "--out", str(tmp_path),
                   "--no-progress"])
    assert os.environ.get("TRITON_INTERPRET") == interpret     # restored for the rest of the test session
    assert rc == 0
    out = capsys.readouterr().out
    assert "patch_embed" in out and "median ms" in out
    record = json.loads((tmp_path / "patch_embed-cpu.json").read_text())
    assert record["smoke"] is True and record["env"]["TRITON_INTERPRET"] == "0"
    rows = record["results"]
    subject = [r for r in rows if r["case"].startswith("e2e") and r["subject"]]
    assert subject and subject[0]["status"] == "ok" and subject[0]["backend"] == "reference"
    for r in rows:
        assert r["status"] in ("ok", "skipped"), r
        if r["status"] == "ok" and r["max_abs_diff"] is not None:
            assert r["max_abs_diff"] < 1e-3, r                 # every implementation computes the same tokens
    assert (tmp_path / "patch_embed-cpu.csv").exists()


def test_cli_entry_point_lists_ops():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-m", "benchmarks.run", "--list"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "patch_embed" in res.stdout.split()


def test_cases_use_real_fuyu_sizes():
    from benchmarks.ops import patch_embed as bench
    cpu = bench.cases("cpu", quick=False)
    names = [c.name for c in cpu]
    assert "e2e 1080x1920" in names and "patchify 1080x1920" in names
    assert "patchify 1080x1920" in [c.name for c in bench.cases("cpu", quick=True)]   # the CPU target's case
    patchify = next(c for c in cpu if c.name == "patchify 1080x1920")
    assert patchify.targets == {"hf processor": 5.0}
    assert "(1, 2304, 2700)" in patchify.shape
    gpu = bench.cases("cuda", quick=False)
    fused = next(c for c in gpu if c.name == "fused 1080x1920")
    assert fused.targets == {"gemm only": 0.8}
    assert fused.flops == pytest.approx(2 * 2304 * 4096 * 2700 + 2304 * 4096)
    e2e = next(c for c in gpu if c.name == "e2e 1080x1920")
    assert e2e.targets == {"hf processor+linear": 10.0}
    assert any(c.name == "e2e 8x1080x1920" for c in gpu)


def test_torch_unfold_linear_matches_reference():
    from benchmarks.ops.patch_embed import torch_unfold_linear
    from vlmkern import reference
    pix = torch.randint(0, 256, (2, 3, 61, 47), dtype=torch.uint8)
    w, b = torch.randn(16, 2700), torch.randn(16)
    torch.testing.assert_close(torch_unfold_linear(pix, w, b), reference.patch_embed(pix, w, b))


def test_hf_patches_match_reference():
    from benchmarks.ops import patch_embed as bench
    from vlmkern import reference
    proc, why = bench.hf_processor()
    if proc is None:
        pytest.skip(why)
    img = bench._images_hwc(1, 61, 47)
    got = bench.hf_patches(proc, list(img))
    want = reference.patchify(torch.from_numpy(img).permute(0, 3, 1, 2), 30)
    torch.testing.assert_close(got, want)


def test_max_abs_diff_accepts_lists_and_arrays():
    import numpy as np
    a = torch.zeros(2, 3)
    assert harness.max_abs_diff([np.ones(3), np.full(3, 2.0)], a) == 2.0
    assert harness.max_abs_diff(a, torch.zeros(5)) is None
    assert harness.max_abs_diff("x", a) is None


@pytest.mark.cuda
def test_cuda_timer_and_peak_memory():
    x = torch.randn(1024, 1024, device="cuda")
    case = Case(name="mm", shape="1024^3", flops=2 * 1024 ** 3, bytes=3 * 4 * 1024 ** 2,
                impls={"vlmkern": lambda: x @ x, "twice": lambda: (x @ x) @ x})
    rows = {r.impl: r for r in harness.run_cases([case], "cuda", TimerConfig.for_mode("cuda", quick=True),
                                                 show_progress=False)}
    subj, twice = rows["vlmkern"], rows["twice"]
    assert subj.status == twice.status == "ok"
    assert 0 < subj.p20_ms <= subj.median_ms <= subj.p80_ms and subj.reps >= 5
    assert subj.peak_mem_mb >= 4.0 - 1e-6            # at least the 4 MiB output
    assert 1.3 < twice.speedup < 3.0
    assert harness.environment("cuda")["device_name"] == torch.cuda.get_device_name()


@pytest.mark.cuda
def test_smoke_run_patch_embed_cuda(tmp_path):
    from benchmarks import run
    rc = run.main(["--op", "patch_embed", "--device", "cuda", "--smoke", "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    record = json.loads((tmp_path / "patch_embed-cuda.json").read_text())
    subject = [r for r in record["results"] if r["subject"] and r["case"].startswith("e2e")]
    assert subject[0]["status"] == "ok" and subject[0]["backend"] == "triton"
    assert subject[0]["peak_mem_mb"] is not None


def test_broken_setup_is_an_error_of_the_subject():
    def setup(case):
        raise RuntimeError("no inputs")

    rows = harness.run_cases([Case(name="bad", shape="-", flops=0, bytes=0, setup=setup)], "cpu",
                             TimerConfig(0.0, 1, 1, 0.0), show_progress=False)
    assert [(r.impl, r.subject, r.status) for r in rows] == [("vlmkern", True, "error")]
    assert "no inputs" in rows[0].note


@pytest.mark.parametrize("op", ["projector", "routed_linear", "packing", "structured_cross_attention", "qformer"])
def test_smoke_run_every_op_cpu(tmp_path, op):
    """Every benchmark module runs end to end on tiny shapes and its implementations agree."""
    from benchmarks import run
    rc = run.main(["--op", op, "--device", "cpu", "--smoke", "--no-plot", "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    rows = json.loads((tmp_path / f"{op}-cpu.json").read_text())["results"]
    assert rows and all(r["status"] in ("ok", "skipped") for r in rows), rows
    for r in rows:          # lower bounds compute something else
        if r["status"] == "ok" and r["max_abs_diff"] is not None and r["impl"] not in harness.LOWER_BOUNDS:
            assert r["max_abs_diff"] < 1e-3, r


def test_quick_run_writes_to_the_ignored_folder_and_jsonl(tmp_path, monkeypatch):
    """A quick/smoke run without --out leaves the tracked results alone (results/quick/, git-ignored); --jsonl
    gets one line per measurement as each case ends."""
    from benchmarks import run
    monkeypatch.setattr(harness, "RESULTS_DIR", tmp_path)
    rc = run.main(["--op", "projector", "--device", "cpu", "--smoke", "--no-plot", "--no-progress",
                   "--jsonl", str(tmp_path / "r.jsonl")])
    assert rc == 0
    assert (tmp_path / "quick" / "projector-cpu.json").exists() and not (tmp_path / "projector-cpu.json").exists()
    lines = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert {r["impl"] for r in lines} == {"vlmkern", "nn.Sequential"} and all(r["mode"] == "smoke" for r in lines)
    assert "benchmarks/results/quick/" in (REPO / ".gitignore").read_text()


def test_compiled_filter_and_table_alignment():
    def case():
        return Case(name="a much longer case name than the column", shape="-", flops=1.0, bytes=1.0,
                    impls={"vlmkern": _sleeper(0.1), "eager": _sleeper(0.1), "torch.compile eager": _sleeper(0.1)},
                    backends={"torch.compile eager": "inductor"})
    cfg = TimerConfig(0.0, 2, 2, 0.0)
    skip = {r.impl: r for r in harness.run_cases([case()], "cpu", cfg, show_progress=False, compiled="skip")}
    assert skip["torch.compile eager"].status == "skipped" and skip["eager"].status == "ok"
    only = harness.run_cases([case()], "cpu", cfg, show_progress=False, compiled="only")
    assert {r.impl for r in only} == {"vlmkern", "torch.compile eager"}
    lines = harness.format_table(list(skip.values())).splitlines()
    col = lines[0].index("impl")                     # every line's implementation starts under the header's
    assert all(ln[col - 2:col] == "  " and ln[col] != " " for ln in lines[2:]), lines


def test_resampler_is_measured_against_its_unavoidable_gemms():
    """Issue 15's Qwen-VL yardstick: the five projections alone, forward and backward into every weight; the
    GPU cases carry the <= 1.1x-of-the-GEMMs and >= 1.2x-the-original targets."""
    from benchmarks.ops import structured_cross_attention as sca
    for case in [c for c in sca.cases("cpu", smoke=True) if c.name.startswith("resampler")]:
        case.setup(case)
        assert {"vlmkern", "unavoidable GEMMs", "original"} <= set(case.impls)
        out = case.impls["unavoidable GEMMs"]()
        assert out.shape == case.impls["vlmkern"]().shape
        assert not case.targets                                     # CPU: no target
    gpu = [c for c in sca.cases("cuda") if c.name.startswith("resampler")]
    assert gpu and all(c.targets == {"unavoidable GEMMs": 1 / 1.1, "original": 1.2} for c in gpu)


@pytest.mark.parametrize("train", [False, True], ids=["fwd", "fwd+bwd"])
def test_whole_qformer_flops_are_what_autograd_runs(train):
    """The declared count equals torch's FlopCounterMode over transformers' Q-Former (eager attention, image tokens
    without gradient, as in the benchmark): the image K/V GEMMs get no input gradient (they were counted 3x)."""
    transformers = pytest.importorskip("transformers")
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks.ops import qformer as bq
    cfg = transformers.Blip2QFormerConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=2,
                                          intermediate_size=128, encoder_hidden_size=48, use_qformer_text_input=True,
                                          cross_attention_frequency=2)
    cfg._attn_implementation = "eager"
    model = transformers.Blip2QFormerModel(cfg)
    rows, t, lk = 3, 5, 17
    x = torch.randn(rows, bq.NQ + t, 64, requires_grad=train)
    with FlopCounterMode(display=False) as counter:
        out = model(query_embeds=x, query_length=bq.NQ, encoder_hidden_states=torch.randn(rows, lk, 48))
        if train:
            out.last_hidden_state.sum().backward()
    assert bq._qformer_counts(cfg, rows, rows, t, lk, train, 4)[0] == counter.get_total_flops()


def test_cogagent_and_mining_bytes_count_each_weight_once():
    """Minimal bytes of one forward: inputs, output and every weight matrix once (CogAgent counted its
    hidden x Cc weights twice, the mining case one C_aux x C weight too many)."""
    from types import SimpleNamespace

    from benchmarks.ops import structured_cross_attention as sca
    from vlmkern.models.cogagent import CrossAttention
    from vlmkern.models.mini_gemini import PatchInfoMining
    B, Lq, Lk, hidden, H, d = 2, 5, 7, 48, 2, 16
    case = sca._cogagent_case("cpu", torch.float32, False, B, Lq, Lk, hidden, H, d)
    cfg = SimpleNamespace(hidden_size=hidden, cross_hidden_size=H * d, cross_compute_hidden_size=H * d,
                          num_attention_heads=H)
    weights = sum(p.numel() for p in CrossAttention(cfg).parameters())
    assert case.bytes == 4 * (2 * B * Lq * hidden + B * Lk * H * d + weights)
    B, pn, M, C, C_aux = 2, 3, 2, 16, 8
    case = sca._mining_case("cpu", torch.float32, False, B, pn, M, C, C_aux)
    linears = sum(m.weight.numel() for m in PatchInfoMining(C, C_aux).modules() if isinstance(m, torch.nn.Linear))
    assert case.bytes == 4 * (2 * B * pn * pn * C + B * C_aux * (pn * M) ** 2 + linears)
