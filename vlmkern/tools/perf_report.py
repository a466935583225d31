"""Static performance report of every shipped Triton config: occupancy, pipelining, tensor-core path, roofline.

    python -m vlmkern.tools.perf_report [--arch 90 [80]] [--filter SUBSTRING] [--json PATH] [--check]
                                        [--jobs N] [--no-cache] [--asm-dir DIR]

Compiles like ``gpu_build_check`` (same worker processes with ``TRITON_INTERPRET=0``, same statistics cache,
so after a build check this costs only the table) and reads each build's PTX/SASS (``vlmkern.tools._asm``):

* regs, spills, shared memory and resident CTAs per SM (registers, shared memory, threads, 32 blocks);
* whether the *main loop* (the loop with the most dots) loads asynchronously (``cp.async`` / TMA, LDGSTS /
  UTMALDG in SASS) and whether every dot loop runs on ``wgmma`` (sm_90 warpgroup MMA, HGMMA in SASS);
  ``wait`` is the smallest ``wgmma.wait_group`` depth in the main loop (0: each MMA is waited for at once);
* a roofline floor per kernel family for the benchmark shapes: ``max(FLOPs / 790 TFLOP/s, bytes / 4.3 TB/s)``
  with minimal bytes (each operand read once, each result written once), the H200's measured bf16 dense
  and HBM ceilings. These are floors, not predictions of the measured time. Memory-bound steps of a hot path
  (``FLOORED``, e.g. the patch embedding's patchify before its cuBLAS GEMM) get floors too, and an op made of
  consecutive steps (``STEPS``) a total: the sum of its steps' floors.

``--check`` exits 1 when a hot family (``HOT`` below) has a 16-bit sm_90 build whose main loop lost its
asynchronous loads or (for dot kernels) its wgmma, besides every build-check failure (compile errors,
spills, shared memory). All of this is offline reading of compiler output; no GPU is involved.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from vlmkern.tools import _asm
from vlmkern.tools import gpu_build_check as gbc

PEAK_FLOPS = 790e12     # H200 bf16 dense, as measured on such a card
PEAK_BYTES = 4.3e12     # H200 HBM3e, as measured


# Hot kernel families: the main loop must stay asynchronous (and on wgmma where it runs dots) for 16-bit
# dtypes on sm_90. A family maps to (needs wgmma, why hot).
HOT = {
    "lora_up": (True, "Partial LoRA forward / dX GEMM"),
    "lora_down": (True, "Partial LoRA rank-r GEMM"),
    "expert_gemm": (True, "visual-expert forward / dX GEMM"),
    "routed_tn": (True, "adapter dA/dB and expert dW reductions"),
    "linear_gelu_fwd": (True, "projector first GEMM"),
    "gather_linear_fwd": (True, "packing projector GEMM"),
    "masked_attention_fwd": (True, "Q-Former attention forward"),
    "masked_attention_dq": (True, "attention backward dQ"),
    "masked_attention_dkdv": (True, "attention backward dK/dV"),
    "patch_embed_bwd_weight": (True, "Fuyu patch embedding dW"),
    "window_attention_fwd": (False, "Mini-Gemini window attention (no dots)"),
    "window_attention_bwd": (False, "window attention backward (no dots)"),
}


# Hot families whose sm_90 main loop is known not to meet the bar yet, with the reason: shown as GAP in the
# table and listed at the end, not failed by --check (a regression elsewhere still fails). Remove an entry
# once the family passes (the report then says so).
KNOWN_GAPS: dict[str, str] = {}

# Families with a roofline floor that are not hot: memory-bound kernels without a main loop to pipeline (like
# gelu_bwd, they are not checked for async loads), whose floor belongs to a hot path.
FLOORED = {
    "patch_embed_patchify": "Fuyu patch embedding forward, first step (then a cuBLAS GEMM)",
}

# Families whose roofline rows are consecutive steps of one op: the report adds their total (the sum of the
# steps' floors; the steps do not overlap).
STEPS = {
    "patch_embed_patchify": "patch_embed forward total",
}


def family(label: str) -> str:
    return label.split("[")[0]


def _sixteen_bit(label: str) -> bool:
    """The build computes in fp16/bf16: the dtype after ``->`` (``patch_embed_bwd_weight[u8->bf16]``), else the first
    dtype in the label's brackets (``lora_up[bf16,fwd,...]``)."""
    inside = label[label.find("[") + 1:]
    dtypes = re.findall(r"fp16|bf16|fp32|u8|i32", inside.split("->", 1)[-1])
    return bool(dtypes) and dtypes[0] in ("fp16", "bf16")


# ----------------------------------------------------------------------------------------- roofline

def _gemm(m: float, n: float, k: float, read: float, write: float) -> tuple[float, float]:
    return 2.0 * m * n * k, 2.0 * (read + write)


def workloads() -> dict[str, list[tuple[str, float, float]]]:
    """Benchmark shapes per family as ``(shape, FLOPs, minimal bytes)``; bf16 (2 bytes), 8192 tokens with
    50 % image rows, r = 256, 4096 -> {4096, 6144, 14336} for the routed GEMMs (IXC2 PLoRA, CogVLM experts); Fuyu
    1080x1920 uint8 -> 2304 x 2700 patches (patchify writes them once in bf16, then a cuBLAS GEMM) -> 4096;
    Q-Former cross-attention B=256, 12 heads, 32 queries x 257 keys, d=64; LLaVA projector B=16 x 576 tokens
    1024 -> 4096; Mini-Gemini B=8 images of 576 tokens, 8x8 windows, 2880 channels: the CUDA cases of
    ``benchmarks/ops`` (qformer, projector, structured_cross_attention), so that a floor stands beside a
    measured row of the same case. Window attention counts 6 element-wise FLOP per HR value forward (LayerNorm
    statistics, score, weighted sum) and 12 backward, as the benchmark does."""
    T, D, R = 8192, 4096, 256
    img = T // 2
    out: dict[str, list[tuple[str, float, float]]] = {k: [] for k in (*HOT, *FLOORED)}
    for n in (4096, 6144, 14336):
        s = f"T={T} {D}->{n}"
        out["lora_up"].append((s, *map(sum, zip(_gemm(T, n, D, T * D + n * D, T * n), _gemm(img, n, R, img * R + n * R, 0)))))
        out["expert_gemm"].append((s + " E=2", *_gemm(T, n, D, T * D + 2 * n * D, T * n)))
        out["routed_tn"].append((s + " expert dW E=2", *_gemm(T, n, D, T * n + T * D, 2 * n * D)))
        out["routed_tn"].append((s + " dB (n x r)", *_gemm(img, n, R, img * n + img * R, n * R)))
    out["lora_down"].append((f"T={T} {D}->r={R}", *_gemm(img, R, D, img * D + R * D, T * R)))
    out["routed_tn"].append((f"T={T} dA (r x {D})", *_gemm(img, R, D, img * R + img * D, R * D)))
    patches, K, N = 36 * 64, 30 * 30 * 3, 4096
    pixels = 1080 * 1920 * 3
    out["patch_embed_patchify"].append(("1080x1920 u8 -> 2304x2700 bf16", 0.0, pixels + 2.0 * patches * K))
    out["patch_embed_patchify"].append(("cuBLAS GEMM 2304x2700 -> 4096 +bias",
                                        *_gemm(patches, N, K, N * K + patches * K + N, patches * N)))
    f, b = _gemm(N, K, patches, patches * N + N * K, 0)
    out["patch_embed_bwd_weight"].append(("dW 4096x2700 over 2304 patches", f, b + pixels))
    B, H, Lq, Lk, d = 256, 12, 32, 257, 64
    qkvo = 2.0 * B * H * d * (2 * Lq + 2 * Lk)
    out["masked_attention_fwd"].append(("Q-Former cross B=256", 4.0 * B * H * Lq * Lk * d, qkvo))
    out["masked_attention_dq"].append(("Q-Former cross B=256", 6.0 * B * H * Lq * Lk * d,
                                       qkvo + 2.0 * B * H * Lq * d))
    out["masked_attention_dkdv"].append(("Q-Former cross B=256", 8.0 * B * H * Lq * Lk * d,
                                         qkvo + 4.0 * B * H * Lk * d))
    m = 16 * 576
    out["linear_gelu_fwd"].append(("B=16x576 1024->4096", *_gemm(m, 4096, 1024, m * 1024 + 4096 * 1024, m * 4096)))
    out["gather_linear_fwd"].append(("B=16x576 1024->4096", *_gemm(m, 4096, 1024, m * 1024 + 4096 * 1024, m * 4096)))
    B, C, hw, n_tok = 8, 2880, 192 * 192, 576
    out["window_attention_fwd"].append(("B=8 x 576 tok, M=8, C=2880", 6.0 * B * C * hw,
                                        B * (2.0 * C * hw + 4.0 * 2 * C * n_tok)))
    out["window_attention_bwd"].append(("B=8 x 576 tok, M=8, C=2880", 12.0 * B * C * hw,
                                        B * (4.0 * C * hw + 4.0 * 3 * C * n_tok)))
    return out


def floor_us(flops: float, nbytes: float) -> tuple[float, str]:
    t_c, t_m = flops / PEAK_FLOPS, nbytes / PEAK_BYTES
    return max(t_c, t_m) * 1e6, "compute" if t_c >= t_m else "memory"


# ------------------------------------------------------------------------------------------- rows

@dataclass
class Row:
    label: str
    config: str
    arch: int
    registers: int | None
    spills: int | None
    shared: int | None
    ctas_per_sm: int | None
    async_loads: bool | None
    wgmma: bool | None
    wgmma_wait: int | None
    main_loop: dict | None
    sass: dict | None
    hot: bool
    build_ok: bool
    problems: list[str]
    gap: str | None = None    # a known gap (KNOWN_GAPS) explains the problems: reported, not failed

    @property
    def ok(self) -> bool:
        return self.build_ok and (not self.problems or self.gap is not None)


def make_rows(report: gbc.Report, warps: dict[str, int]) -> list[Row]:
    rows = []
    for r in report.results:
        a = r.analysis or {}
        fam = family(r.label)
        hot = fam in HOT and r.kind == "triton" and _sixteen_bit(r.label) and not r.label.endswith(gbc.UNALIGNED)
        main = a.get("main_loop")
        problems = []
        if hot and r.arch >= 90 and r.error is None:
            if not a.get("async_loads"):
                problems.append("main loop loads not asynchronous")
            if HOT[fam][0] and not a.get("wgmma"):
                problems.append("dots not on wgmma")
        gap = KNOWN_GAPS.get(fam) if problems and r.ok else None
        rows.append(Row(r.label, r.config, r.arch, r.registers, None if r.spill_stores is None else r.spills,
                        r.shared, _asm.ctas_per_sm(r.arch, r.registers, r.shared, warps.get(r.label, 4)),
                        a.get("async_loads") if a else None, a.get("wgmma") if a else None,
                        (main or {}).get("wgmma_wait"), main, a.get("sass"), hot, r.ok,
                        problems + ([] if r.ok else [r.status]), gap))
    return rows


def _status(r: Row) -> str:
    why = "; ".join(p.removeprefix("FAIL ") for p in r.problems)
    if r.gap is not None and r.ok:
        return "GAP: " + why
    return "ok" if r.ok else "FAIL: " + why


def _yn(v: bool | None) -> str:
    return "-" if v is None else ("yes" if v else "NO")


def format_rows(rows: Sequence[Row]) -> str:
    head = ("kernel", "config", "arch", "regs", "spill", "smem", "CTA/SM", "async", "wgmma", "wait", "ld B a/s",
            "SASS LDGSTS/HGMMA", "hot", "status")
    cells = []
    for r in rows:
        ml, sass = r.main_loop or {}, r.sass or {}
        cells.append((r.label, r.config, f"sm_{r.arch}", *(("-" if v is None else str(v))
                                                          for v in (r.registers, r.spills, r.shared, r.ctas_per_sm)),
                      _yn(r.async_loads), _yn(r.wgmma), "-" if r.wgmma_wait is None else str(r.wgmma_wait),
                      f"{ml.get('async_bytes', '-')}/{ml.get('sync_bytes', '-')}",
                      f"{sass.get('LDGSTS', '-')}/{sass.get('HGMMA', '-')}" if sass else "-",
                      "hot" if r.hot else "", _status(r)))
    widths = [max(len(x) for x in col) for col in zip(head, *cells)]
    fmt = lambda cs: "  ".join(c.ljust(w) for c, w in zip(cs, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *map(fmt, cells)])


def total_floor_us(items: Sequence[tuple[str, float, float]]) -> float:
    """The floor of consecutive steps: the sum of their floors."""
    return sum(floor_us(flops, nbytes)[0] for _, flops, nbytes in items)


def format_roofline(families: set[str]) -> str:
    lines = [f"{'family':24s} {'benchmark shape':36s} {'GFLOP':>9s} {'MB':>9s} {'floor us':>9s}  bound"]
    for fam, items in workloads().items():
        if fam not in families:
            continue
        for shape, flops, nbytes in items:
            t, bound = floor_us(flops, nbytes)
            lines.append(f"{fam:24s} {shape:36s} {flops / 1e9:9.1f} {nbytes / 1e6:9.1f} {t:9.1f}  {bound}")
        if fam in STEPS:
            flops, nbytes = sum(i[1] for i in items), sum(i[2] for i in items)
            lines.append(f"{fam:24s} {'= ' + STEPS[fam]:36s} {flops / 1e9:9.1f} {nbytes / 1e6:9.1f} "
                         f"{total_floor_us(items):9.1f}  sum of steps")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vlmkern.tools.perf_report", description=__doc__.split("\n")[0])
    p.add_argument("--arch", type=int, nargs="+", default=[90], choices=sorted(_asm.SM_LIMITS))
    p.add_argument("--filter", default=None, help="only kernel labels containing SUBSTRING")
    p.add_argument("--hot-only", action="store_true", help="only the 16-bit builds of the hot families")
    p.add_argument("--jobs", type=int, default=None, help="parallel compile processes (default: min(2, cpus))")
    p.add_argument("--json", default=None, metavar="PATH", help="also write rows and roofline floors as JSON")
    p.add_argument("--check", action="store_true",
                   help="exit 1 when a hot sm_90 16-bit build loses async main-loop loads or wgmma, or fails to build")
    p.add_argument("--no-cache", action="store_true", help="recompile instead of reusing gpu_build_check's cache")
    p.add_argument("--asm-dir", default=None, help="write each compiled kernel's PTX here (implies --no-cache)")
    args = p.parse_args(argv)

    builds, errors = gbc.discover_builds()
    if args.filter:
        builds = [b for b in builds if args.filter in b.label]
    if args.hot_only:
        builds = [b for b in builds if family(b.label) in HOT and _sixteen_bit(b.label)]
    report = gbc.check(archs=args.arch, builds=builds, cuda_sources=[], jobs=args.jobs,
                       cache_dir=None if (args.no_cache or args.asm_dir) else gbc.default_cache_dir(),
                       asm_dir=args.asm_dir)
    rows = make_rows(report, {b.label: b.num_warps for b in builds})
    print(format_rows(rows))
    fams = {family(r.label) for r in rows}
    print("\nRoofline floors (H200: %.0f TFLOP/s bf16, %.1f TB/s HBM; minimal bytes):" % (PEAK_FLOPS / 1e12,
                                                                                        PEAK_BYTES / 1e12))
    print(format_roofline(fams))
    for err in errors:
        print("import error:", err)
    gaps = sorted({family(r.label) for r in rows if r.gap})
    for fam in gaps:
        print(f"known gap {fam}: {KNOWN_GAPS[fam]}")
    closed = sorted(f for f in KNOWN_GAPS if f in fams and not any(r.gap for r in rows if family(r.label) == f)
                    and any(r.hot and r.arch >= 90 for r in rows if family(r.label) == f))
    for fam in closed:
        print(f"note: {fam} now passes: remove it from perf_report.KNOWN_GAPS")
    bad = [r for r in rows if not r.ok]
    hot = [r for r in rows if r.hot and r.arch >= 90]
    print(f"\n{len(rows)} builds, {len(bad)} failing; hot sm_90 16-bit builds: {len(hot)}, "
          f"{sum(bool(r.async_loads) for r in hot)} with async main-loop loads, "
          f"{sum(bool(r.wgmma) for r in hot if HOT[family(r.label)][0])} of "
          f"{sum(HOT[family(r.label)][0] for r in hot)} dot builds on wgmma ({report.seconds:.1f} s)")
    if args.json:
        floors = {fam: [dict(shape=s, flops=f, bytes=b, floor_us=floor_us(f, b)[0], bound=floor_us(f, b)[1])
                        for s, f, b in items] for fam, items in workloads().items() if fam in fams}
        totals = {STEPS[fam]: total_floor_us(items) for fam, items in workloads().items()
                  if fam in fams and fam in STEPS}
        Path(args.json).write_text(json.dumps(dict(
            rows=[dict(asdict(r), ok=r.ok) for r in rows], roofline=floors, roofline_totals_us=totals,
            peaks=dict(flops=PEAK_FLOPS, bytes_per_s=PEAK_BYTES)), indent=1))
    if args.check and (bad or errors or not rows):
        for r in bad:
            print(f"FAIL {r.label} sm_{r.arch}: {'; '.join(r.problems)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
