"""Static reading of a compiled Triton kernel: its loops' loads and dots in PTX, SASS opcode counts, occupancy.

Used by ``gpu_build_check`` (stored with each compile's statistics, so a cached build still has it) and shown
by ``perf_report``. Everything here is text analysis of what the compiler produced; no GPU is involved.

* Loops are PTX back edges: a ``bra`` to a label defined earlier in the function spans one loop body.
* A load is *asynchronous* when it is a ``cp.async`` (sm_80+, LDGSTS in SASS) or a bulk/TMA copy
  (``cp.async.bulk``, UTMALDG); ``ld.global`` is a synchronous load into registers. A loop counts as
  asynchronously fed when at least half of the bytes its loads move per thread and iteration are async
  (a few scalar loads of routing ids or scale vectors beside cp.async tiles pass; a tile gathered with
  scalar loads next to a cp.async'd scale vector does not).
* A dot is ``wgmma.mma_async`` (sm_90 warpgroup MMA, HGMMA in SASS) or ``mma.sync`` (sm_80 style, HMMA).
* The *main loop* is the loop with the most dot instructions (ties: the innermost); a kernel without dots
  uses the loop with the most global loads.
"""
from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

_LABEL_RE = re.compile(r"^\s*(\$L\w+):")
_BRA_RE = re.compile(r"\bbra(?:\.uni)?\s+(\$L\w+)\s*;")
_ASYNC_RE = re.compile(r"^\s*(?:@!?%p\d+\s+)?cp\.async\.(?:ca|cg|bulk)\b(?!.*commit)(?!.*wait)")
_LDG_RE = re.compile(r"^\s*(?:@!?%p\d+\s+)?ld\.global\b")
_CP_SIZE_RE = re.compile(r"\]\s*,\s*(0x[0-9a-fA-F]+|\d+)")
_LD_WIDTH_RE = re.compile(r"ld\.global\S*?(?:\.v(\d))?\.[bfus](\d+)\s")
_BULK_BYTES = 128   # a TMA / bulk copy: counted as one large async transfer
_WGMMA_RE = re.compile(r"\bwgmma\.mma_async\b")
_MMA_RE = re.compile(r"\bmma\.sync\b")
_WGMMA_WAIT_RE = re.compile(r"\bwgmma\.wait_group\.sync\.aligned\s+(\d+)")
_SASS_OPS = ("LDGSTS", "UTMALDG", "LDG", "HGMMA", "HMMA", "STL", "LDL")

# Per-SM limits (CUDA programming guide, compute capabilities table): registers, shared memory usable by
# blocks (bytes), resident threads, resident blocks. The driver reserves 1 KB of shared memory per block.
SM_LIMITS = {80: dict(regs=65536, smem=167936, threads=2048, ctas=32),
             90: dict(regs=65536, smem=233472, threads=2048, ctas=32)}
_SMEM_RESERVED = 1024


def ptx_loops(ptx: str) -> list[dict[str, Any]]:
    """Each PTX back edge as ``{start, end, async_loads, sync_loads, wgmma, mma, wgmma_wait}`` (line span and
    instruction counts inside it; ``wgmma_wait`` is the smallest ``wgmma.wait_group`` depth, None if none)."""
    lines = ptx.splitlines()
    labels = {}
    for i, ln in enumerate(lines):
        if m := _LABEL_RE.match(ln):
            labels[m.group(1)] = i
    loops = []
    for i, ln in enumerate(lines):
        m = _BRA_RE.search(ln)
        if m and labels.get(m.group(1), i + 1) < i:
            body = lines[labels[m.group(1)]:i + 1]
            waits = [int(w.group(1)) for b in body if (w := _WGMMA_WAIT_RE.search(b))]
            asyncs = [b for b in body if _ASYNC_RE.match(b)]
            syncs = [b for b in body if _LDG_RE.match(b)]
            loops.append(dict(start=labels[m.group(1)], end=i,
                              async_loads=len(asyncs), sync_loads=len(syncs),
                              async_bytes=sum(map(_async_bytes, asyncs)), sync_bytes=sum(map(_ld_bytes, syncs)),
                              wgmma=sum(bool(_WGMMA_RE.search(b)) for b in body),
                              mma=sum(bool(_MMA_RE.search(b)) for b in body),
                              wgmma_wait=min(waits) if waits else None))
    return loops


def _async_bytes(line: str) -> int:
    if "cp.async.bulk" in line:
        return _BULK_BYTES
    m = _CP_SIZE_RE.search(line)
    return int(m.group(1), 0) if m else 0


def _ld_bytes(line: str) -> int:
    m = _LD_WIDTH_RE.search(line)
    return int(m.group(1) or 1) * int(m.group(2)) // 8 if m else 0


def _fed_async(loop: dict[str, Any]) -> bool:
    return loop["async_loads"] > 0 and 2 * loop["async_bytes"] >= loop["async_bytes"] + loop["sync_bytes"]


def main_loop(loops: list[dict[str, Any]]) -> dict[str, Any] | None:
    if not loops:
        return None
    return max(loops, key=lambda lp: (lp["wgmma"] + lp["mma"], lp["async_loads"] + lp["sync_loads"]
                                      if lp["wgmma"] + lp["mma"] == 0 else 0, lp["start"] - lp["end"]))


def analyse_ptx(ptx: str) -> dict[str, Any]:
    """Main-loop facts of one kernel's PTX (see the module docstring)."""
    loops = ptx_loops(ptx)
    main = main_loop(loops)
    dot_loops = [lp for lp in loops if lp["wgmma"] + lp["mma"]]
    out: dict[str, Any] = dict(loops=len(loops), dot_loops=len(dot_loops))
    if main is None:
        return dict(out, main_loop=None, async_loads=False, wgmma=False)
    # every loop that runs dots must be fed asynchronously (lora_up's low-rank loop, attention's two passes)
    fed = dot_loops or [main]
    keys = ("async_loads", "sync_loads", "async_bytes", "sync_bytes", "wgmma", "mma", "wgmma_wait")
    return dict(out, main_loop={k: main[k] for k in keys}, async_loads=all(map(_fed_async, fed)),
                wgmma=bool(dot_loops) and all(lp["mma"] == 0 and lp["wgmma"] > 0 for lp in dot_loops))


def sass_counts(cubin: bytes, cuobjdump: str | None) -> dict[str, int] | None:
    """Opcode counts of the cubin's SASS (whole kernel), or None when ``cuobjdump`` is unavailable/fails."""
    if not cuobjdump or not Path(cuobjdump).exists():
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        try:
            sass = subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True, timeout=120).stdout
        except (OSError, subprocess.SubprocessError):
            return None
    if not sass:
        return None
    ops = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", sass)
    return {op: sum(o == op for o in ops) for op in _SASS_OPS}


def ctas_per_sm(arch: int, registers: int | None, shared: int | None, num_warps: int) -> int | None:
    """Resident blocks per SM from registers (allocated per warp in units of 256), shared memory and threads."""
    lim = SM_LIMITS.get(arch)
    if lim is None or registers is None or shared is None:
        return None
    threads = 32 * num_warps
    per_warp = -(-max(registers, 1) * 32 // 256) * 256
    by_regs = lim["regs"] // (per_warp * num_warps)
    by_smem = lim["smem"] // (shared + _SMEM_RESERVED)
    return min(by_regs, by_smem, lim["threads"] // threads, lim["ctas"])


def cuobjdump_path() -> str | None:
    try:
        import triton
        p = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        return str(p) if p.exists() else None
    except ImportError:
        return None
