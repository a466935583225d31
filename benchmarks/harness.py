"""Benchmark harness: time a vlmkern op and its alternatives on the same inputs, record, write, plot.

A :class:`Case` names one input configuration (shape taken from a real model's config) and the
implementations to compare on it, one of which is the *subject* (the vlmkern op); every other one is a
*baseline*. :func:`run_cases` times them and returns one :class:`Measurement` per (case, implementation):

* time: median, p20 and p80 of per-call times in ms. CUDA: one ``torch.cuda.Event`` pair per call, the L2
  cache flushed before each call (outside the timed region), warmup first. CPU: ``time.perf_counter``
  around each call after warmup, the implementations of a case called round-robin (one call each per round,
  the order rotating) so that the load drift of a shared machine falls on all of them alike.
* peak memory (MiB): CUDA only, ``max_memory_allocated`` during one call minus what was allocated before it
  (the call's working set including its output). ``None`` on the CPU: torch's CPU allocator is invisible to
  ``tracemalloc`` and RSS deltas mostly show malloc's caching, so no honest number exists there.
* TFLOP/s and GB/s from the case's useful FLOP and minimal byte counts (the same counts for every
  implementation of a case, so they compare like for like).
* ``speedup``: baseline median / subject median (> 1: vlmkern is faster); checked against the case's targets.
* ``max_abs_diff``: max |output - subject output| of the first call, a sanity check that the
  implementations compute the same thing.
* CUDA only: ``host_ms`` (median host time to issue one call) and, when that reaches 80 % of the GPU time
  (the call is launch-bound, so event timing shows the host), ``graph_ms``: the same call captured once in a
  CUDA graph and replayed (the GPU time alone).
* ``pct_gemm_peak`` / ``pct_copy_peak``: TFLOP/s and GB/s as % of the ceilings measured on this GPU by
  ``benchmarks.ceilings`` (bf16 GEMM, device-to-device copy), read from the JSON that ``VLMKERN_CEILINGS``
  names; ``None`` without one.

:func:`write_results` writes ``<op>-<device>.json``, ``.csv`` and ``.png`` with :func:`environment`.
"""
from __future__ import annotations

import csv
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent
# Implementations that compute less than the op (the GEMM alone, the mask build alone): lower bounds, never
# the baseline a speedup claim is made against.
LOWER_BOUNDS = frozenset({"nn.Linear", "dense", "gemm only", "gemm on kept rows", "gemm on all rows",
                          "create_block_mask only", "unavoidable GEMMs"})
CPU_MEMORY_NOTE = ("peak memory is not measured on the CPU (torch's CPU allocator is invisible to tracemalloc "
                   "and RSS deltas mostly reflect malloc caching); reported as null")


# ----------------------------------------------------------------------------------------------- cases
@dataclass
class Case:
    """One input configuration and the implementations to compare on it.

    ``impls`` maps a name to a zero-argument callable running one call (inputs are captured in closures).
    ``setup(case)``, if given, runs right before the case is timed and may fill ``impls``, ``backends``
    and ``skipped`` (so that the inputs of only one case are alive at a time); after timing, a case with
    a ``setup`` drops its ``impls`` again.
    """

    name: str                                   # e.g. "e2e 1080x1920"
    shape: str                                  # what the shapes are, in words
    flops: float                                # useful FLOP of one call
    bytes: float                                # minimal bytes read + written by one call
    impls: dict[str, Callable[[], Any]] = field(default_factory=dict)
    subject: str = "vlmkern"
    group: str = ""                             # cases of one group share a plot panel and implementations
    setup: Optional[Callable[["Case"], None]] = None
    targets: dict[str, float] = field(default_factory=dict)   # baseline -> minimal subject speedup over it
    backends: dict[str, str] = field(default_factory=dict)    # implementation -> what ran (triton, cpp, hf...)
    skipped: dict[str, str] = field(default_factory=dict)     # implementation -> why it is not measured
    notes: list[str] = field(default_factory=list)


@dataclass
class Measurement:
    case: str
    group: str
    shape: str
    impl: str
    subject: bool
    backend: Optional[str]
    median_ms: Optional[float] = None
    p20_ms: Optional[float] = None
    p80_ms: Optional[float] = None
    reps: int = 0
    peak_mem_mb: Optional[float] = None
    tflops: Optional[float] = None
    gbps: Optional[float] = None
    speedup: Optional[float] = None             # this implementation's median / subject median
    target: Optional[float] = None
    target_met: Optional[bool] = None
    max_abs_diff: Optional[float] = None        # vs the subject's output
    host_ms: Optional[float] = None             # CUDA: median host time to issue one call
    graph_ms: Optional[float] = None            # CUDA, launch-bound calls: median of CUDA-graph replays
    pct_gemm_peak: Optional[float] = None       # tflops as % of the measured bf16 GEMM ceiling
    pct_copy_peak: Optional[float] = None       # gbps as % of the measured copy ceiling
    status: str = "ok"                          # ok | skipped | error
    note: str = ""


@dataclass(frozen=True)
class TimerConfig:
    budget_s: float     # time spent on timed calls per implementation (before clamping to min/max reps)
    min_reps: int
    max_reps: int
    warmup_s: float     # warmup beyond the first call
    flush_l2: bool = True

    @staticmethod
    def for_mode(device: str, quick: bool = False, smoke: bool = False) -> "TimerConfig":
        if smoke:
            return TimerConfig(budget_s=0.0, min_reps=2, max_reps=2, warmup_s=0.0)
        if device == "cuda":
            return TimerConfig(0.15, 5, 300, 0.05) if quick else TimerConfig(0.5, 10, 1000, 0.1)
        return TimerConfig(0.3, 3, 30, 0.0) if quick else TimerConfig(4.0, 11, 300, 0.3)


# ----------------------------------------------------------------------------------------------- stats
def quantile(values: list[float], q: float) -> float:
    """Linear-interpolated quantile (numpy's default), ``0 <= q <= 1``."""
    if not values:
        raise ValueError("quantile of an empty list")
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(times_ms: list[float]) -> dict[str, float]:
    return {"median_ms": quantile(times_ms, 0.5), "p20_ms": quantile(times_ms, 0.2),
            "p80_ms": quantile(times_ms, 0.8)}


def throughput(flops: float, nbytes: float, median_ms: float) -> tuple[Optional[float], Optional[float]]:
    if not median_ms or median_ms <= 0:
        return None, None
    sec = median_ms * 1e-3
    return (flops / sec / 1e12 if flops else None), (nbytes / sec / 1e9 if nbytes else None)


def speedups(medians: dict[str, float], subject: str) -> dict[str, float]:
    """``{baseline: baseline_median / subject_median}`` (> 1: the subject is faster)."""
    s = medians[subject]
    return {k: (v / s if s > 0 else math.inf) for k, v in medians.items() if k != subject}


# ---------------------------------------------------------------------------------------------- timers
_L2_FLUSH: dict[str, torch.Tensor] = {}


def _flush_l2() -> None:
    buf = _L2_FLUSH.get("buf")
    if buf is None:
        buf = _L2_FLUSH["buf"] = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device="cuda")
    buf.zero_()


def time_fn(fn: Callable[[], Any], device: str, cfg: TimerConfig) -> tuple[list[float], Any]:
    """Per-call times in ms of ``fn`` after warmup, and the output of its first (warmup) call."""
    times, first, _ = time_fn_host(fn, device, cfg)
    return times, first


def time_fn_host(fn: Callable[[], Any], device: str, cfg: TimerConfig
                 ) -> tuple[list[float], Any, Optional[float]]:
    """:func:`time_fn` plus the median host time to issue one call (CUDA; ``None`` on the CPU)."""
    if device != "cuda":
        times, firsts, errors = time_round_robin({"fn": fn}, cfg)
        if errors:
            raise errors["fn"]
        return times["fn"], firsts["fn"], None
    torch.cuda.synchronize()
    first = fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()        # the first CUDA call may include compilation or autotuning: estimate again
    fn()
    torch.cuda.synchronize()
    est = max(time.perf_counter() - t0, 1e-7)
    t_end = time.perf_counter() + cfg.warmup_s
    while time.perf_counter() < t_end:          # warmup beyond the first call (caches, autotuning, clocks)
        fn()
    torch.cuda.synchronize()
    reps = int(min(max(cfg.budget_s / est, cfg.min_reps), cfg.max_reps))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    host = []
    for i in range(reps):
        if cfg.flush_l2:
            _flush_l2()
        starts[i].record()
        t0 = time.perf_counter()
        fn()
        host.append((time.perf_counter() - t0) * 1e3)
        ends[i].record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in zip(starts, ends)], first, quantile(host, 0.5)


def capture_graph(fn: Callable[[], Any]) -> "torch.cuda.CUDAGraph":
    """``fn`` captured in a CUDA graph (two warmup calls on a side stream first, as capture requires).
    Raises when ``fn`` cannot be captured (a host sync, a CPU tensor, ...)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def settle_cuda() -> None:
    """After a failed call or capture: wait for the GPU, ignoring an error the wait itself reports."""
    try:
        torch.cuda.synchronize()
    except Exception:
        pass


def time_graph(fn: Callable[[], Any], cfg: TimerConfig, reps: int) -> list[float]:
    """Per-replay times in ms of ``fn`` captured once in a CUDA graph (L2 flushed before each replay)."""
    graph = capture_graph(fn)
    graph.replay()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        if cfg.flush_l2:
            _flush_l2()
        starts[i].record()
        graph.replay()
        ends[i].record()
    torch.cuda.synchronize()
    del graph
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def time_round_robin(fns: dict[str, Callable[[], Any]], cfg: TimerConfig,
                     on_round: Optional[Callable[[int, int], None]] = None
                     ) -> tuple[dict[str, list[float]], dict[str, Any], dict[str, Exception]]:
    """CPU: per-call times in ms of each of ``fns``, called in rounds (each once per round, rotating order).

    Returns (times, first outputs, errors); an implementation whose first call raises is left out of the
    rounds. Reps: the budget over the slowest implementation's estimate, clamped to ``[min_reps, max_reps]``.
    """
    firsts: dict[str, Any] = {}
    errors: dict[str, Exception] = {}
    est: dict[str, float] = {}
    for name, fn in fns.items():
        try:
            t0 = time.perf_counter()
            firsts[name] = fn()
            est[name] = max(time.perf_counter() - t0, 1e-7)
        except Exception as exc:
            errors[name] = exc
    names = [n for n in fns if n in firsts]
    t_end = time.perf_counter() + cfg.warmup_s
    while names and time.perf_counter() < t_end:
        for n in names:
            fns[n]()
    reps = int(min(max(cfg.budget_s / max(est.values(), default=1e-7), cfg.min_reps), cfg.max_reps))
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        if on_round is not None:
            on_round(r, reps)
        for i in range(len(names)):
            n = names[(i + r) % len(names)]
            t0 = time.perf_counter()
            fns[n]()
            times[n].append((time.perf_counter() - t0) * 1e3)
    return times, firsts, errors


def peak_memory_mb(fn: Callable[[], Any], device: str) -> Optional[float]:
    """Extra device memory one call needs at its peak (output included), MiB; ``None`` on the CPU."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak / 2 ** 20


def _as_tensor(x: Any) -> Optional[torch.Tensor]:
    """A tensor, an array, or a list of them (flattened and concatenated); else ``None``."""
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (list, tuple)) and x:
        parts = [_as_tensor(t) for t in x]
        if any(p is None for p in parts):
            return None
        return torch.cat([p.reshape(-1).to(parts[0].device) for p in parts])
    try:
        import numpy as np
        if isinstance(x, np.ndarray):
            return torch.from_numpy(x)
    except ImportError:
        pass
    return None


def max_abs_diff(a: Any, b: Any) -> Optional[float]:
    """max |a - b| over all elements if both are tensors (or arrays) with the same element count."""
    ta, tb = _as_tensor(a), _as_tensor(b)
    if ta is None or tb is None or ta.numel() != tb.numel():
        return None
    if ta.numel() == 0:
        return 0.0
    tb = tb.to(ta.device)
    return float((ta.detach().reshape(-1).float() - tb.detach().reshape(-1).float()).abs().max())


# ---------------------------------------------------------------------------------------- one call
def fwd_bwd(fn: Callable[[], Any], leaves: Iterable[torch.Tensor], grad: Optional[torch.Tensor]) -> Any:
    """One timed call: ``fn()`` under ``no_grad`` when ``grad`` is None, else forward then backward into
    ``leaves`` with ``torch.autograd.grad`` (fresh gradients each call: nothing accumulates into ``.grad``,
    so every repetition does the same work). Returns the (detached) output."""
    if grad is None:
        with torch.no_grad():
            return fn()
    out = fn()
    leaves = [t for t in leaves if t.requires_grad]
    torch.autograd.grad(out, leaves, grad, allow_unused=True)
    return out.detach()


def runner(fn: Callable[[], Any], leaves: Iterable[torch.Tensor], grad: Optional[torch.Tensor]
           ) -> Callable[[], Any]:
    """``lambda: fwd_bwd(fn, leaves, grad)`` with the leaves fixed now."""
    leaves = list(leaves)
    return lambda: fwd_bwd(fn, leaves, grad)


def compiled_baselines(device: str, quick: bool) -> bool:
    """Whether the torch.compile baselines run: full GPU runs, or anywhere with ``VLMKERN_BENCH_COMPILE=1``."""
    flag = os.environ.get("VLMKERN_BENCH_COMPILE")
    return flag == "1" if flag in ("0", "1") else (device == "cuda" and not quick)


# ------------------------------------------------------------------------------------------- ceilings
def load_ceilings(device: str) -> dict[str, Any]:
    """The ceilings ``benchmarks.ceilings`` measured on this GPU (``VLMKERN_CEILINGS`` names the JSON), or {}.

    Only for CUDA and only when the JSON was measured on a GPU of the same name."""
    path = os.environ.get("VLMKERN_CEILINGS")
    if device != "cuda" or not path or not Path(path).is_file():
        return {}
    data = json.loads(Path(path).read_text())
    if torch.cuda.is_available() and data.get("device_name") != torch.cuda.get_device_name():
        return {}
    return data


def percent_of_peak(tflops: Optional[float], gbps: Optional[float], ceilings: dict[str, Any]
                    ) -> tuple[Optional[float], Optional[float]]:
    """(TFLOP/s as % of the GEMM ceiling, GB/s as % of the copy ceiling); ``None`` where unknown."""
    def pct(x, peak):
        return None if x is None or not peak else 100.0 * x / peak
    return pct(tflops, ceilings.get("gemm_tflops")), pct(gbps, ceilings.get("copy_gbps"))


_COMPILED_MODE = {"mode": "include"}


def compiled_skipped() -> bool:
    """True while :func:`run_cases` runs with ``compiled="skip"``: a case's setup should not even build (or
    trial-call) its compiled implementations then."""
    return _COMPILED_MODE["mode"] == "skip"


def is_compiled(name: str, backend: Optional[str]) -> bool:
    """An Inductor-compiled implementation (torch.compile, compiled FlexAttention): slow to build."""
    text = f"{name} {backend or ''}".lower()
    return "inductor" in text or "compile" in text


# ------------------------------------------------------------------------------------------- progress
class _PlainProgress:
    """Stand-in for tqdm: one line per finished step on stderr, and the current activity every 10 s or more."""

    def __init__(self, total: int, desc: str, quiet: bool = False):
        self.total, self.desc, self.n, self.quiet, self.postfix = total, desc, 0, quiet, ""
        self.last = time.perf_counter()

    def set_postfix_str(self, s: str, refresh: bool = True) -> None:
        self.postfix = s
        if not self.quiet and time.perf_counter() - self.last >= 10:
            self.last = time.perf_counter()
            print(f"[{self.desc}] {self.n}/{self.total} {s}", file=sys.stderr, flush=True)

    def update(self, k: int = 1) -> None:
        self.n += k
        self.last = time.perf_counter()
        if not self.quiet:
            print(f"[{self.desc}] {self.n}/{self.total} {self.postfix}", file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str, enabled: bool = True):
    """A tqdm bar on stderr, plain progress lines when tqdm is missing, nothing when disabled."""
    if not enabled:
        return _PlainProgress(total, desc, quiet=True)
    try:
        from tqdm.auto import tqdm
        return tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True, unit="case")
    except ImportError:
        return _PlainProgress(total, desc)


# ------------------------------------------------------------------------------------------------ run
def run_cases(cases: Iterable[Case], device: str, cfg: TimerConfig, *, desc: str = "bench",
              show_progress: bool = True, compiled: str = "include",
              on_case: Optional[Callable[[list[Measurement]], None]] = None) -> list[Measurement]:
    """Time every implementation of every case; the subject first (its output is the comparison point).

    ``compiled``: ``include`` every implementation, ``skip`` the Inductor-compiled ones (listed as skipped),
    ``only`` them (with the subject; cases without one are left out). ``on_case(rows)`` runs after each case.
    """
    if compiled not in ("include", "skip", "only"):
        raise ValueError(f"compiled: expected 'include', 'skip' or 'only', got {compiled!r}")
    cases = list(cases)
    _COMPILED_MODE["mode"] = compiled
    bar = progress_bar(len(cases), desc, show_progress)
    ceilings = load_ceilings(device)
    out: list[Measurement] = []
    for case in cases:
        bar.set_postfix_str(f"{case.name} (setup)")
        rows: list[Measurement] = []
        try:
            if case.setup is not None:
                case.setup(case)
        except Exception as exc:  # a broken setup fails this case (as the subject's error), not the others
            case.impls = {}
            rows.append(Measurement(case.name, case.group, case.shape, case.subject, True, None, status="error",
                                    note=f"setup failed: {type(exc).__name__}: {exc}"[:500]))
        _filter_compiled(case, compiled)
        if compiled == "only" and len(case.impls) < 2 and not any(r.status == "error" for r in rows):
            case.impls = {}
            bar.update(1)
            continue
        names = sorted(case.impls, key=lambda n: n != case.subject)
        ref_out = None
        rr_times, rr_first, rr_err = ({}, {}, {})
        if device != "cuda" and names:
            bar.set_postfix_str(f"{case.name} ({len(names)} round-robin)")
            def on_round(r: int, reps: int, label=f"{case.name}: {len(names)} impls") -> None:
                bar.set_postfix_str(f"{label}, round {r + 1}/{reps}")
            rr_times, rr_first, rr_err = time_round_robin({n: case.impls[n] for n in names}, cfg, on_round)
        for name in names:
            bar.set_postfix_str(f"{case.name} / {name}")
            m = Measurement(case.name, case.group, case.shape, name, name == case.subject, case.backends.get(name))
            try:
                if name in rr_err:
                    raise rr_err[name]
                if device != "cuda":
                    times, first = rr_times[name], rr_first.pop(name)
                else:
                    times, first, m.host_ms = time_fn_host(case.impls[name], device, cfg)
                m.__dict__.update(summarize(times))
                m.reps = len(times)
                if m.host_ms is not None and m.host_ms >= 0.8 * m.median_ms:
                    _graph_time(m, case.impls[name], cfg)
                m.peak_mem_mb = peak_memory_mb(case.impls[name], device)
                m.tflops, m.gbps = throughput(case.flops, case.bytes, m.median_ms)
                m.pct_gemm_peak, m.pct_copy_peak = percent_of_peak(m.tflops, m.gbps, ceilings)
                if name == case.subject:
                    ref_out = first
                elif ref_out is not None:
                    m.max_abs_diff = max_abs_diff(first, ref_out)
                del first
            except Exception as exc:
                m.status, m.note = "error", f"{type(exc).__name__}: {exc}"[:500]
            rows.append(m)
        del ref_out
        for name, why in case.skipped.items():
            if name not in case.impls:
                rows.append(Measurement(case.name, case.group, case.shape, name, name == case.subject,
                                        case.backends.get(name), status="skipped", note=why))
        _fill_ratios(rows, case)
        out.extend(rows)
        if on_case is not None:
            on_case(rows)
        if case.setup is not None:
            case.impls = {}
            if device == "cuda":
                torch.cuda.empty_cache()
        bar.update(1)
    bar.close()
    return out


def _graph_time(m: Measurement, fn: Callable[[], Any], cfg: TimerConfig) -> None:
    """Launch-bound call: also its CUDA-graph replay time; a call that cannot be captured says why."""
    try:
        m.graph_ms = quantile(time_graph(fn, cfg, max(cfg.min_reps, min(m.reps, 50))), 0.5)
    except Exception as exc:
        settle_cuda()
        m.note = (m.note + "; " if m.note else "") + f"no CUDA graph: {type(exc).__name__}: {str(exc)[:120]}"


def _filter_compiled(case: Case, compiled: str) -> None:
    for name in [n for n in case.impls if n != case.subject]:
        comp = is_compiled(name, case.backends.get(name))
        if compiled == "skip" and comp:
            del case.impls[name]
            case.skipped[name] = "Inductor-compiled: timed in a separate pass (--compiled only)"
        elif compiled == "only" and not comp:
            del case.impls[name]


def _fill_ratios(rows: list[Measurement], case: Case) -> None:
    subj = next((r for r in rows if r.subject and r.status == "ok"), None)
    if subj is None:
        return
    subj.speedup = 1.0
    for r in rows:
        if r.subject or r.status != "ok":
            continue
        r.speedup = speedups({case.subject: subj.median_ms, r.impl: r.median_ms}, case.subject)[r.impl]
        if r.impl in case.targets:
            r.target = case.targets[r.impl]
            r.target_met = r.speedup >= r.target
    for r in rows:  # targets on a baseline that did not run are still listed, unmet
        if r.impl in case.targets and r.target is None:
            r.target = case.targets[r.impl]


# ---------------------------------------------------------------------------------------- environment
def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(mod: str) -> Optional[str]:
    try:
        return __import__(mod).__version__
    except Exception:
        return None


def git_state() -> dict[str, Any]:
    """Commit and dirty flag of the repository; ``VLMKERN_GIT_COMMIT`` stands in where there is no .git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = None
        if commit:
            # untracked files count: a new, not yet added module is code the commit does not hold (ignored
            # outputs, .gitignore's results/quick and the like, do not)
            st = subprocess.run(["git", "status", "--porcelain"], cwd=REPO_ROOT, capture_output=True, text=True,
                                timeout=10)
            dirty = bool(st.stdout.strip()) if st.returncode == 0 else None
    except Exception:
        commit, dirty = None, None
    if commit is None and os.environ.get("VLMKERN_GIT_COMMIT"):
        commit = os.environ["VLMKERN_GIT_COMMIT"]
        flag = os.environ.get("VLMKERN_GIT_DIRTY")
        dirty = None if flag is None else flag.lower() in ("1", "true", "yes")
        return {"git_commit": commit, "git_dirty": dirty, "git_source": "VLMKERN_GIT_COMMIT"}
    return {"git_commit": commit, "git_dirty": dirty, "git_source": "git" if commit else None}


def environment(device: str) -> dict[str, Any]:
    """Where and with what the numbers were measured."""
    env: dict[str, Any] = {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "numpy": _version("numpy"),
        "vlmkern": _version("vlmkern"),
        "VLMKERN_BACKEND": os.environ.get("VLMKERN_BACKEND") or "auto",
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "0"),
        "peak_memory_note": CPU_MEMORY_NOTE if device != "cuda" else
        "CUDA max_memory_allocated during one call minus memory allocated before it (output included)",
        "timing": ("torch.cuda.Event per call, L2 flushed before each call" if device == "cuda"
                   else "time.perf_counter per call, implementations of a case round-robin"),
    }
    if device == "cuda" and torch.cuda.is_available():
        env["device_name"] = torch.cuda.get_device_name()
        cap = torch.cuda.get_device_capability()
        env["compute_capability"] = f"{cap[0]}.{cap[1]}"
    else:
        env["device_name"] = f"{env['cpu']} ({env['cpu_count']} logical cores, {env['torch_threads']} torch threads)"
    try:
        from vlmkern import _ext
        env["ext_cpu"] = "built" if _ext.cpu_ext() is not None else _ext.cpu_ext_error()
        env["ext_cuda"] = "built" if _ext.cuda_ext() is not None else _ext.cuda_ext_error()
    except Exception as exc:
        env["ext_cpu"] = env["ext_cuda"] = f"vlmkern not importable: {exc}"
    env.update(git_state())
    return env


# -------------------------------------------------------------------------------------------- writing
def case_records(cases: Iterable[Case]) -> list[dict[str, Any]]:
    """What each case is (shapes, counts, targets, notes) for the JSON record."""
    return [{"case": c.name, "group": c.group, "shape": c.shape, "flops": c.flops, "bytes": c.bytes,
             "subject": c.subject, "targets": dict(c.targets), "notes": list(c.notes)} for c in cases]


CSV_FIELDS = ["op", "device", "device_name", "case", "group", "shape", "impl", "subject", "backend", "median_ms",
              "p20_ms", "p80_ms", "reps", "peak_mem_mb", "tflops", "gbps", "speedup", "target", "target_met",
              "max_abs_diff", "host_ms", "graph_ms", "pct_gemm_peak", "pct_copy_peak", "status", "note"]


def write_results(op: str, device: str, rows: list[Measurement], env: dict[str, Any], out_dir: Path | str,
                  *, extra: Optional[dict[str, Any]] = None, plot: bool = True) -> dict[str, Optional[Path]]:
    """Write ``<op>-<device>.json``, ``.csv`` and (matplotlib permitting) ``.png`` under ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"{op}-{device}"
    record = {"op": op, "device": device, "env": env, **(extra or {}),
              "speedup_definition": "baseline median / subject median (> 1: vlmkern faster)",
              "results": [asdict(r) for r in rows]}
    paths: dict[str, Optional[Path]] = {"json": stem.with_suffix(".json"), "csv": stem.with_suffix(".csv"),
                                        "png": None}
    paths["json"].write_text(json.dumps(_json_safe(record), indent=2, default=str, allow_nan=False) + "\n")
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in rows:
            d = asdict(r)
            w.writerow({k: d.get(k) for k in CSV_FIELDS} | {"op": op, "device": device,
                                                            "device_name": env.get("device_name")})
    if plot:
        try:
            paths["png"] = plot_results(op, device, rows, env, stem.with_suffix(".png"),
                                        mode=(extra or {}).get("mode", "full"))
        except Exception as exc:
            print(f"[bench] no plot for {op}: {type(exc).__name__}: {exc}", file=sys.stderr)
    return paths


def _json_safe(x: Any) -> Any:
    """Non-finite floats become null so the file stays strict JSON."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def impl_label(r: Measurement) -> str:
    """An implementation's legend label, naming the backend that actually ran when it differs from the name
    (on the CPU the 'vlmkern' bar is its reference or C++ backend, not a Triton kernel)."""
    backend = str(r.backend or "")
    return f"{r.impl} [{backend}]" if backend and backend.lower() not in r.impl.lower() else r.impl


def plot_results(op: str, device: str, rows: list[Measurement], env: dict[str, Any], path: Path,
                 mode: str = "full") -> Path:
    """One figure per op: a panel per group, median ms per case and implementation (p20-p80 whiskers).

    A linear time axis from zero (bar heights compare as ratios), plain tick labels, the legend beside the
    panel, the run mode (``quick`` / ``smoke`` / ``full``) in the title."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, MaxNLocator

    ok = [r for r in rows if r.status == "ok"]
    groups = list(dict.fromkeys(r.group for r in ok)) or [""]
    height = 3.4 * len(groups) + 0.8
    fig, axes = plt.subplots(len(groups), 1, figsize=(12, height), squeeze=False)
    for ax, group in zip(axes[:, 0], groups):
        g = [r for r in ok if r.group == group]
        cases = list(dict.fromkeys(r.case for r in g))
        impls = list(dict.fromkeys(r.impl for r in sorted(g, key=lambda r: not r.subject)))
        width = 0.8 / max(len(impls), 1)
        top = 0.0
        for i, impl in enumerate(impls):
            xs, ys, lo, hi, labels = [], [], [], [], []
            mine = [r for r in g if r.impl == impl]
            for j, case in enumerate(cases):
                r = next((r for r in mine if r.case == case), None)
                if r is None:
                    continue
                xs.append(j + (i - (len(impls) - 1) / 2) * width)
                ys.append(r.median_ms)
                lo.append(max(r.median_ms - r.p20_ms, 0))
                hi.append(max(r.p80_ms - r.median_ms, 0))
                labels.append("" if r.subject or r.speedup is None else f"x{r.speedup:.2f}")
            top = max([top] + [y + h for y, h in zip(ys, hi)])
            bars = ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=impl_label(mine[0]),
                          hatch="//" if mine[0].subject else None)
            for b, text, y_end in zip(bars, labels, [y + h for y, h in zip(ys, hi)]):
                if text:
                    ax.annotate(text, (b.get_x() + b.get_width() / 2, y_end), ha="center",
                                va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels(cases, fontsize=8)
        ax.set_ylim(0, top * 1.15 or 1.0)                   # from zero; room for the speedup labels on top
        ax.yaxis.set_major_locator(MaxNLocator(nbins=6))
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.set_ylabel("median ms (p20-p80)")
        ax.set_title(f"[{group}]" if group else op, fontsize=9, loc="left")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
        ax.grid(axis="y", alpha=0.3)
    run = {"quick": "QUICK run (fewer shapes, short timing)", "smoke": "SMOKE run (tiny shapes)"}.get(mode, "full run")
    fig.suptitle(f"{op} on {env.get('device_name', device)} - {run}\n"
                 f"xN above a bar = vlmkern's speedup over it (> 1: vlmkern faster); [..] = backend that ran",
                 fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / height))      # the two title lines take ~0.45 inch
    fig.savefig(path, dpi=110, bbox_inches="tight")            # the legends sit right of the panels
    plt.close(fig)
    return path


# -------------------------------------------------------------------------------------------- display
def format_table(rows: list[Measurement]) -> str:
    """Compact text table: one line per (case, implementation); columns sized to their longest entry."""
    def cells(r: Measurement) -> list[str]:
        if r.status != "ok":
            return [r.case, r.impl, str(r.backend or ""), f"{r.status}: {r.note[:90]}"]
        t = f"{r.median_ms:.3f} ({r.p20_ms:.3f}, {r.p80_ms:.3f})"
        if r.graph_ms is not None:
            t += f" graph {r.graph_ms:.3f}"
        pct = "" if r.pct_gemm_peak is None else f"{r.pct_gemm_peak:.0f}%/{r.pct_copy_peak:.0f}%"
        return [r.case, r.impl, str(r.backend or ""), t,
                "-" if r.peak_mem_mb is None else f"{r.peak_mem_mb:.1f}",
                "-" if r.tflops is None else f"{r.tflops:.3g}", "-" if r.gbps is None else f"{r.gbps:.3g}", pct,
                "subject" if r.subject else ("-" if r.speedup is None else f"{r.speedup:.2f}"),
                "" if r.target is None else f">={r.target:g} {'MET' if r.target_met else 'MISSED'}"]

    head = ["case", "impl", "backend", "median ms (p20, p80)", "peak MiB", "TFLOP/s", "GB/s", "%peak F/B",
            "vlmkern x", "target"]
    body = [cells(r) for r in rows]
    ok = [c for c in body if len(c) == len(head)]
    widths = [max([len(head[i])] + [len(c[i]) for c in ok] + [len(c[i]) for c in body if i < 3 and i < len(c)])
              for i in range(len(head))]
    right = {4, 5, 6, 7, 8}

    def line(c: list[str]) -> str:
        if len(c) < len(head):      # skipped / error: the note takes the rest of the line
            return "  ".join(x.ljust(widths[i]) for i, x in enumerate(c[:3])) + "  " + c[3]
        return "  ".join(x.rjust(widths[i]) if i in right else x.ljust(widths[i]) for i, x in enumerate(c)).rstrip()

    text = [line(head)]
    text.append("-" * len(text[0]))
    return "\n".join(text + [line(c) for c in body])
