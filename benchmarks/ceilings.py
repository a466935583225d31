"""The two ceilings of this GPU, measured: every %-of-peak figure of the benchmarks divides by these.

    python -m benchmarks.ceilings [--json FILE] [--dry-run]

* copy GB/s: ``dst.copy_(src)`` of a 1 GiB buffer, device to device, counting bytes read + written;
* GEMM TFLOP/s: bf16 ``8192 x 8192 @ 8192 x 8192`` (``torch.mm``, cuBLAS), ``2 * 8192^3`` FLOP per call.

Each: warmup, then the median of CUDA-event-timed calls. Prints the versions and one headline line per
ceiling; ``--json`` writes ``{device_name, copy_gbps, gemm_tflops, ...}`` (what ``VLMKERN_CEILINGS`` points the
harness at). ``--dry-run``: on the CPU, with tiny sizes, wall-clock timed: checks the plumbing, measures
nothing worth quoting (the JSON says so).
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import sys
import time
from pathlib import Path
from typing import Callable

import torch

COPY_BYTES = 1 << 30
GEMM_N = 8192


def versions() -> dict[str, str]:
    """Python, torch, CUDA, Triton, transformers and the device."""
    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": str(torch.version.cuda)}
    for mod in ("triton", "transformers"):      # metadata, not an import: transformers takes seconds to import
        try:
            out[mod] = importlib.metadata.version(mod)
        except Exception as exc:
            out[mod] = f"not installed ({type(exc).__name__})"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out.update(device_name=p.name, capability=f"{p.major}.{p.minor}", sms=str(p.multi_processor_count),
                   memory_gib=f"{p.total_memory / 2 ** 30:.0f}")
    else:
        out["device_name"] = f"cpu ({platform.processor() or platform.machine()})"
    return out


def median_ms(fn: Callable[[], object], device: str, reps: int, warmup: int = 3) -> float:
    """Median time of ``fn`` in ms: CUDA events per call on the GPU, perf_counter on the CPU."""
    for _ in range(warmup):
        fn()
    times = []
    if device == "cuda":
        torch.cuda.synchronize()
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for a, b in ev:
            a.record()
            fn()
            b.record()
        torch.cuda.synchronize()
        times = [a.elapsed_time(b) for a, b in ev]
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def measure(device: str, copy_bytes: int = COPY_BYTES, n: int = GEMM_N, reps: int = 20) -> dict[str, float]:
    """``{"copy_gbps", "gemm_tflops"}`` measured on ``device``."""
    src = torch.empty(copy_bytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    copy_ms = median_ms(lambda: dst.copy_(src), device, reps)
    del src, dst
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    gemm_ms = median_ms(lambda: torch.mm(a, b), device, reps)
    return {"copy_gbps": 2 * copy_bytes / (copy_ms * 1e-3) / 1e9, "gemm_tflops": 2 * n ** 3 / (gemm_ms * 1e-3) / 1e12,
            "copy_ms": copy_ms, "gemm_ms": gemm_ms, "copy_bytes": copy_bytes, "gemm_n": n}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.ceilings", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, default=None, help="write the ceilings and versions here")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: plumbing only")
    args = ap.parse_args(argv)
    info = versions()
    print("versions: " + " ".join(f"{k}={v}" for k, v in info.items()), flush=True)
    if args.dry_run:
        device, sizes = "cpu", dict(copy_bytes=1 << 22, n=256, reps=5)
    elif torch.cuda.is_available():
        device, sizes = "cuda", {}
    else:
        print("error: no CUDA device (use --dry-run on the CPU)", file=sys.stderr)
        return 2
    res = measure(device, **sizes)
    tag = " (DRY RUN on the CPU: not a ceiling)" if args.dry_run else ""
    print(f"ceiling copy: {res['copy_gbps']:.4g} GB/s (device-to-device copy of {res['copy_bytes'] >> 20} MiB, "
          f"read + write){tag}", flush=True)
    print(f"ceiling gemm: {res['gemm_tflops']:.4g} TFLOP/s (bf16 {res['gemm_n']}^3 torch.mm){tag}", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**info, **res, "dry_run": args.dry_run, "device": device}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
