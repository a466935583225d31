"""Headline kernel timings (tier T2 of ``scripts/gpu_suite.sh``): one real model shape per family, bf16 forward
and forward+backward, each vlmkern op against its strongest baseline, timed under CUDA graphs.

    python -m benchmarks.headline [--jsonl FILE] [--budget-s S] [--family NAME ...] [--dry-run]

The cases are the benchmark modules' own (``benchmarks/ops``), at the models' sizes:

==========================  ==========================================================  ==================
family                      case (bf16)                                                 baselines
==========================  ==========================================================  ==================
qformer                     ITM masked self-attention B=256 H=12 L=32+32 d=64;          SDPA backends,
                            cross-attention 32 -> 257 image tokens                      HF eager
routed_linear               PLoRA 8192 tok 4096->6144 r=256 50 % image; CogVLM experts  original, masked
                            8192 tok 4096->12288                                        / sort+grouped_mm
structured_cross_attention  CogAgent cross-attention 2048 x 6400, hidden 4096           SDPA module
patch_embed                 Fuyu 1080x1920 uint8 on the GPU -> 4096 (fwd only)          unfold + Linear
projector                   LLaVA-1.5 B=16 x 576: 1024 -> 4096 -> 4096                  nn.Sequential
packing                     LLaVA-NeXT 1080x1920 project + unpad + newline (fwd only)   transformers
==========================  ==========================================================  ==================

Every implementation is captured once in a CUDA graph and replayed (L2 flushed before each replay), so host
overhead is out of the figure; one that cannot be captured (a host sync: the original PLoRA's
``torch.sum(mask) > 0``, boolean indexing) is timed eagerly and says so. Lower bounds (the GEMM alone) are
printed beside, never counted as the baseline. Compiled baselines (torch.compile, FlexAttention) are left to
tier T3: their compile time does not fit here. %-of-peak: the ceilings ``benchmarks.ceilings`` measured
(``VLMKERN_CEILINGS``). ``--dry-run``: the same cases at tiny sizes on the CPU, eager, 2 reps (plumbing only).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from benchmarks import harness
from benchmarks.harness import Case

FAMILIES = ("qformer", "routed_linear", "structured_cross_attention", "patch_embed", "projector", "packing")


@dataclass
class Spec:
    family: str
    case: Case
    baselines: tuple[str, ...]                  # alternatives computing the same thing: the fastest one counts
    bounds: tuple[str, ...] = ()                # lower bounds computing less (the GEMM alone)
    note: str = ""
    rows: dict = field(default_factory=dict)


def specs(device: str, tiny: bool) -> list[Spec]:
    """The headline cases: the models' shapes (bf16) or, ``tiny``, the same cases at smoke sizes (fp32)."""
    from benchmarks.ops import packing, patch_embed, projector, qformer, routed_linear, structured_cross_attention
    dt = torch.float32 if tiny else torch.bfloat16
    routed_linear.RANK = 16 if tiny else 256
    out = []
    sdpa = tuple(f"sdpa {n} +mask" for n in qformer.SDPA_BACKENDS) + ("sdpa +mask", "hf eager", "xformers")
    sdpa_nomask = tuple(f"sdpa {n}" for n in qformer.SDPA_BACKENDS) + ("sdpa", "hf eager", "xformers")
    for train in (False, True):
        out.append(Spec("qformer", qformer._self_attn_case(device, 2 if tiny else 256, "bidirectional", train,
                                                           with_flex=False), sdpa))
        out.append(Spec("qformer", qformer._cross_attn_case(device, 2 if tiny else 256, 257, train, with_flex=False),
                        sdpa_nomask))
    tok, plora_shape, exp_shape = (64, (32, 48), (32, 48)) if tiny else (8192, (4096, 6144), (4096, 12288))
    for train in (False, True):
        out.append(Spec("routed_linear", routed_linear._plora_case(device, tok, plora_shape, 0.5, dt, train),
                        ("original", "all-then-mask"), ("nn.Linear",)))
        out.append(Spec("routed_linear", routed_linear._expert_case(device, tok, exp_shape, dt, train),
                        ("original", "sort+grouped_mm"), ("dense",)))
    cog = (1, 32, 400, 64, 2, 32) if tiny else (1, 2048, 6400, 4096, 32, 32)
    for train in (False, True):
        out.append(Spec("structured_cross_attention",
                        structured_cross_attention._cogagent_case(device, dt, train, *cog), ("SDPA",)))
    h, w, hidden = (61, 89, 64) if tiny else (*patch_embed.FULL, patch_embed.HIDDEN)
    out.append(Spec("patch_embed", patch_embed._fused_case(device, 1, h, w, hidden, dt, with_compile=False),
                    ("torch unfold+linear",), ("gemm only",),
                    note="fwd only (the benchmark's cases are inference)"))
    dims = (32, 64, 64) if tiny else (projector.VISION, projector.LLM, projector.LLM)
    for train in (False, True):
        out.append(Spec("projector", projector._case(device, 1 if tiny else 16, dt, train, dims=dims),
                        ("nn.Sequential",)))
    out.append(Spec("packing", packing._llava_case(device, (1080, 1920), (32, 64) if tiny else (1024, 4096), dt),
                    ("transformers",), ("gemm on kept rows",), note="fwd only (inference path)"))
    return out


def time_impl(fn, device: str, reps: int) -> tuple[float, str]:
    """Median ms of ``fn`` and how it was timed: a CUDA graph's replays, else eagerly (with the reason)."""
    if device == "cuda":
        cfg = harness.TimerConfig(0.0, reps, reps, 0.0)
        try:
            return harness.quantile(harness.time_graph(fn, cfg, reps), 0.5), "graph"
        except Exception as exc:
            harness.settle_cuda()
            why = f"{type(exc).__name__}: {str(exc).splitlines()[0][:80] if str(exc) else ''}"
            times, _ = harness.time_fn(fn, device, harness.TimerConfig(0.05, 5, reps, 0.0))
            return harness.quantile(times, 0.5), f"eager (no graph: {why})"
    times, _ = harness.time_fn(fn, device, harness.TimerConfig(0.0, 2, 2, 0.0))
    return harness.quantile(times, 0.5), "eager (cpu)"


def run_spec(spec: Spec, device: str, reps: int, ceilings: dict) -> list[dict]:
    """Set the case up, time the subject, its baselines and bounds; one record per implementation."""
    case = spec.case
    case.setup(case)
    records = []
    try:
        for name in [case.subject, *spec.baselines, *spec.bounds]:
            if name not in case.impls:
                continue
            rec = {"tier": "T2", "family": spec.family, "case": case.name, "shape": case.shape, "impl": name,
                   "backend": case.backends.get(name), "role": "subject" if name == case.subject else
                   "baseline" if name in spec.baselines else "bound"}
            try:
                rec["median_ms"], rec["timing"] = time_impl(case.impls[name], device, reps)
                rec["tflops"], rec["gbps"] = harness.throughput(case.flops, case.bytes, rec["median_ms"])
                rec["pct_gemm_peak"], rec["pct_copy_peak"] = harness.percent_of_peak(rec["tflops"], rec["gbps"],
                                                                                     ceilings)
                rec["status"] = "ok"
            except Exception as exc:
                rec["status"], rec["note"] = "error", f"{type(exc).__name__}: {str(exc)[:300]}"
                if device == "cuda":
                    harness.settle_cuda()
            records.append(rec)
        for name, why in case.skipped.items():
            if name in spec.baselines:
                records.append({"tier": "T2", "family": spec.family, "case": case.name, "impl": name,
                                "role": "baseline", "status": "skipped", "note": why})
    finally:
        case.impls = {}
        if device == "cuda":
            torch.cuda.empty_cache()
    return records


def headline(records: list[dict], spec: Spec) -> str:
    """One line: vlmkern's time and %-of-peak, the fastest baseline and the speedup over it, the bounds."""
    ok = {r["impl"]: r for r in records if r["status"] == "ok"}
    subj = ok.get(spec.case.subject)
    if subj is None:
        err = next((r.get("note", "") for r in records if r["impl"] == spec.case.subject), "not run")
        return f"T2 {spec.family:<26} {_label(spec.case)}: vlmkern FAILED: {err[:160]}"

    def pct(r):
        if r.get("pct_gemm_peak") is None:
            return ""
        return f" [{r['pct_gemm_peak']:.0f}% gemm / {r['pct_copy_peak']:.0f}% copy peak]"

    text = (f"T2 {spec.family:<26} {_label(spec.case)}: vlmkern {subj['median_ms']:.3f} ms "
            f"({subj['timing'].split(' (')[0]}){pct(subj)}")
    base = [ok[n] for n in spec.baselines if n in ok]
    if base:
        best = min(base, key=lambda r: r["median_ms"])
        text += (f" | best baseline {best['impl']} {best['median_ms']:.3f} ms ({best['timing'].split(' (')[0]}) "
                 f"x{best['median_ms'] / subj['median_ms']:.2f}")
    else:
        text += " | no baseline ran"
    for n in spec.bounds:
        if n in ok:
            text += f" | bound {n} {ok[n]['median_ms']:.3f} ms"
    failed = [r["impl"] for r in records if r["status"] == "error"]
    return text + (f" | errors: {', '.join(failed)}" if failed else "") + (f" | {spec.note}" if spec.note else "")


def _label(case: Case) -> str:
    return case.name if "fwd" in case.name else f"{case.group}: {case.name}"


def summarize_jsonl(path: Path, op: str) -> list[str]:
    """T3 headline lines from the harness's JSONL: per case of ``op``, vlmkern's time (and graph time), the
    fastest alternative that computes the same thing (lower bounds left out) and missed targets."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("op") == op and "case" in r]
    lines = []
    for case in dict.fromkeys(r["case"] for r in rows):
        rs = [r for r in rows if r["case"] == case]
        subj = next((r for r in rs if r.get("subject")), None)
        if subj is None or subj.get("status") != "ok":
            lines.append(f"T3 {op:<26} {case}: vlmkern {subj.get('status') if subj else 'missing'} "
                         f"{(subj or {}).get('note', '')[:120]}")
            continue
        text = f"T3 {op:<26} {case}: vlmkern {subj['median_ms']:.3f} ms"
        if subj.get("graph_ms") is not None:
            text += f" (graph {subj['graph_ms']:.3f})"
        if subj.get("pct_gemm_peak") is not None:
            text += f" [{subj['pct_gemm_peak']:.0f}% gemm / {subj['pct_copy_peak']:.0f}% copy peak]"
        alts = [r for r in rs if not r.get("subject") and r.get("status") == "ok" and r.get("speedup")
                and r["impl"] not in harness.LOWER_BOUNDS]
        if alts:
            best = min(alts, key=lambda r: r["speedup"])
            text += f" | fastest alternative {best['impl']} x{best['speedup']:.2f}"
        missed = [f"{r['impl']} x{r['speedup']:.2f}<x{r['target']:g}" for r in rs if r.get("target_met") is False]
        lines.append(text + (f" | MISSED {', '.join(missed)}" if missed else ""))
    return lines or [f"T3 {op:<26} no finished case in {path.name}"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.headline", description=__doc__.split("\n\n")[0])
    ap.add_argument("--summarize", type=Path, default=None, help="print T3 headline lines of a harness JSONL")
    ap.add_argument("--op", default=None, help="with --summarize: the op")
    ap.add_argument("--jsonl", type=Path, default=None, help="append one JSON line per measurement")
    ap.add_argument("--budget-s", type=float, default=110.0, help="skip the families that start after this")
    ap.add_argument("--family", action="append", choices=FAMILIES, help="only these families (repeatable)")
    ap.add_argument("--reps", type=int, default=30, help="graph replays per implementation")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, eager: plumbing only")
    args = ap.parse_args(argv)
    if args.summarize:
        if not args.op:
            ap.error("--summarize needs --op")
        print("\n".join(summarize_jsonl(args.summarize, args.op)))
        return 0
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device (use --dry-run on the CPU)", file=sys.stderr)
        return 2
    ceilings = harness.load_ceilings(device)
    env = harness.environment(device)
    start, failed = time.perf_counter(), 0
    for spec in specs(device, tiny=args.dry_run):
        if args.family and spec.family not in args.family:
            continue
        if time.perf_counter() - start > args.budget_s:
            print(f"T2 {spec.family:<26} {_label(spec.case)}: skipped (T2 budget of {args.budget_s:.0f} s spent)",
                  flush=True)
            continue
        t0 = time.perf_counter()
        try:
            records = run_spec(spec, device, args.reps, ceilings)
        except Exception as exc:        # a broken setup fails this case, not the tier
            records = [{"tier": "T2", "family": spec.family, "case": spec.case.name, "impl": spec.case.subject,
                        "role": "subject", "status": "error", "note": f"setup: {type(exc).__name__}: {exc}"[:400]}]
        failed += not any(r["impl"] == spec.case.subject and r["status"] == "ok" for r in records)
        print(headline(records, spec) + f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                for r in records:
                    f.write(json.dumps(harness._json_safe({**r, "device_name": env.get("device_name"),
                                                           "git_commit": env.get("git_commit")}),
                                       default=str) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
