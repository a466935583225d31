"""The one tolerance rule of the library (README "Correctness rule"), shared by tests, parity and benchmarks.

A vlmkern result passes when its error against a high-precision reference is at most ``FACTOR[kind]``
times the error of plain PyTorch run in the same low precision against that same reference, plus an
absolute floor scaled by the reference's magnitude::

    err(ours)  <=  FACTOR[kind] * err(torch_lowp)  +  FLOOR[dtype] * max(1, max|ref|)

with ``err(x) = max|x - ref|`` computed in float64.

Both sides are single-draw maxima, so on random data the rule has a small false-failure tail: where torch
happens to land near-exact on a tensor, an equally accurate kernel can exceed 3x of it (Mini-Gemini gradients
on 40 seeds: median ratio ours/torch 0.9-1.4, yet single draws up to 14x). The test suite therefore fixes
its data (seeded torch, derandomized Hypothesis in tests/conftest.py), so every run checks the same cases.
"""
from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field

import torch

FACTOR = {"forward": 2.0, "grad": 3.0}

# Absolute floor, relative to max(1, max|ref|): a few units in the last place of each dtype, so that a
# baseline that happens to be exact (err 0) does not demand bit-exactness from a different summation order.
FLOOR = {
    torch.float64: 1e-12,
    torch.float32: 2e-6,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}


def max_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    if x.shape != ref.shape:
        raise AssertionError(f"shape {tuple(x.shape)} != reference shape {tuple(ref.shape)}")
    if x.numel() == 0:
        return 0.0
    diff = (x.detach().to(torch.float64).cpu() - ref.detach().to(torch.float64).cpu()).abs()
    if not torch.isfinite(diff).all():
        return float("inf")
    return diff.max().item()


def bound(baseline: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, kind: str = "forward") -> float:
    scale = max(1.0, ref.detach().abs().max().item()) if ref.numel() else 1.0
    return FACTOR[kind] * max_error(baseline, ref) + FLOOR[dtype] * scale


def assert_close(actual: torch.Tensor, baseline: torch.Tensor, ref: torch.Tensor, *,
                 kind: str = "forward", dtype: torch.dtype | None = None, name: str = "output") -> None:
    """Check ``actual`` against ``ref`` (fp32/fp64 oracle) with ``baseline`` = plain PyTorch in low precision."""
    dtype = dtype or actual.dtype
    err = max_error(actual, ref)
    limit = bound(baseline, ref, dtype, kind)
    if not err <= limit:
        raise AssertionError(
            f"{name}: max error {err:.3e} exceeds {limit:.3e} "
            f"({FACTOR[kind]}x torch {dtype} error {max_error(baseline, ref):.3e} + floor {FLOOR[dtype]:.1e})"
        )


def randomize_(model: torch.nn.Module, std: float = 0.05, weights: bool = True) -> torch.nn.Module:
    """Random values for every parameter of ``model``, in place (LayerNorm weights around 1), so that no bias or
    norm is trivial in a parity test; ``weights=False`` keeps the matrices' own initialisation. Draws from the
    current torch generator (seed it first)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not weights and p.dim() > 1:
                continue
            noise = torch.randn_like(p) * std
            p.copy_(1.0 + 2 * noise if "LayerNorm.weight" in name or "layernorm.weight" in name else noise)
    return model


def assert_compiled_matches_eager(fn, inputs: tuple, *rest, backend: str = "aot_eager") -> None:
    """``torch.compile(fn, fullgraph=True)`` gives eager ``fn``'s scalar loss and the same gradients of
    ``inputs`` (tensors requiring grad); ``rest`` are further arguments without gradients."""
    loss = torch.compile(fn, fullgraph=True, backend=backend)(*inputs, *rest)
    grads = torch.autograd.grad(loss, inputs)
    fresh = tuple(t.detach().requires_grad_() for t in inputs)
    loss_eager = fn(*fresh, *rest)
    torch.testing.assert_close(loss, loss_eager)
    for a, b in zip(grads, torch.autograd.grad(loss_eager, fresh)):
        torch.testing.assert_close(a, b)


def check_against(fn, oracle, *inputs: torch.Tensor, dtype: torch.dtype, check_grads: bool = True,
                  names: str = "qkv") -> torch.Tensor:
    """``fn(*inputs)`` (vlmkern) in ``dtype`` against ``oracle`` in float64, with ``oracle`` in ``dtype`` as the
    baseline of :func:`assert_close`: the output, then (``check_grads``) the gradients of every input for one
    random output gradient (``d<names[i]>`` in messages). Returns ``fn``'s output."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in inputs]
    out = fn(*leaves)
    base_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    base = oracle(*base_leaves)
    ref_leaves = [t.detach().to(torch.float64).requires_grad_() for t in leaves]
    ref = oracle(*ref_leaves)
    assert out.dtype == dtype and out.shape == ref.shape
    assert_close(out, base, ref, name="output")
    if not check_grads:
        return out
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(out, leaves, g.to(dtype))
    base_grads = torch.autograd.grad(base, base_leaves, g.to(dtype))
    ref_grads = torch.autograd.grad(ref, ref_leaves, g)
    for name, a, b, r in zip(names, grads, base_grads, ref_grads):
        assert_close(a, b, r, kind="grad", dtype=dtype, name=f"d{name}")
    return out


def cast_inputs(inputs: dict, dtype: torch.dtype, no_grad=()) -> dict:
    """A model's keyword inputs with every floating tensor detached, cast to ``dtype`` and requiring grad
    (except the keys in ``no_grad``); other values as they are."""
    out = {}
    for k, v in inputs.items():
        if torch.is_tensor(v) and v.is_floating_point():
            v = v.detach().to(dtype).requires_grad_(k not in no_grad)
        out[k] = v
    return out


def run_module(module: torch.nn.Module, x: torch.Tensor, *args) -> tuple:
    """``(output, dx, {name: grad})`` of ``module(x, *args)`` with the loss ``sum(output²)``, from zero gradients
    (parameters that do not require grad are left out)."""
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    y = module(x, *args)
    y.square().sum().backward()
    return y.detach(), x.grad, {n: p.grad for n, p in module.named_parameters() if p.requires_grad}


def assert_same_run(a: tuple, b: tuple) -> None:
    """Two :func:`run_module` results agree: output, input gradient and every parameter's gradient."""
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(a[1], b[1])
    assert set(a[2]) == set(b[2])
    for name in a[2]:
        torch.testing.assert_close(a[2][name], b[2][name], msg=lambda m: f"d{name}: {m}")


def assert_no_host_sync(step) -> None:
    """``step()`` twice on CUDA: a warm-up (compiles, allocates), then under ``torch.cuda.set_sync_debug_mode
    ("error")``, so that any host synchronisation in it raises."""
    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


class AdapterLinear(torch.nn.Module):
    """A low-rank adapter around an ``nn.Linear`` with PEFT ``lora.Linear``'s interface (``base_layer``; ``weight``
    and ``bias`` are the base layer's; forward adds ``scaling · B(A(x))``), with a non-zero ``B`` so that a path
    that reads ``weight`` instead of calling the layer shows. For testing what drop-ins do with adapted layers."""

    def __init__(self, base: torch.nn.Linear, r: int = 4, scaling: float = 2.0, seed: int = 0):
        super().__init__()
        self.base_layer, self.scaling = base, scaling
        self.lora_A = torch.nn.Linear(base.in_features, r, bias=False, device=base.weight.device,
                                      dtype=base.weight.dtype)
        self.lora_B = torch.nn.Linear(r, base.out_features, bias=False, device=base.weight.device,
                                      dtype=base.weight.dtype)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for w in (self.lora_A.weight, self.lora_B.weight):
                w.copy_(torch.randn(w.shape, generator=g) * 0.3)

    weight = property(lambda self: self.base_layer.weight)
    bias = property(lambda self: self.base_layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.lora_B(self.lora_A(x)) * self.scaling


def adapt_(model: torch.nn.Module, path: str, **kwargs) -> AdapterLinear:
    """Replace the ``nn.Linear`` at ``path`` (dotted) in ``model`` by an :class:`AdapterLinear` around it."""
    parent, _, name = path.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    adapter = AdapterLinear(getattr(owner, name), **kwargs)
    setattr(owner, name, adapter)
    return adapter


# ------------------------------------------------------------------------------- out-of-bounds detection
_GUARD_BYTE = 0xFF      # all-ones bytes: NaN in every float dtype, -1 in every signed integer dtype
_GUARD_ALIGN = 64       # guard margins in whole multiples of 64 elements: a placed tensor stays 16-byte aligned


def _span(shape, stride) -> int:
    """Elements from a strided tensor's first to one past its last (0 when it has none)."""
    if any(s == 0 for s in shape):
        return 0
    return 1 + sum((s - 1) * st for s, st in zip(shape, stride))


@contextlib.contextmanager
def _patched(replacements: dict):
    """Each ``(owner, name) -> value`` of ``replacements`` set for the duration; the originals restored after."""
    saved = {key: getattr(*key) for key in replacements}
    for (owner, name), value in replacements.items():
        setattr(owner, name, value)
    try:
        yield
    finally:
        for (owner, name), value in saved.items():
            setattr(owner, name, value)


class GuardedMemory:
    """Out-of-bounds detection for kernels under test, on any device (a GPU, or the CPU under Triton's interpreter,
    which reads and writes by address too): each tensor it makes lies inside a larger buffer whose margins before
    and after hold all-ones bytes (NaN in a float dtype, -1 in an integer one), at least as wide as the tensor.

    * a kernel that reads past an input's bounds reads NaN, which a result compared with an unguarded run shows;
    * a write past an allocation's bounds changes a margin, which :meth:`check` reports (the buffer and side);
    * an allocation's own elements start as NaN / -1 too (:func:`guarded_allocations`), so an output element that
      no kernel writes shows in the result instead of holding whatever memory the allocator handed out.

    Tensors with overlapping elements (``expand``) are placed as they are, unguarded."""

    def __init__(self, margin: int = 1024):
        self.margin = margin
        self._buffers: list[tuple[torch.Tensor, int, int, str]] = []

    def empty_strided(self, shape, stride, dtype: torch.dtype, device, label: str) -> torch.Tensor:
        """An uninitialised-looking (all-ones bytes) tensor of ``shape`` and ``stride`` between two margins."""
        span = _span(shape, stride)
        guard = -(-max(self.margin, span) // _GUARD_ALIGN) * _GUARD_ALIGN
        size = dtype.itemsize
        raw = torch.full(((2 * guard + span) * size,), _GUARD_BYTE, dtype=torch.uint8, device=device)
        self._buffers.append((raw, guard * size, (guard + span) * size, label))
        return raw.view(dtype).as_strided(tuple(shape), tuple(stride), guard)

    def place(self, t: torch.Tensor, label: str) -> torch.Tensor:
        """A guarded copy of ``t``: same values, shape, strides and ``requires_grad`` (a leaf)."""
        if torch._debug_has_internal_overlap(t) != 0:   # 1: overlaps, 2: can't tell
            return t.detach().clone().requires_grad_(t.requires_grad) if t.requires_grad else t
        out = self.empty_strided(t.shape, t.stride(), t.dtype, t.device, label)
        with torch.no_grad():
            out.copy_(t)
        return out.requires_grad_(t.requires_grad)

    def check(self) -> None:
        """AssertionError naming every buffer whose margins were written."""
        bad = []
        for raw, lo, hi, label in self._buffers:
            for side, part in (("before", raw[:lo]), ("after", raw[hi:])):
                n = int((part != _GUARD_BYTE).sum())
                if n:
                    bad.append(f"{label}: {n} byte(s) written {side} its bounds")
        assert not bad, "out-of-bounds writes: " + "; ".join(bad)


@contextlib.contextmanager
def guarded_allocations(memory: GuardedMemory, device):
    """A context manager under which ``torch.empty``, ``torch.empty_like`` and ``torch.empty_strided`` return
    :meth:`GuardedMemory.empty_strided` tensors (same shape, strides, dtype, ``requires_grad``) when on ``device``'s
    type, each labelled with the caller's file and line: the launchers' outputs and scratch buffers."""
    device_type = torch.device(device).type

    def guarded(name):
        make = getattr(torch, name)

        def alloc(*args, **kwargs):
            t = make(*args, **kwargs)
            if t.device.type != device_type or "out" in kwargs:
                return t
            caller = sys._getframe(1)
            label = f"torch.{name} at {'/'.join(caller.f_code.co_filename.rsplit('/', 2)[-2:])}:{caller.f_lineno}"
            return memory.empty_strided(t.shape, t.stride(), t.dtype, t.device, label).requires_grad_(t.requires_grad)
        return alloc

    with _patched({(torch, name): guarded(name) for name in ("empty", "empty_like", "empty_strided")}):
        yield memory


def interpreter_bounds_check(races: bool = False):
    """A context manager under which every load, store and atomic of a kernel run by Triton's interpreter
    (``TRITON_INTERPRET=1``) must address an element of one of that launch's tensor arguments (from its first to
    its last element); anything else raises, naming the kernel, the access and the nearest argument. Stricter than
    :class:`GuardedMemory`, which sees a stray read only when its value reaches a result: this sees one whose
    value a later ``where`` or mask discards, which on a GPU can still fault. Masked-off lanes are not accesses.

    ``races``: also fail when two programs of one launch touch an element that one of them stores to without an
    atomic (both store it, or one loads what the other stores): the interpreter runs programs one after another,
    a GPU runs them at once, in no order, so the result would depend on timing. Atomics are exempt. Costs a Python
    set update per accessed element: for small launches."""
    import numpy as np
    from triton.runtime import interpreter as interp

    # per running launch: (kernel name, [(lo, hi, argument name)], element -> first storing program,
    #                      element -> first loading program or -1)
    ranges: list = []
    owners = {name: interp.GridExecutor for name in ("_init_args_hst", "__call__")}
    owners.update({name: interp.InterpreterBuilder
                   for name in ("create_masked_load", "create_masked_store", "create_atomic_rmw", "create_atomic_cas")})
    saved = {name: getattr(owner, name) for name, owner in owners.items()}

    def extent(t: torch.Tensor) -> tuple[int, int]:
        return t.data_ptr(), t.data_ptr() + t.element_size() * _span(t.shape, t.stride())

    def init_args_hst(self, args_dev, kwargs):
        args_hst, kwargs_hst = saved["_init_args_hst"](self, args_dev, kwargs)
        named = [(f"argument {i}", a) for i, a in enumerate(args_hst)] + list(kwargs_hst.items())
        ranges.append((getattr(self.fn, "__name__", "kernel"),
                       [(*extent(a), name) for name, a in named if isinstance(a, torch.Tensor)], {}, {}))
        return args_hst, kwargs_hst

    def call(self, *args, **kwargs):
        depth = len(ranges)
        try:
            return saved["__call__"](self, *args, **kwargs)
        finally:
            del ranges[depth:]

    def check(ptrs, mask, what: str) -> None:
        if not ranges:
            return
        addr = np.asarray(ptrs.data).astype(np.int64)
        if mask is not None:
            addr = addr[np.broadcast_to(np.asarray(mask.data, dtype=bool), addr.shape)]
        if addr.size == 0:
            return
        size = max(1, ptrs.get_element_ty().primitive_bitwidth // 8)
        kernel, args, writers, readers = ranges[-1]
        if races and what in ("load", "store"):
            record(kernel, args, writers, readers, addr, what)
        first, last = int(addr.min()), int(addr.max())
        for lo, hi, _ in args:          # the usual access: every address inside one argument
            if lo <= first and last + size <= hi:
                return
        inside = np.zeros(addr.shape, dtype=bool)
        for lo, hi, _ in args:
            inside |= (addr >= lo) & (addr + size <= hi)
        if inside.all():
            return
        bad = int(addr[~inside][0])
        lo, hi, name = min(args, key=lambda r: min(abs(bad - r[0]), abs(bad - r[1])),
                           default=(bad, bad, "no tensor argument"))
        where = f"{(bad - lo) // size} elements from the start" if bad < lo else f"{(bad - hi) // size} past the end"
        raise AssertionError(f"{kernel}: {what} of {int((~inside).sum())} element(s) outside every tensor argument; "
                             f"the first is {where} of {name} ({(hi - lo) // size} elements)")

    def record(kernel, args, writers, readers, addr, what) -> None:
        """Per element, the program that first stored it and the first that loaded it (-1: several did)."""
        program = interp.interpreter_builder.grid_idx
        for a in set(addr.tolist()):
            writer = writers.get(a)
            if what == "store":
                other = writer if writer is not None and writer != program else readers.get(a)
                if other is not None and other != program:
                    race(kernel, args, a, program, other, "stores to an element that program {} " +
                         ("also stores to" if other == writer else "loads"))
                writers[a] = program
            else:
                if writer is not None and writer != program:
                    race(kernel, args, a, program, writer, "loads an element that program {} stores to")
                seen = readers.get(a)
                readers[a] = program if seen is None or seen == program else -1

    def race(kernel, args, address, program, other, text) -> None:
        name = next((n for lo, hi, n in args if lo <= address < hi), "an argument")
        other = "another" if other == -1 else other
        raise AssertionError(f"{kernel}: race: program {program} {text.format(other)} (in {name}), "
                             f"with no atomic between them")

    def masked_load(self, ptrs, mask, other, cache_policy, is_volatile):
        check(ptrs, mask, "load")
        return saved["create_masked_load"](self, ptrs, mask, other, cache_policy, is_volatile)

    def masked_store(self, ptrs, value, mask, cache_policy):
        check(ptrs, mask, "store")
        return saved["create_masked_store"](self, ptrs, value, mask, cache_policy)

    def atomic_rmw(self, op, ptr, val, mask, sem, scope):
        check(ptr, mask, "atomic")
        return saved["create_atomic_rmw"](self, op, ptr, val, mask, sem, scope)

    def atomic_cas(self, ptr, cmp, val, sem, scope):
        check(ptr, None, "atomic compare-and-swap")
        return saved["create_atomic_cas"](self, ptr, cmp, val, sem, scope)

    replacements = {"_init_args_hst": init_args_hst, "__call__": call, "create_masked_load": masked_load,
                    "create_masked_store": masked_store, "create_atomic_rmw": atomic_rmw,
                    "create_atomic_cas": atomic_cas}
    return _patched({(owners[name], name): fn for name, fn in replacements.items()})


# ------------------------------------------------------------------------------- activation memory
@dataclass
class SavedMemory:
    """What one forward keeps alive for its backward (:func:`saved_activation_memory`).

    ``bytes``: the sum over unique storages; ``count``: how many unique storages; ``largest``: up to ``top``
    ``(bytes, shape, dtype, maker)`` of the largest, biggest first: one saved tensor per storage, and ``maker`` the
    name of the autograd node that made it (its ``grad_fn``; ``"-"`` for a tensor made without one, e.g. a kernel's
    statistics, or the ``ctx`` class for one held as a ``ctx`` attribute)."""
    bytes: int
    count: int
    largest: list = field(default_factory=list)

    def describe(self) -> str:
        """One line: total, count and the largest saved tensors, for a failure message."""
        parts = ", ".join(f"{node} {tuple(shape)} {str(dtype).removeprefix('torch.')} {n} B"
                          for n, shape, dtype, node in self.largest)
        return f"{self.bytes} B in {self.count} storage(s): {parts}"


def _ctx_tensors(roots) -> list:
    """``(tensor, node name)`` of every tensor held as an attribute of a custom autograd Function's ``ctx`` in the
    graph behind ``roots`` (``ctx.x = t`` is not a save, so no saved-tensor hook sees it, yet it is kept alive)."""
    found, seen, stack = [], set(), [r for r in roots if r is not None]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        for value in getattr(node, "__dict__", {}).values():
            for t in (value if isinstance(value, (tuple, list)) else (value,)):
                if torch.is_tensor(t):
                    found.append((t, type(node).__name__))
        stack.extend(fn for fn, _ in node.next_functions if fn is not None)
    return found


def saved_activation_memory(module: torch.nn.Module, *inputs, top: int = 4, **kwargs) -> SavedMemory:
    """Bytes that ``module(*inputs, **kwargs)``, run in train mode with autograd on, keeps alive for its backward.

    Every tensor an autograd node saves (``save_for_backward``, the saved inputs/outputs of built-in ops) passes
    through ``torch.autograd.graph.saved_tensors_hooks``; so does nothing else. Tensors a custom Function holds as
    ``ctx`` attributes (not saves) are found by walking the output's graph and counted too. Each is counted by its
    whole storage (a saved view keeps its base alive), each storage once (``untyped_storage().data_ptr()``).
    Storages of the module's parameters and buffers and of the tensor ``inputs`` (positional or keyword) are left
    out: they exist whether or not a backward follows. The module's output is counted when an op saves it (the
    backward then needs it even after the caller drops it). The module is put in train mode and restored.

    What an op saves depends on the device only where torch picks a different kernel per device: CPU dropout saves
    an fp32 noise tensor where CUDA's saves a bool mask, and ``F.scaled_dot_product_attention`` picks its kernel per
    device. Compare an original and a drop-in on the same device; the allocator's rounding is not included."""
    was_training = module.training
    saved = []

    def pack(t):
        saved.append((t, t.grad_fn))   # held until the count is done: a freed storage's address could be reused
        return t

    module.train()
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = module(*inputs, **kwargs)
    finally:
        module.train(was_training)
    outs = [o for o in _flatten(out) if torch.is_tensor(o)]
    held = [(t, None if g is None else type(g).__name__) for t, g in saved]
    held += _ctx_tensors([o.grad_fn for o in outs])
    exclude = {t.untyped_storage().data_ptr() for t in (*module.parameters(), *module.buffers(),
                                                        *_flatten((inputs, kwargs))) if torch.is_tensor(t)}
    unique = {}
    for t, node in held:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in exclude or storage.nbytes() == 0 or ptr in unique:
            continue
        unique[ptr] = (storage.nbytes(), tuple(t.shape), t.dtype, node or "-")
    ranked = sorted(unique.values(), key=lambda r: -r[0])
    return SavedMemory(sum(r[0] for r in ranked), len(ranked), ranked[:top])


def _flatten(obj) -> list:
    """The leaves of nested tuples, lists, dicts and ``ModelOutput``-like mappings."""
    if isinstance(obj, dict) or hasattr(obj, "values") and hasattr(obj, "keys"):
        return [x for v in obj.values() for x in _flatten(v)]
    if isinstance(obj, (tuple, list)):
        return [x for v in obj for x in _flatten(v)]
    return [obj]
