"""The static performance report: PTX loop reading, occupancy, hot-build checks, roofline floors.

Default tests read synthetic PTX and fabricated build results; the one real compile (a shipped routed TN
build for sm_90, ~1 min on a shared 2-core machine) is marked slow.
"""
import pytest

from vlmkern.tools import _asm, perf_report
from vlmkern.tools import gpu_build_check as gbc

PIPELINED = """
.visible .entry k(
$L__BB0_1:
	cp.async.cg.shared.global [ %r1 + 0 ], [ %rd1 + 0 ], 0x10, %r2;
	@%p3 cp.async.cg.shared.global [ %r4 + 0 ], [ %rd5 + 0 ], 0x10, %r6;
	cp.async.commit_group;
	cp.async.wait_group 1;
	@%p1 ld.global.b8 { %rs1 }, [ %rd9 + 0 ];
	wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%f1}, %rd2, %rd3, p, 1, 1, 0, 1;
	wgmma.wait_group.sync.aligned 1;
	@%p2 bra $L__BB0_1;
$L__BB0_2:
	ld.global.v4.b32 { %r8 }, [ %rd7 + 0 ];
	ret;
}
"""

SYNCHRONOUS = """
$L__BB0_1:
	ld.global.b32 { %r1 }, [ %rd1 + 0 ];
	@%p1 bra $L__BB0_3;
	ld.global.v4.b32 { %r2, %r3, %r4, %r5 }, [ %rd2 + 0 ];
	mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f1}, {%r2}, {%r3}, {%f1};
$L__BB0_3:
	@%p2 bra.uni $L__BB0_1;
"""


def test_pipelined_loop_is_async_and_on_wgmma():
    a = _asm.analyse_ptx(PIPELINED)
    assert a["loops"] == 1 and a["dot_loops"] == 1
    assert a["async_loads"] and a["wgmma"]
    assert a["main_loop"] == dict(async_loads=2, sync_loads=1, async_bytes=32, sync_bytes=1, wgmma=1, mma=0,
                                  wgmma_wait=1)


def test_synchronous_loop_with_mma_sync_fails_both():
    a = _asm.analyse_ptx(SYNCHRONOUS)
    assert a["main_loop"]["sync_loads"] == 2 and a["main_loop"]["async_loads"] == 0
    assert not a["async_loads"] and not a["wgmma"]
    none = _asm.analyse_ptx("ld.global.b32 { %r1 }, [ %rd1 + 0 ];\nret;")
    assert none["main_loop"] is None and not none["async_loads"]


def test_a_scalar_gather_beside_a_small_cp_async_is_not_asynchronous():
    # the old patch embedding: 4-byte cp.async of the scale vector, the pixel tile gathered byte by byte
    gather = PIPELINED.replace("0x10, %r2;", "0x4, %r2;").replace(
        "\tcp.async.commit_group;", "\n".join(["\t@%p1 ld.global.b16 { %rs2 }, [ %rd9 + 0 ];"] * 8))
    gather = gather.replace("\t@%p3 cp.async.cg.shared.global [ %r4 + 0 ], [ %rd5 + 0 ], 0x10, %r6;\n", "")
    a = _asm.analyse_ptx(gather)
    assert a["main_loop"]["async_bytes"] == 4 and a["main_loop"]["sync_bytes"] == 17
    assert not a["async_loads"] and a["wgmma"]


def test_ctas_per_sm_limits():
    # 128 registers x 8 warps: 32 KB of registers per block -> 2; 96 KB of shared memory (+1 KB) -> 2
    assert _asm.ctas_per_sm(90, 128, 98304, 8) == 2
    assert _asm.ctas_per_sm(90, 232, 32768, 8) == 1            # registers bound
    assert _asm.ctas_per_sm(90, 32, 0, 4) == 16                # threads bound (2048 / 128)
    assert _asm.ctas_per_sm(90, 16, 0, 1) == 32                # block-count bound
    assert _asm.ctas_per_sm(80, 64, 100000, 4) == 1            # sm_80's 164 KB
    assert _asm.ctas_per_sm(90, None, 0, 4) is None


@pytest.mark.parametrize("label, expected", [
    ("routed_tn[bf16,expert dW]", True), ("lora_up[fp16,fwd,bias=True]", True),
    ("patch_embed_patchify[u8->bf16]", True), ("patch_embed_patchify[u8->fp32]", False),
    ("routed_tn[fp32,lora,keep=True]", False), ("gather_linear_fwd[fp16,i32,gelu=True]", True)])
def test_sixteen_bit_labels(label, expected):
    assert perf_report._sixteen_bit(label) is expected


def _result(label, arch, analysis, **kw):
    base = dict(kind="triton", config="M64 w8 s2", arch=arch, registers=128, spill_stores=0, spill_loads=0,
                shared=65536, analysis=analysis)
    return gbc.BuildResult(label, **{**base, **kw})


def test_check_flags_hot_sm90_builds_that_lost_async_loads_or_wgmma(monkeypatch):
    monkeypatch.setitem(perf_report.KNOWN_GAPS, "masked_attention_dq", "a known gap, reported not failed")
    good = dict(_asm.analyse_ptx(PIPELINED), sass=None)
    bad = dict(_asm.analyse_ptx(SYNCHRONOUS), sass=None)
    report = gbc.Report([_result("routed_tn[bf16,expert dW]", 90, good),
                         _result("routed_tn[bf16,lora,keep=False]", 90, bad),
                         _result("routed_tn[bf16,lora,keep=False]", 80, bad),      # sm_80: not checked
                         _result("routed_tn[fp32,expert dW]", 90, bad),            # fp32: not checked
                         _result("window_attention_fwd[bf16,M8]", 90, dict(bad, wgmma=False, async_loads=True)),
                         _result("lora_up[bf16,fwd,bias=True]", 90, good, spill_stores=8),
                         _result("masked_attention_dq[bf16,d64]", 90, bad),            # a known gap
                         _result("patch_embed_patchify[u8->bf16]", 90, bad)])          # memory bound: not hot
    rows = perf_report.make_rows(report, {})
    status = {(r.label, r.arch): r for r in rows}
    assert status[("routed_tn[bf16,expert dW]", 90)].ok
    bad_row = status[("routed_tn[bf16,lora,keep=False]", 90)]
    assert bad_row.problems == ["main loop loads not asynchronous", "dots not on wgmma"]
    assert status[("routed_tn[bf16,lora,keep=False]", 80)].ok and status[("routed_tn[fp32,expert dW]", 90)].ok
    assert status[("window_attention_fwd[bf16,M8]", 90)].ok     # no dots: async loads suffice
    assert not status[("lora_up[bf16,fwd,bias=True]", 90)].ok   # build-check failures count too
    gap = status[("masked_attention_dq[bf16,d64]", 90)]
    assert gap.ok and gap.gap == perf_report.KNOWN_GAPS["masked_attention_dq"] and gap.problems
    patchify = status[("patch_embed_patchify[u8->bf16]", 90)]
    assert patchify.ok and not patchify.hot and not patchify.problems
    table = perf_report.format_rows(rows)
    assert "FAIL: main loop loads not asynchronous" in table and "GAP: main loop" in table
    assert table.count("\n") == len(rows) + 1


def test_roofline_floors():
    flops = 2.0 * 8192 * 4096 * 4096
    t, bound = perf_report.floor_us(flops, 1e6)
    assert bound == "compute" and t == pytest.approx(flops / 790e12 * 1e6)
    t, bound = perf_report.floor_us(1.0, 4.3e6)
    assert bound == "memory" and t == pytest.approx(1.0)
    loads = perf_report.workloads()
    assert set(loads) == set(perf_report.HOT) | set(perf_report.FLOORED)
    assert all(loads[fam] for fam in loads), "every family with a floor has a benchmark shape"
    dw = [w for w in loads["routed_tn"] if w[0].startswith("T=8192 4096->4096 expert dW")]
    assert dw and dw[0][1] == flops


def test_patch_embed_forward_floors_patchify_then_gemm():
    (_, f_pre, b_pre), (_, f_gemm, b_gemm) = perf_report.workloads()["patch_embed_patchify"]
    patches, K, N = 2304, 2700, 4096
    assert f_pre == 0 and b_pre == 1080 * 1920 * 3 + patches * K * 2          # u8 in, bf16 patches out once
    assert f_gemm == 2.0 * patches * N * K
    pre, gemm = perf_report.floor_us(f_pre, b_pre), perf_report.floor_us(f_gemm, b_gemm)
    assert pre[1] == "memory" and gemm[1] == "compute"
    total = perf_report.total_floor_us(perf_report.workloads()["patch_embed_patchify"])
    assert total == pytest.approx(pre[0] + gemm[0])
    table = perf_report.format_roofline({"patch_embed_patchify"})
    assert "= patch_embed forward total" in table and f"{total:9.1f}" in table and "cuBLAS GEMM" in table


def test_cli_check_fails_when_nothing_matches(capsys):
    assert perf_report.main(["--filter", "no-kernel-has-this-label", "--check", "--no-cache"]) == 1


@pytest.mark.slow
def test_routed_tn_sm90_main_loop_is_async_on_wgmma():
    builds, _ = gbc.discover_builds()
    [b] = [b for b in builds if b.label == "routed_tn[bf16,expert dW]"]
    report = gbc.check(archs=(90,), builds=[b], cuda_sources=[], jobs=1)
    [row] = perf_report.make_rows(report, {b.label: b.num_warps})
    assert row.ok, row.problems
    assert row.async_loads and row.wgmma and row.spills == 0 and row.ctas_per_sm >= 1


def test_attention_floor_is_the_benchmarks_cuda_case():
    """The roofline row sits beside a measured row of the same case: Q-Former cross-attention at the CUDA
    benchmark's batch, heads, queries, keys and head dim, with the benchmark's FLOP count."""
    qformer = pytest.importorskip("benchmarks.ops.qformer")
    (shape, flops, _), = perf_report.workloads()["masked_attention_fwd"]
    cross = [c for c in qformer.cases("cuda") if c.name.startswith("Lk=257 ")]
    batch = int(cross[0].name.split("B=")[1])
    assert f"B={batch}" in shape
    import torch
    assert flops == qformer._attention_counts(batch, qformer.NQ, 257, torch.bfloat16, False)[0]
