"""Host (Python) overhead per call of every public op, with the Triton kernel launches stubbed out (or made).

    python -m benchmarks.host_overhead [--device cpu|cuda] [--launches stubbed|real] [--calls N] [--rounds R]
                                       [--only NAME] [--json PATH] [--profile NAME]

What it measures: the CPU time of one forward (inputs without grad) and of one forward + backward (inputs
with grad, ``torch.autograd.backward`` with a preallocated gradient into leaves whose ``.grad`` is None, as after
``optimizer.zero_grad()``: stored, not added to an earlier one) of each public op on its Triton path, on
tiny tensors, with every ``kernel[grid](...)`` replaced by a no-op: argument checks, backend selection, the
eager path or the dispatcher, autograd, output allocation and launch-parameter computation; no kernel work.
``--device cpu`` (default, any machine) runs the Triton path on CPU tensors the way the tests do
(``TRITON_INTERPRET=1``, ``VLMKERN_BACKEND=triton``) with the interpreter's launch replaced; ``--device cuda``
(a GPU host, what users run) uses CUDA tensors with the compiled kernels' launch replaced. Outputs are the
kernels' uninitialised buffers; nothing is checked for values.

Reported: per op the best and the median over ``R`` rounds of the mean CPU time (the wall clock of a shared
machine mostly measures waiting for a core; on the CPU the calling thread's, on CUDA the process's, which holds
autograd's device thread that runs a CUDA backward) of ``N`` back-to-back calls, in microseconds,
next to the targets (<= 40 us per forward, <= 120 us per forward + backward; issue 15), judged on the best round:
the cost of the code itself, as ``timeit`` reports it (other processes only ever add to a round, never take
away). Rounds go round-robin over every row, so load that comes and goes on a shared machine hits all rows alike.
Beside the times, two counts that do not depend on the machine or its load: the Python function calls one call
makes (every Python frame entered, torch's included, and those in vlmkern's files), from ``sys.setprofile`` over
one warm call. Yardsticks measured in the same rounds: ``F.scaled_dot_product_attention`` and ``F.linear`` doing
real work on equally tiny tensors (torch's own eager path), and two floors: an empty ``torch.library.custom_op``
with autograd, and an empty ``torch.autograd.Function``: no op with a custom backward can cost less than the
latter on this machine. Beside each op, measured in the same rounds, its own contract floor (:class:`_FloorFunction`):
the autograd.Function call its eager path makes, same inputs, outputs and gradients, with bodies that only
allocate; a target below an op's floor is out of reach for any implementation as an autograd.Function on this
machine, and the verdict says so. The figures depend on the CPU and on its load; say which.

:func:`repeat_call_trace` lists the vlmkern functions a warm call runs; the tests check that none of them is an
argument check, a backend selection or a launch-plan builder: those run once per input signature.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

FWD_TARGET_US = 40.0
FWD_BWD_TARGET_US = 120.0


@contextmanager
def stubbed_launches(device: str = "cpu", stub: bool = True):
    """The Triton path forced (``VLMKERN_BACKEND=triton``) and every ``kernel[grid](...)`` a no-op, for the
    duration; both restored afterwards. ``device="cpu"``: interpreted kernels, which needs ``TRITON_INTERPRET=1``
    from before the kernel modules were imported (``main`` sets it; the tests' conftest does); ``"cuda"``:
    compiled kernels (``TRITON_INTERPRET`` unset). ``stub=False`` (``--launches real``, CUDA only): the launches
    run, so that a call's host time includes Triton's own launch path (argument binding, specialisation, the
    driver call) as a user's does."""
    if not stub:
        if device != "cuda":
            raise ValueError("real launches are measured on CUDA only (interpreted kernels would do their work)")
        backend = os.environ.get("VLMKERN_BACKEND")
        os.environ["VLMKERN_BACKEND"] = "triton"
        try:
            yield
        finally:
            if backend is None:
                os.environ.pop("VLMKERN_BACKEND", None)
            else:
                os.environ["VLMKERN_BACKEND"] = backend
        return
    if device == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("host_overhead on the CPU needs TRITON_INTERPRET=1 set before triton is imported "
                               "(run it as python -m benchmarks.host_overhead)")
        from triton.runtime.interpreter import InterpretedFunction as Launched
    else:
        from triton.runtime.jit import JITFunction as Launched
    own = Launched.__dict__.get("__getitem__")        # None: inherited (KernelInterface's)
    backend = os.environ.get("VLMKERN_BACKEND")
    Launched.__getitem__ = lambda self, grid: _noop
    os.environ["VLMKERN_BACKEND"] = "triton"
    try:
        yield
    finally:
        if own is None:
            del Launched.__getitem__
        else:
            Launched.__getitem__ = own
        if backend is None:
            os.environ.pop("VLMKERN_BACKEND", None)
        else:
            os.environ["VLMKERN_BACKEND"] = backend


def _noop(*args, **kwargs) -> None:
    return None


def _t(*shape, dtype=torch.float32, grad=False, gen=None, device="cpu") -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=dtype).to(device).requires_grad_(grad)


# Each case: name -> builder(grad) returning (call, tensors that receive gradients). Tiny shapes: the host
# path does not depend on them, and torch work inside the ops layer (if any) stays negligible. patchify has no
# Triton path (its backends are the C++ / CUDA extensions), so it is not among them.
def _cases(device: str = "cpu") -> dict[str, Callable[[bool], tuple[Callable[[], torch.Tensor], list[torch.Tensor]]]]:
    from vlmkern import ops
    g = torch.Generator().manual_seed(0)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16   # what the interpreter computes right / users run
    t = lambda *s, grad=False: _t(*s, grad=grad, gen=g, device=device, dtype=dtype)  # noqa: E731

    def qformer(grad):
        q, k, v = (t(2, 2, 16, 32, grad=grad) for _ in range(3))
        return lambda: ops.qformer_attention(q, k, v, num_query=8, mode="bidirectional"), [q, k, v]

    def cross(grad):
        q, k, v = t(2, 2, 8, 32, grad=grad), t(2, 2, 16, 32, grad=grad), t(2, 2, 16, 32, grad=grad)
        return lambda: ops.cross_attention(q, k, v), [q, k, v]

    def gather(gelu):
        def build(grad):
            x, w, b = t(16, 8, grad=grad), t(16, 32, grad=grad), t(16, grad=grad)
            idx = torch.randint(0, 16, (6, 4), generator=g).to(device)
            fn = ops.gather_linear_gelu if gelu else ops.gather_linear
            return lambda: fn(x, idx, w, b), [x, w, b]
        return build

    def patch_embed(grad):   # patch 4, not Fuyu's 30: the GEMM it runs through torch is real work on a CPU
        pix = torch.randint(0, 256, (1, 3, 8, 8), generator=g, dtype=torch.uint8).to(device)
        w, b = t(16, 48, grad=grad), t(16, grad=grad)
        return lambda: ops.patch_embed(pix, w, b, patch_size=4), [w, b]

    def linear_gelu(grad):
        x, w, b = t(8, 32, grad=grad), t(64, 32, grad=grad), t(64, grad=grad)
        return lambda: ops.linear_gelu(x, w, b), [x, w, b]

    def plora(grad):
        x, w, b = t(16, 32, grad=grad), t(32, 32, grad=grad), t(32, grad=grad)
        a, lb = t(4, 32, grad=grad), t(32, 4, grad=grad)
        mask = torch.arange(16, device=device) < 8
        return lambda: ops.partial_lora_linear(x, w, b, a, lb, mask, 2.0), [x, w, b, a, lb]

    def expert(grad):
        x, w0, w1 = t(16, 32, grad=grad), t(32, 32, grad=grad), t(32, 32, grad=grad)
        ids = (torch.arange(16, device=device) < 8).to(torch.int32)
        return lambda: ops.expert_linear(x, [w0, w1], ids), [x, w0, w1]

    def window(grad):
        u, h = t(1, 4, 16, grad=grad), t(1, 16, 4, 4, grad=grad)
        return lambda: ops.window_attention(u, h)[0], [u, h]

    def expert_ids(grad):
        types = torch.randint(0, 2, (2, 16), generator=g).to(device)
        return lambda: ops.cogvlm_expert_ids(types), []

    def sdpa(grad):  # yardstick: torch's own fused op doing real work on tiny tensors
        q, k, v = (t(2, 2, 16, 32, grad=grad) for _ in range(3))
        return lambda: F.scaled_dot_product_attention(q, k, v), [q, k, v]

    def linear(grad):
        x, w, b = t(8, 32, grad=grad), t(64, 32, grad=grad), t(64, grad=grad)
        return lambda: F.linear(x, w, b), [x, w, b]

    def empty_custom_op(grad):
        x, w = t(8, 32, grad=grad), t(64, 32, grad=grad)
        return lambda: _empty_op(x, w), [x, w]

    def empty_function(grad):
        x, w = t(8, 32, grad=grad), t(64, 32, grad=grad)
        return lambda: _EmptyFunction.apply(x, w), [x, w]

    return {"qformer_attention": qformer, "cross_attention": cross, "gather_linear": gather(False),
            "gather_linear_gelu": gather(True), "patch_embed": patch_embed,
            "linear_gelu": linear_gelu, "partial_lora_linear": plora, "expert_linear": expert,
            "window_attention": window, "cogvlm_expert_ids": expert_ids,
            "torch sdpa (real work)": sdpa, "torch F.linear (real work)": linear,
            "floor: empty custom op": empty_custom_op, "floor: empty autograd.Function": empty_function}


YARDSTICKS = ("torch sdpa (real work)", "torch F.linear (real work)", "floor: empty custom op",
              "floor: empty autograd.Function")


# The floors: what torch.library and autograd cost around a body that does nothing but allocate its output.
@torch.library.custom_op("vlmkern_bench::empty", mutates_args=())
def _empty_op(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


_empty_op.register_fake(lambda x, w: torch.empty_like(x))
_empty_op.register_autograd(lambda ctx, g: (g, None), setup_context=lambda ctx, inputs, output: None)


class _EmptyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w):
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx, g):
        return g, None


# The contract floor of an op: the same autograd.Function call its eager path makes (the same inputs, outputs
# and gradients) with bodies that only allocate: the forward its outputs (as the recorded call's), the backward
# one gradient per input that needs one; without gradients, as the eager path, no Function: one allocation. No
# implementation of the op's contract as an autograd.Function (the eager path's, or any other) can cost less:
# what an op costs above it is its own checks, selection, plans and launches. A list argument (expert weights)
# comes flattened, as the eager path passes it.
class _FloorFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, outputs, *inputs):
        ctx.save_for_backward(*[t for t in inputs if isinstance(t, torch.Tensor)])
        outs = tuple(torch.empty(shape, dtype=dtype, device=device) for shape, dtype, device, _ in outputs)
        ctx.mark_non_differentiable(*[o for o, spec in zip(outs, outputs) if not spec[3]])
        return outs if len(outs) > 1 else outs[0]

    @staticmethod
    def backward(ctx, *grads):
        saved = iter(ctx.saved_tensors)
        needs = ctx.needs_input_grad[1:]
        grads_in = []
        for need, t in zip(needs, ctx.inputs_are_tensors):
            tensor = next(saved) if t else None
            grads_in.append(torch.empty_like(tensor) if need else None)
        return (None, *grads_in)


def _floor_call(op_call) -> Callable[[], torch.Tensor]:
    """The contract floor's call for one recorded eager op call ``(eager_op, args, output)``."""
    _, args, output = op_call
    flat = [t for a in args for t in (a if type(a) is list else (a,))]
    outs = output if isinstance(output, tuple) else (output,)
    spec = tuple((o.shape, o.dtype, o.device, o.is_floating_point() and o.requires_grad) for o in outs)
    are_tensors = tuple(isinstance(t, torch.Tensor) for t in flat)

    class Floor(_FloorFunction):
        @staticmethod
        def forward(ctx, outputs, *inputs):
            ctx.inputs_are_tensors = are_tensors
            return _FloorFunction.forward(ctx, outputs, *inputs)

    def call():
        if not (torch.is_grad_enabled() and torch._C._any_requires_grad(*flat)):   # as the eager path: no Function
            return torch.empty(spec[0][0], dtype=spec[0][1], device=spec[0][2])  # (the first output stands for all)
        out = Floor.apply(spec, *flat)
        return out[0] if isinstance(out, tuple) else out
    return call


def _recorded_op_call(call: Callable[[], torch.Tensor]):
    """``(eager_op, args, output)`` of the first eager custom-op call ``call()`` makes, or None."""
    from vlmkern.ops import dispatch
    seen = []
    original = dispatch.EagerOp.__call__

    def spy(self, *args):
        out = original(self, *args)
        if not seen:
            seen.append((self, args, out))
        return out
    dispatch.EagerOp.__call__ = spy
    try:
        call()
    finally:
        dispatch.EagerOp.__call__ = original
    return seen[0] if seen else None


def _timed_round(step: Callable[[], None], calls: int, device: str = "cpu") -> float:
    """Mean per-call CPU time over ``calls`` back-to-back calls, in microseconds: CPU time, not wall time (on a
    shared machine the wall clock mostly measures the wait for a core; the host overhead is the CPU work the call
    itself does). :func:`_cpu_clock` says whose."""
    clock = _cpu_clock(device)
    t0 = clock()
    for _ in range(calls):
        step()
    return (clock() - t0) / calls / 1e3


def _cpu_clock(device: str) -> Callable[[], int]:
    """The CPU-time clock (ns) that holds a call's host work. On the CPU, this thread's: autograd runs a CPU
    graph's backward on the calling thread, and the process clock would add the intra-op pool's spinning. On
    CUDA, the process's: autograd runs a CUDA graph's backward on its own device thread while the caller waits
    (no CPU time), so the calling thread's clock would leave the backward out."""
    return time.thread_time_ns if device == "cpu" else time.process_time_ns


def _steps(build, train: bool, floor: bool = False) -> Optional[Callable[[], None]]:
    """One forward (``train`` False, under ``no_grad``) or forward + backward of a case; ``floor``: of its
    contract floor (:class:`_FloorFunction`) instead, None for a case without an eager op call."""
    call, leaves = build(train)
    if floor:
        recorded = _recorded_op_call(call)
        if recorded is None:
            return None
        call = _floor_call(recorded)
    if not train:
        def fwd() -> None:
            with torch.no_grad():
                call()
        return fwd
    if not leaves:
        return None
    grad = torch.ones_like(call())

    def fwd_bwd() -> None:
        for t in leaves:     # as after optimizer.zero_grad(): a leaf's gradient is stored, not added to an old one
            t.grad = None
        torch.autograd.backward(call(), grad)
    return fwd_bwd


def measure(calls: int = 200, rounds: int = 15, only: Optional[str] = None, device: str = "cpu",
            stub: bool = True) -> list[dict]:
    """One row per op (and yardstick): ``fwd_us`` / ``fwd_bwd_us`` the best of ``rounds`` round-robin rounds,
    ``*_us_median`` the median round, ``*_py`` / ``*_vlmkern`` the Python calls per call (:func:`count_calls`),
    ``*_floor_us`` the op's contract floor (:class:`_FloorFunction`). ``stub=False``: real launches (CUDA)."""
    torch.set_num_threads(1)   # tiny tensors: intra-op worker wake-ups would dominate on a shared machine
    rows, steps = [], []
    with stubbed_launches(device, stub):
        for name, build in _cases(device).items():
            if only and only not in name:
                continue
            row = dict(op=name, yardstick=name in YARDSTICKS)
            rows.append(row)
            for key, train in (("fwd", False), ("fwd_bwd", True)):
                row.update({f"{key}_us": None, f"{key}_us_median": None, f"{key}_py": None, f"{key}_vlmkern": None,
                            f"{key}_floor_us": None})
                for floor in (False, True):
                    step = None if floor and row["yardstick"] else _steps(build, train, floor)
                    if step is None:
                        continue
                    for _ in range(max(3, calls // 10)):   # warm: first-call imports, selection memo, caches
                        step()
                    if not floor:
                        row[f"{key}_py"], row[f"{key}_vlmkern"] = count_calls(step, device)
                    steps.append((row, key + "_floor" if floor else key, step, []))
        for _ in range(rounds):
            for row, key, step, times in steps:
                times.append(_timed_round(step, calls, device))
                if device == "cuda":
                    torch.cuda.synchronize()
        for row, key, step, times in steps:
            row[f"{key}_us"] = round(min(times), 1)
            if not key.endswith("_floor"):
                row[f"{key}_us_median"] = round(statistics.median(times), 1)
    return rows


_VLMKERN_DIR = str(Path(__file__).resolve().parents[1] / "vlmkern")


def _in_vlmkern(code) -> bool:
    return code.co_filename.startswith(_VLMKERN_DIR)


def count_calls(step: Callable[[], None], device: str = "cpu") -> tuple[int, int]:
    """``(python, vlmkern)``: the Python function calls (frames entered; a generator's resumptions count) of
    one ``step()``, all of them and those in vlmkern's own files. The same on every machine and under any load:
    the part of the host overhead that code changes move. On CUDA the backward's calls happen on autograd's device
    thread: counted there too where Python can profile every thread (3.12+, after a warm call has started it)."""
    counts = [0, 0]

    def on_event(frame, event, arg):
        if event == "call":
            counts[0] += 1
            counts[1] += _in_vlmkern(frame.f_code)
    every_thread = device != "cpu" and hasattr(threading, "setprofile_all_threads")
    set_profile = threading.setprofile_all_threads if every_thread else sys.setprofile
    set_profile(on_event)
    try:
        step()
    finally:
        set_profile(None)
    return counts[0], counts[1]


def repeat_call_trace(name: str, train: bool, device: str = "cpu") -> list[str]:
    """The vlmkern functions (``module:function``, in call order, repeats kept) that a warm call of op ``name``
    runs (its forward, or forward and backward), after two calls with the same inputs."""
    seen: list[str] = []

    def on_event(frame, event, arg):
        if event == "call" and _in_vlmkern(frame.f_code):
            seen.append(f"{frame.f_globals.get('__name__', '?')}:{frame.f_code.co_name}")
    with stubbed_launches(device):
        step = _steps(_cases(device)[name], train)
        if step is None:
            return seen
        step()
        step()
        sys.setprofile(on_event)
        try:
            step()
        finally:
            sys.setprofile(None)
    return seen


def _meets(row: dict) -> bool:
    return (row["fwd_us"] is None or row["fwd_us"] <= FWD_TARGET_US) and \
        (row["fwd_bwd_us"] is None or row["fwd_bwd_us"] <= FWD_BWD_TARGET_US)


def verdict(row: dict) -> str:
    """``met``, or ``MISSED`` with the parts missed; a part whose contract floor (:class:`_FloorFunction`)
    already exceeds its target says so: no implementation as an autograd.Function meets it on this machine."""
    if row["yardstick"]:
        return "yardstick"
    missed = []
    for key, target, label in (("fwd", FWD_TARGET_US, "fwd"), ("fwd_bwd", FWD_BWD_TARGET_US, "fwd+bwd")):
        if row[f"{key}_us"] is not None and row[f"{key}_us"] > target:
            floor = row.get(f"{key}_floor_us")
            missed.append(f"{label} (floor {floor:.1f} > {target:.0f})" if floor is not None and floor > target
                          else label)
    return "met" if not missed else "MISSED " + ", ".join(missed)


def format_rows(rows: list[dict]) -> str:
    def cell(r, key):
        return "-" if r[f"{key}_us"] is None else f"{r[f'{key}_us']:.1f} ({r[f'{key}_us_median']:.0f})"

    def floor(r, key):
        value = r.get(f"{key}_floor_us")
        return "-" if value is None else f"{value:.1f}"

    def calls(r, key):
        return "-" if r[f"{key}_py"] is None else f"{r[f'{key}_py']}/{r[f'{key}_vlmkern']}"
    out = [f"{'op':31s} {'fwd us':>14s} {'fwd+bwd us':>14s} {'floor: fwd':>10s} {'fwd+bwd':>8s} {'calls: fwd':>11s} "
           f"{'fwd+bwd':>8s}  target (<= {FWD_TARGET_US:.0f} / <= {FWD_BWD_TARGET_US:.0f} us, best round)",
           f"{'':31s} {'best (median)':>14s} {'best (median)':>14s} {'best':>10s} {'best':>8s} {'py/vlmkern':>11s}"]
    for r in rows:
        out.append(f"{r['op']:31s} {cell(r, 'fwd'):>14s} {cell(r, 'fwd_bwd'):>14s} {floor(r, 'fwd'):>10s} "
                   f"{floor(r, 'fwd_bwd'):>8s} {calls(r, 'fwd'):>11s} {calls(r, 'fwd_bwd'):>8s}  {verdict(r)}")
    return "\n".join(out)


def profile(name: str, train: bool, calls: int = 300, top: int = 25, device: str = "cpu") -> str:
    """cProfile of ``calls`` stubbed calls of op ``name``: the functions with the most own time. cProfile sees
    the calling thread only: on CUDA a backward runs on autograd's device thread and is not in it."""
    torch.set_num_threads(1)
    with stubbed_launches(device):
        step = _steps(_cases(device)[name], train)
        step()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(calls):
            step()
        prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats(os.environ.get("HO_SORT", "tottime")).print_stats(top)
    return buf.getvalue()


def _triton_version() -> Optional[str]:
    try:
        import triton
        return triton.__version__
    except ImportError:
        return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.host_overhead", description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="cpu: interpreted kernels, any machine; cuda: a GPU host's real path")
    ap.add_argument("--launches", choices=("stubbed", "real"), default="stubbed",
                    help="stubbed: kernel launches replaced by a no-op (the target's measure); real (cuda only): "
                         "launched, so Triton's own launch path counts too")
    ap.add_argument("--calls", type=int, default=200, help="back-to-back calls per round")
    ap.add_argument("--rounds", type=int, default=15, help="rounds; the median round is reported")
    ap.add_argument("--only", default=None, help="only ops whose name contains this")
    ap.add_argument("--json", default=None, metavar="PATH")
    ap.add_argument("--profile", default=None, metavar="OP", help="print a cProfile of OP's fwd+bwd instead")
    args = ap.parse_args(argv)
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"     # before any kernel module is imported: kernels are interpreted
    elif os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available():
        ap.error("--device cuda needs a CUDA device and TRITON_INTERPRET unset")
    if args.launches == "real" and args.device != "cuda":
        ap.error("--launches real needs --device cuda")
    if args.profile:
        print(profile(args.profile, True, device=args.device))
        return 0
    stub = args.launches == "stubbed"
    rows = measure(args.calls, args.rounds, args.only, args.device, stub)
    from benchmarks.harness import cpu_model
    machine = (f"{cpu_model()}, {os.cpu_count()} CPUs, "
               f"load {os.getloadavg()[0]:.1f}, {args.device} tensors"
               + (f" on {torch.cuda.get_device_name()}" if args.device == "cuda" else ""))
    print(f"Host overhead per call, kernel launches {args.launches} ({machine}; torch {torch.__version__}):")
    print(format_rows(rows))
    if args.json:
        from benchmarks.harness import git_state
        Path(args.json).write_text(json.dumps(dict(machine=machine, device=args.device, launches=args.launches,
                                                   torch=torch.__version__,
                                                   triton=_triton_version(), **git_state(), calls=args.calls,
                                                   rounds=args.rounds, statistic="best round (median round beside)",
                                                   rows=rows, targets=dict(fwd_us=FWD_TARGET_US,
                                                                           fwd_bwd_us=FWD_BWD_TARGET_US)), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
