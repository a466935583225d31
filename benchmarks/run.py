"""Run the benchmark suites.

    python -m benchmarks.run [--op NAME] [--device cpu|cuda] [--quick] [--out DIR] [--strict]
                             [--jsonl FILE] [--compiled include|skip|only]

Every module in ``benchmarks/ops/`` exposing ``cases(device, quick, smoke=False)`` is one op. For each op
the results go to ``DIR/<op>-<device>.{json,csv,png}`` and a table is printed after each op. Default DIR:
``benchmarks/results/`` for a full run (the tracked files the docs quote), ``benchmarks/results/quick/``
(git-ignored) for ``--quick`` / ``--smoke``, so a quick run leaves ``git status`` clean. ``--jsonl`` appends
one JSON line per measurement as each case ends (what a killed run still leaves behind); ``--compiled``
chooses whether the Inductor-compiled baselines run (they take minutes to compile on a GPU). Exit status: 0, or 1 when an op module failed or its subject (vlmkern) errored on a
case; ``--strict`` also fails on a missed speed target.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import pkgutil
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch

from benchmarks import harness


def discover() -> list[str]:
    """Names of the op modules under ``benchmarks/ops`` (modules starting with '_' are not ops)."""
    import benchmarks.ops as pkg
    return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_"))


def _cases(module, device: str, quick: bool, smoke: bool):
    params = inspect.signature(module.cases).parameters
    return module.cases(device, quick, smoke=smoke) if "smoke" in params else module.cases(device, quick)


def _jsonl_writer(path: Optional[Path], op: str, device: str, env: dict, mode: str):
    """``on_case`` callback appending the case's rows to ``path`` (flushed: a killed run keeps them)."""
    if path is None:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(rows) -> None:
        with open(path, "a") as f:
            for r in rows:
                rec = {"op": op, "device": device, "device_name": env.get("device_name"), "mode": mode,
                       "git_commit": env.get("git_commit"), **asdict(r)}
                f.write(json.dumps(harness._json_safe(rec), default=str) + "\n")
    return write


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    ap.add_argument("--op", action="append", help="op module to run (repeatable); default: all")
    ap.add_argument("--device", choices=("cpu", "cuda"), default=None,
                    help="default: cuda when available, else cpu")
    ap.add_argument("--quick", action="store_true", help="fewer shapes and shorter timing (CI smoke test)")
    ap.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # tiny shapes, 2 reps: tests only
    ap.add_argument("--out", type=Path, default=None,
                    help="results folder (default: benchmarks/results, or benchmarks/results/quick for --quick)")
    ap.add_argument("--jsonl", type=Path, default=None, help="append one JSON line per measurement to this file")
    ap.add_argument("--compiled", choices=("include", "skip", "only"), default="include",
                    help="Inductor-compiled baselines: run them, skip them, or run only them (with vlmkern)")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a speed target is missed")
    ap.add_argument("--no-plot", action="store_true", help="skip the PNG plots")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--list", action="store_true", help="list the op modules and exit")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    # Timing Triton's CPU interpreter measures nothing useful: benchmarks run the real backends. Dispatch reads
    # TRITON_INTERPRET at call time, so unsetting it for the run is enough (tests set it in their conftest).
    interpret = os.environ.pop("TRITON_INTERPRET", None)
    try:
        return _main(parse_args(argv), interpret not in (None, "0"))
    finally:
        if interpret is not None:
            os.environ["TRITON_INTERPRET"] = interpret


def _main(args: argparse.Namespace, dropped_interpret: bool) -> int:
    ops = discover()
    if args.list:
        print("\n".join(ops))
        return 0
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    wanted = args.op or ops
    unknown = [o for o in wanted if o not in ops]
    if unknown:
        print(f"error: unknown op(s) {unknown}; available: {ops}", file=sys.stderr)
        return 2
    if dropped_interpret:
        print("[bench] TRITON_INTERPRET was set: ignored (the interpreter's speed means nothing)", file=sys.stderr)

    quick = args.quick or args.smoke
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    out_dir = args.out or (harness.RESULTS_DIR / "quick" if quick else harness.RESULTS_DIR)
    cfg = harness.TimerConfig.for_mode(device, quick=quick, smoke=args.smoke)
    print(f"[bench] {mode} run on {device}: {', '.join(wanted)} -> {out_dir}", file=sys.stderr, flush=True)
    env = harness.environment(device)
    failed, missed, tables = [], [], []
    for op in wanted:
        t0 = time.perf_counter()
        print(f"[bench] {op}: importing and building its cases", file=sys.stderr, flush=True)
        try:
            module = importlib.import_module(f"benchmarks.ops.{op}")
            cases = _cases(module, device, quick, args.smoke)
            torch.manual_seed(0)
            # No global no_grad: forward+backward cases need autograd; forward-only cases disable it themselves.
            rows = harness.run_cases(cases, device, cfg, desc=f"{op} [{device}]", show_progress=not args.no_progress,
                                     compiled=args.compiled, on_case=_jsonl_writer(args.jsonl, op, device, env, mode))
        except Exception:
            failed.append(op)
            print(f"[bench] {op} failed:\n{traceback.format_exc()}", file=sys.stderr)
            continue
        if not rows and args.compiled == "only":
            print(f"[bench] {op}: no compiled baseline in this run's cases", flush=True)
            continue
        extra = {"quick": args.quick, "smoke": args.smoke, "mode": mode, "compiled": args.compiled,
                 "timer": asdict(cfg), "argv": sys.argv[1:], "wall_s": round(time.perf_counter() - t0, 2),
                 "cases": harness.case_records(cases)}
        stem = f"{op}-compiled" if args.compiled == "only" else op
        paths = harness.write_results(stem, device, rows, env, out_dir, extra=extra, plot=not args.no_plot)
        if any(r.subject and r.status == "error" for r in rows):
            failed.append(op)
        missed += [f"{op}: {r.case}: vlmkern vs {r.impl} x{r.speedup:.2f} < x{r.target:g}"
                   for r in rows if r.target_met is False]
        missed += [f"{op}: {r.case}: target vs {r.impl} not measured ({r.status})"
                   for r in rows if r.target is not None and r.target_met is None]
        written = ", ".join(str(p) for p in paths.values() if p is not None)
        tables.append(f"== {op} on {env['device_name']} ({device}, {mode} run; {extra['wall_s']} s; "
                      f"speedup = baseline / vlmkern) ==\n{harness.format_table(rows)}\nwritten: {written}")
        print(tables[-1] + "\n", flush=True)      # each op's table as soon as it ends
    if missed:
        print("\nspeed targets not met:\n  " + "\n  ".join(missed))
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
    return 1 if failed or (args.strict and missed) else 0


if __name__ == "__main__":
    sys.exit(main())
