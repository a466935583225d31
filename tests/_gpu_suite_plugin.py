"""pytest plugin for tier T1 of ``scripts/gpu_suite.sh``: GPU correctness of every shipped kernel.

Loaded explicitly (``PYTHONPATH=tests python -m pytest -p _gpu_suite_plugin --gpu-suite ...``); the default
test run never imports it, so its time is unchanged.

* ``--gpu-suite``: keep only the kernel tests: those using the ``device`` or ``backend`` fixture (the
  device-parametrized tests of every family: masks, modes, odd sizes, padded rows, dtypes, forward and
  gradients against the reference) and the ``cuda``-marked ones (zero host sync, ...). Everything else is
  deselected.
* ``--gpu-suite-sample N``: at most N of them per family (the CPU dry run).
* ``--gpu-suite-table PATH``: also write the per-family correctness table (passed / failed / skipped) there.
* ``VLMKERN_POISON=1``: ``torch.empty`` / ``empty_like`` / ``Tensor.new_empty`` fill floating tensors with NaN,
  so an output element a kernel forgets to write is NaN, never stale memory that happens to be right.
* ``VLMKERN_TWICE=1``: every ``vlmkern::`` op runs twice on the same inputs; the two results must be equal bit
  for bit (a race or an uninitialised read shows as a difference) and must hold no NaN unless an input did
  (not checked in tests whose name mentions NaN: those expect NaN rows, e.g. out-of-range expert ids).
  The comparison stays on the device until the test ends (a host sync inside a test under
  ``torch.cuda.set_sync_debug_mode("error")`` would fail it), then fails the test.
"""
from __future__ import annotations

import os
import signal
from collections import Counter
from pathlib import Path

import pytest
import torch

# test file stem -> benchmark family (the names of benchmarks/ops/*.py)
FAMILIES = {
    "qformer": ("qformer_attention", "cross_attention", "blip2_qformer", "instructblip_qformer"),
    "routed_linear": ("partial_lora", "plora_module", "expert_linear", "cogvlm_experts"),
    "structured_cross_attention": ("cogagent_cross_attention", "mini_gemini", "qwen_vl_resampler"),
    "patch_embed": ("patch_embed", "patch_embed_linear", "patchify", "fuyu"),
    "projector": ("projector",),
    "packing": ("packing_op", "llava_next", "xcomposer2_hd"),
}
_FILE_FAMILY = {f"test_{stem}.py": fam for fam, stems in FAMILIES.items() for stem in stems}


def op_test_files() -> list[str]:
    """Each family's op-level test file (listed first in FAMILIES), relative to the repository."""
    tests = Path(__file__).resolve().parent
    return [str(next(tests.rglob(f"test_{stems[0]}.py")).relative_to(tests.parent)) for stems in FAMILIES.values()]


def family_of(nodeid: str) -> str:
    return _FILE_FAMILY.get(nodeid.split("::")[0].rsplit("/", 1)[-1], "other")


def _file_rank(item) -> int:
    stem = item.nodeid.split("::")[0].rsplit("/", 1)[-1][len("test_"):-len(".py")]
    return FAMILIES.get(family_of(item.nodeid), ()).index(stem) if family_of(item.nodeid) != "other" else 99


def is_kernel_test(item) -> bool:
    """A test of the kernels on this machine's device: it takes the ``device`` fixture or is ``cuda``-marked; one
    that forces a backend on CPU tensors (``backend`` alone) only where the Triton interpreter runs them (no GPU).
    Not the ``cuda_ext`` tests: T1 runs before the extension's background build is in place (T3 runs them)."""
    if item.get_closest_marker("cuda_ext") is not None:
        return False
    names = getattr(item, "fixturenames", ())
    return ("device" in names or item.get_closest_marker("cuda") is not None
            or ("backend" in names and not torch.cuda.is_available()))


def pytest_addoption(parser):
    g = parser.getgroup("gpu-suite")
    g.addoption("--gpu-suite", action="store_true", help="run only the device-parametrized kernel tests")
    g.addoption("--gpu-suite-sample", type=int, default=0, help="at most N kernel tests per family (0: all)")
    g.addoption("--gpu-suite-table", default=None, help="write the per-family correctness table to this file")


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--gpu-suite"):
        return
    cap = config.getoption("--gpu-suite-sample")
    chosen = [i for i in items if is_kernel_test(i) and (cap == 0 or i.get_closest_marker("slow") is None)]
    if cap:     # a sample: the op-level test files first (each family lists them first), then collection order
        chosen.sort(key=_file_rank)
        per_family = Counter()
        sample = []
        for item in chosen:
            fam = family_of(item.nodeid)
            if per_family[fam] < cap:
                per_family[fam] += 1
                sample.append(item)
        chosen = sample
    keep_ids = {id(i) for i in chosen}
    keep = [i for i in items if id(i) in keep_ids]
    drop = [i for i in items if id(i) not in keep_ids]
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep


# ------------------------------------------------------------------------------------------- poisoning
def _poison(t):
    if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()) and t.numel():
        with torch.no_grad():
            t.fill_(float("nan"))
    return t


def _poisoned(fn):
    def wrapper(*args, **kwargs):
        return _poison(fn(*args, **kwargs))
    wrapper.__wrapped__ = fn
    return wrapper


def install_poison() -> None:
    """Wrap the allocators once per process (idempotent)."""
    if getattr(torch.empty, "__wrapped__", None) is not None:
        return
    torch.empty = _poisoned(torch.empty)
    torch.empty_like = _poisoned(torch.empty_like)
    torch.Tensor.new_empty = _poisoned(torch.Tensor.new_empty)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def uninstall_poison() -> None:
    for owner, name in ((torch, "empty"), (torch, "empty_like"), (torch.Tensor, "new_empty")):
        fn = getattr(owner, name)
        setattr(owner, name, getattr(fn, "__wrapped__", fn))


def pytest_configure(config):
    if config.getoption("--gpu-suite"):
        # A time limit's SIGTERM (and a SIGINT that a shell's background job inherits ignored) ends the run the
        # way Ctrl-C does: pytest still reports what ran and writes its JUnit XML.
        try:
            signal.signal(signal.SIGTERM, _interrupt)
            signal.signal(signal.SIGINT, signal.default_int_handler)
        except ValueError:      # not the main thread (an xdist worker): the controller handles the signal
            pass
    if os.environ.get("VLMKERN_POISON") == "1":
        install_poison()


# ---------------------------------------------------------------------------------------- run twice
def _bits(t: torch.Tensor) -> torch.Tensor:
    ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    if t.is_floating_point() and t.element_size() in ints:
        return t.view(ints[t.element_size()])
    return t


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for y in x:
            yield from _tensors(y)
    elif isinstance(x, dict):
        for y in x.values():
            yield from _tensors(y)


class TwiceMode(torch.utils._python_dispatch.TorchDispatchMode):
    """Runs each functional ``vlmkern::`` op twice; records device-side 'differs' and 'new NaN' flags."""

    namespaces = ("vlmkern",)

    def __init__(self, check_nan: bool = True):
        super().__init__()
        self.check_nan = check_nan
        self.flags: list[tuple[str, str, torch.Tensor]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.namespace not in self.namespaces or func._schema.is_mutable:
            return out
        ins = [t for t in _tensors((args, kwargs)) if t.is_floating_point()]
        outs = [t for t in _tensors(out)]
        if any(t.device.type == "meta" or type(t) is not torch.Tensor for t in outs + ins):
            return out      # fake / traced: nothing ran
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return out      # a CUDA graph capture runs nothing: the flags would hold garbage
        again = list(_tensors(func(*args, **kwargs)))
        name = str(func.name())
        for i, (a, b) in enumerate(zip(outs, again)):
            if a.shape != b.shape or a.dtype != b.dtype:
                raise AssertionError(f"{name}: output {i} changed shape/dtype between two identical calls")
            if a.numel():
                self.flags.append((name, f"output {i} differs bit for bit between two identical calls (race?)",
                                   (_bits(a) != _bits(b)).any()))
                if a.is_floating_point() and self.check_nan:
                    # Inputs on other devices are left out: copying a flag across would sync the host.
                    flags = [t.isnan().any() for t in ins if t.device == a.device]
                    had_nan = torch.stack(flags).any() if flags else torch.zeros((), dtype=torch.bool, device=a.device)
                    self.flags.append((name, f"output {i} holds NaN though no input does (unwritten or poisoned "
                                       "element read)", a.isnan().any() & ~had_nan))
        return out

    def failures(self) -> list[str]:
        return sorted({f"{name}: {what}" for name, what, flag in self.flags if bool(flag)})


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    # torch.compile traces under its own modes; a dispatch mode around it would change what it traces.
    if os.environ.get("VLMKERN_TWICE") != "1" or "compile" in item.nodeid:
        yield
        return
    mode = TwiceMode(check_nan="nan" not in item.name.lower())   # tests about NaN outputs expect some
    with mode:
        outcome = yield
    if outcome.excinfo is None:
        bad = mode.failures()
        if bad:
            outcome.force_exception(AssertionError("VLMKERN_TWICE: " + "; ".join(bad)))


# ------------------------------------------------------------------------------------------ the table
_COUNTS: dict[str, Counter] = {}


def pytest_runtest_logreport(report):
    counts = _COUNTS
    fam = family_of(report.nodeid)
    c = counts.setdefault(fam, Counter())
    if report.when == "call" or (report.when == "setup" and not report.passed):
        c["skipped" if report.skipped else "passed" if report.passed else "failed"] += 1
    elif report.when == "teardown" and report.failed:
        c["failed"] += 1


def correctness_table(counts: dict[str, Counter]) -> str:
    lines = [f"{'family':<28} {'passed':>7} {'failed':>7} {'skipped':>8}"]
    total = Counter()
    for fam in [*FAMILIES, "other"]:
        if fam in counts:
            c = counts[fam]
            total.update(c)
            lines.append(f"{fam:<28} {c['passed']:>7} {c['failed']:>7} {c['skipped']:>8}")
    lines.append(f"{'total':<28} {total['passed']:>7} {total['failed']:>7} {total['skipped']:>8}")
    return "\n".join(lines)


def pytest_terminal_summary(terminalreporter, config):
    if not config.getoption("--gpu-suite"):
        return
    table = correctness_table(_COUNTS)
    notes = [f"poison={os.environ.get('VLMKERN_POISON', '0')} twice={os.environ.get('VLMKERN_TWICE', '0')} "
             f"device={'cuda' if torch.cuda.is_available() else 'cpu (Triton interpreter)'}"]
    if not torch.cuda.is_available():
        from vlmkern.ops.dispatch import interpreter_version_reason
        why = interpreter_version_reason()
        if why:
            notes.append(f"Triton kernel tests skipped on the CPU: {why}")
    text = "T1 correctness per family\n" + table + "\n" + "\n".join(notes)
    terminalreporter.write_sep("=", "gpu suite T1")
    terminalreporter.write_line(text)
    path = config.getoption("--gpu-suite-table")
    if path:
        Path(path).write_text(text + "\n")
