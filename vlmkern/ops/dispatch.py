"""Backend selection that explains itself, and per-device registration of each op's backends.

Every op family registers an :class:`OpDispatch` naming its backends in order of preference, each with a
``not_supported_reasons(*args, **kwargs) -> list[str]`` (empty list = can run), derived from the backend's
:class:`Capabilities` (data: dtypes, head dims, alignment) plus the environment (Triton importable, extension
built, device). :func:`implement` registers a custom op's kernel per device type (``torch.library``'s
``register_kernel``): on each device the op runs the first backend of that device that can take the inputs.

The backends: ``triton`` (``ops/<family>/_triton.py``: launchers beside their build signatures; CUDA tensors,
or CPU tensors under ``TRITON_INTERPRET=1`` when forced), ``cuda`` / ``cpp`` (the compiled extension), and
``reference``: the op family's pure-PyTorch backend (``ops/<family>/_torch.py``), which runs on any device
and never refuses. It computes what the oracle in ``vlmkern.reference`` specifies, written for speed, and
never imports it: the oracle checks it. ``VLMKERN_BACKEND`` in
the environment forces one backend for every op: an op that lacks that backend, or whose forced backend
cannot take an input, raises :class:`BackendNotSupported` saying why instead of silently running another.

Each selection is logged at debug level on the ``vlmkern`` logger: the backend taken and why each
preferred one could not run (``logging.getLogger("vlmkern").setLevel(logging.DEBUG)`` plus a handler). With
debug logging off, a selection is computed once per input signature (device, dtypes, shapes, strides, scalar
arguments and the two environment variables) and then looked up: the reasons depend on nothing else.

Eager calls skip the dispatcher (:class:`EagerOp`): in eager mode, with plain tensors and no torch function /
dispatch mode or functorch transform active, an op's public function runs the same per-device kernel directly,
under a ``torch.autograd.Function`` built from the same setup-context and backward functions when a gradient
is needed. ``torch.compile``, ``make_fx``, ``FakeTensorMode``, ``opcheck``, tensor subclasses and the
functorch transforms see the ``torch.library`` custom op itself.

Double backward (``create_graph=True``): an op's backward runs differentiably, so its torch ops and the forward
ops it calls get their derivatives; the backward ops it calls (:class:`BackwardOp`, kernels of a gradient with no
derivative of their own) tie their results to a node that raises a RuntimeError naming the op if a second
backward reaches it, rather than letting it differentiate them as constants (a silently wrong result).

On CUDA both paths run an implementation with its input's device current (:func:`on_device`): Triton launches on
the current device, and a Python custom op gets no device guard.
"""
from __future__ import annotations

import functools
import importlib
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.autograd.forward_ad as _forward_ad

from vlmkern import _ext

BACKENDS = ("cuda", "triton", "cpp", "reference")
# Device types each backend's launches take ("*": any).
BACKEND_DEVICES = {"cuda": ("cuda",), "triton": ("cuda", "cpu"), "cpp": ("cpu",), "reference": ("*",)}
ENV_VAR = "VLMKERN_BACKEND"

ReasonsFn = Callable[..., list[str]]

log = logging.getLogger("vlmkern.dispatch")


# logging.Logger.isEnabledFor answers from the logger's level cache (a dict) after its first call, in a Python
# frame; ``_debug_cached()`` reads that cache in C (None until the method has filled it, or after a setLevel
# cleared it): ``_debug_cached() or (_debug_cached() is None and _debug_logging())`` is one frame less per call.
_debug_cached = functools.partial(getattr(log, "_cache", {}).get, logging.DEBUG)


def _debug_logging() -> bool:
    return log.isEnabledFor(logging.DEBUG)


class BackendNotSupported(RuntimeError):
    """The requested backend cannot run these inputs; the message lists the reasons."""


# The two variables backend selection reads are read on every call (tests and users change them between calls).
# ``os.environ.get`` of an unset variable raises and catches a KeyError inside (~1 us on a small CPU, several per
# op call). The mapping ``os.environ`` keeps in sync (``_data``: encoded keys and values) is read instead, through
# ``functools.partial(_data.get, key)``: a call of C functions only, no Python frame. The raw (encoded) values
# key the selection memos; they are decoded only where a selection is computed.
_ENV_DATA = getattr(os.environ, "_data", None)
_ENCODE = getattr(os.environ, "encodekey", None)


def _env_reader(name: str) -> Callable[[], object]:
    """``read()``: the raw value of environment variable ``name``, None when unset (:func:`_env_text` decodes)."""
    if _ENV_DATA is None or _ENCODE is None:
        return functools.partial(os.environ.get, name)
    return functools.partial(_ENV_DATA.get, _ENCODE(name))


def _env_text(raw) -> str | None:
    """A raw value of :func:`_env_reader` as text (None stays None)."""
    if raw is None or isinstance(raw, str):
        return raw
    return os.environ.decodevalue(raw) if _ENV_DATA is not None else str(raw)


_forced_raw = _env_reader(ENV_VAR)
_interpret_raw = _env_reader("TRITON_INTERPRET")
# the raw value TRITON_INTERPRET=1 reads as
_INTERPRET_ON = os.environ.encodevalue("1") if _ENV_DATA is not None and hasattr(os.environ, "encodevalue") else "1"


def forced_backend() -> str | None:
    """The backend ``VLMKERN_BACKEND`` forces, or None (read per call: tests and users may change it)."""
    return _parse_forced(_forced_raw())


@functools.lru_cache(maxsize=16)
def _parse_forced(raw) -> str | None:
    value = (_env_text(raw) or "").strip().lower()
    if not value or value == "auto":
        return None
    if value not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={value!r}: expected one of {', '.join(BACKENDS)} or 'auto'")
    return value


def triton_interpreting() -> bool:
    return _interpret_raw() == _INTERPRET_ON


# torch.backends.cuda.matmul.allow_tf32 reads this through a Python __getattr__ (~1.5 us per call)
_allow_tf32 = getattr(torch._C, "_get_cublas_allow_tf32", lambda: torch.backends.cuda.matmul.allow_tf32)


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision matching what torch would do: fp32 GEMMs use TF32 only when the user allowed
    it (``torch.backends.cuda.matmul.allow_tf32``); 16-bit inputs ignore the setting."""
    if dtype == torch.float32 and not _allow_tf32():
        return "ieee"
    return "tf32"


def host_dots(dtype: torch.dtype) -> tuple[bool, str]:
    """``(triton_interpreting(), dot_precision(dtype))`` in one frame: the two constexprs the host decides,
    parts of every launch-plan key."""
    return (_interpret_raw() == _INTERPRET_ON,
            "ieee" if dtype == torch.float32 and not _allow_tf32() else "tf32")


# Triton's interpreter before 3.7 cannot run a loop whose bounds derive from tl.program_id, as the attention
# kernels' key ranges do ("only 0-dimensional arrays can be converted to Python scalars"). Compiled kernels are
# unaffected: the GPU build check compiles every shipped config with Triton 3.6 as well.
MIN_INTERPRETER_TRITON = (3, 7)


def interpreter_version_reason() -> str:
    """Why this Triton's interpreter can't run vlmkern's kernels, or ``""``."""
    import triton
    return _version_reason(triton.__version__)


@functools.lru_cache(maxsize=8)
def _version_reason(version_text: str) -> str:
    version = tuple(int(p) for p in version_text.split("+")[0].split(".")[:2])
    if version < MIN_INTERPRETER_TRITON:
        return (f"the Triton interpreter of triton {version_text} cannot run vlmkern's kernels "
                f"(needs >= {'.'.join(map(str, MIN_INTERPRETER_TRITON))})")
    return ""


def triton_env_reasons(device: torch.device) -> list[str]:
    """Why Triton cannot run on ``device`` at all (independent of the op's inputs)."""
    interpreting = triton_interpreting()
    if device.type == "cpu" and not interpreting:  # decided before importing triton (~1 s) on a CPU-only call
        return ["inputs are on the CPU and TRITON_INTERPRET=1 is not set"]
    try:
        import triton  # noqa: F401
    except Exception as exc:
        return [f"triton is not importable ({exc})"]
    if device.type == "cuda":
        return ["TRITON_INTERPRET=1 is set but inputs are on CUDA"] if interpreting else []
    if device.type == "cpu":
        too_old = interpreter_version_reason()
        if too_old:
            return [too_old]
        # The interpreter is a test tool, orders of magnitude slower than the reference: never picked by default.
        if forced_backend() != "triton":
            return ["on the CPU the Triton interpreter runs only when forced with VLMKERN_BACKEND=triton"]
        return []
    return [f"triton does not run on device type {device.type!r}"]


def _ext_reasons(device: torch.device, want: str, kernel: str, ext, error: str, missing: str) -> list[str]:
    reasons = []
    if device.type != want:
        reasons.append(f"inputs are on {device.type}, the {kernel} needs {want.upper()} tensors")
    if ext is None:
        reasons.append(error or missing)
    return reasons


def cuda_env_reasons(device: torch.device) -> list[str]:
    return _ext_reasons(device, "cuda", "CUDA extension", _ext.cuda_ext(), _ext.cuda_ext_error(),
                        "CUDA extension not built")


def cpu_ext_reasons(device: torch.device) -> list[str]:
    return _ext_reasons(device, "cpu", "C++ CPU kernel", _ext.cpu_ext(), _ext.cpu_ext_error(),
                        "CPU extension not built")


def never_refuses(*_, **__) -> list[str]:
    """The reasons function of the ``reference`` backend, which runs whatever its op's checks let through."""
    return []


_DTYPE_NAME = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32",
               torch.float64: "float64"}


@dataclass(frozen=True)
class Capabilities:
    """What a backend's kernels take, as data; :meth:`reasons` derives the not-supported reasons from it.

    ``dtypes``: floating dtypes the kernels are built for; ``head_dims``: the head dims built (None: any);
    ``alignment``: elements the innermost width must be a multiple of (1: any)."""

    dtypes: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32)
    head_dims: tuple[int, ...] | None = None
    alignment: int = 1

    def reasons(self, dtype: torch.dtype, *, head_dim: int | None = None, width: int | None = None) -> list[str]:
        why = []
        if dtype not in self.dtypes:
            names = ", ".join(_DTYPE_NAME.get(d, str(d)) for d in self.dtypes)
            why.append(f"dtype {_DTYPE_NAME.get(dtype, dtype)} is not supported by the kernels (built for {names})")
        if head_dim is not None and self.head_dims is not None and head_dim not in self.head_dims:
            why.append(f"head_dim {head_dim} (the kernels are built for {self.head_dims})")
        if width is not None and width % self.alignment:
            why.append(f"width {width} is not a multiple of {self.alignment}")
        return why


@dataclass
class OpDispatch:
    """Backends of one op, in preference order; ``reference`` must always be able to run."""

    name: str
    backends: dict[str, ReasonsFn] = field(default_factory=dict)
    _chosen: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def reasons(self, backend: str, *args, **kwargs) -> list[str]:
        if backend not in self.backends:
            return [f"op {self.name} has no {backend} backend"]
        return self.backends[backend](*args, **kwargs)

    def select(self, *args, **kwargs) -> str:
        return self.select_among(tuple(self.backends), *args, **kwargs)

    def select_among(self, names, *args, **kwargs) -> str:
        """:meth:`select` restricted to the backends ``names`` (those registered for one device type).

        Remembered per input signature while debug logging is off (a logged selection is always computed)."""
        env = (_forced_raw(), _interpret_raw())
        if (debug := _debug_cached()) or (debug is None and _debug_logging()):
            return self._select(names, env[0], args, kwargs)
        key = (names, env, argument_key(args), argument_key(tuple(kwargs.values())), tuple(kwargs)) if kwargs else (
            names, env, argument_key(args))
        chosen = self._chosen.get(key)
        if chosen is None:
            chosen = self._select(names, env[0], args, kwargs)
            if len(self._chosen) >= _MAX_REMEMBERED:
                self._chosen.clear()
            self._chosen[key] = chosen
        return chosen

    def forget(self) -> None:
        """Drop the remembered selections (after changing what the reasons read other than the inputs and the
        environment variables, e.g. a test swapping the Triton version)."""
        self._chosen.clear()

    def _select(self, names, raw_forced, args, kwargs) -> str:
        forced = _parse_forced(raw_forced)
        if forced is not None:
            if forced not in self.backends:
                raise BackendNotSupported(
                    f"{ENV_VAR}={forced}: vlmkern::{self.name} has no {forced} backend (its backends: "
                    f"{', '.join(self.backends)}); unset {ENV_VAR} or force one of those")
            why = self.reasons(forced, *args, **kwargs)
            if why:
                raise BackendNotSupported(
                    f"{ENV_VAR}={forced} cannot run vlmkern::{self.name} on these inputs: " + "; ".join(why)
                )
            if log.isEnabledFor(logging.DEBUG):
                log.debug("vlmkern::%s -> %s (forced by %s)", self.name, forced, ENV_VAR)
            return forced
        debug = log.isEnabledFor(logging.DEBUG)  # off: no reason strings joined (host overhead per call)
        skipped = []
        for backend in names:
            why = self.reasons(backend, *args, **kwargs)
            if not why:
                if debug:
                    log.debug("vlmkern::%s -> %s%s", self.name, backend,
                              "".join(f"; not {b}: {'; '.join(w)}" for b, w in skipped))
                return backend
            if debug:
                skipped.append((backend, why))
        raise BackendNotSupported(f"no backend can run vlmkern::{self.name}")  # reference never refuses


def lazy(module: str, name: str) -> Callable:
    """The backend room function ``module.name``, imported on its first call and kept: a Triton room imports
    triton, which only a call that selected Triton should pay for."""
    fn = None

    def resolve() -> Callable:
        nonlocal fn
        if fn is None:
            fn = getattr(importlib.import_module(module), name)
        return fn

    def run(*args):
        return (fn or resolve())(*args)
    run.resolve = resolve     # EagerOp remembers the function itself (one frame less per call)
    return run


def _argument_key_py(values):
    """:func:`argument_key` in Python (where the extension is not built): same classes of keys, another format."""
    # a list comprehension, not a generator: no frame resumed per item
    return tuple([(type(v), v.dtype, v.device, v.layout, v.shape, v.stride()) if isinstance(v, torch.Tensor)
                  else (type(v), _argument_key_py(v)) if isinstance(v, (list, tuple)) else (type(v), v)
                  for v in values])


# What an argument check (checks.once_per_key) and backend selection can depend on in ``values`` (a tuple or
# list): per tensor its type, dtype, device, shape and strides; per list or tuple its type and the same, item by
# item; the type and value of anything else (``1``, ``1.0`` and ``True`` differ). Two calls with equal keys get
# the same check outcome, backend and launch plan. RuntimeError for a tensor without strides (nested; the C++ key
# also for sparse, whose Python strides are zeros), TypeError (on hashing) for an unhashable value. Built in C++
# (vlmkern._C) where the extension is: the walk in Python costs ~4.5 us per call on a small CPU, and each op call
# builds two.
argument_key = getattr(_ext.cpu_ext(), "argument_key", None) or _argument_key_py


def implement(op, dispatch: OpDispatch, impls: dict[str, Callable], probe: Callable[..., tuple]) -> None:
    """Register ``op``'s kernel per device type from ``impls`` (backend name -> function of the op's arguments).

    Each device type gets a kernel that runs the first of its backends (in ``dispatch`` order) that can take
    the inputs (:meth:`OpDispatch.select_among` on what ``probe(*op_args)`` returns: a tuple, passed by position,
    or a dict, passed by name); ``reference`` serves every device type without a kernel of its own. The op's own
    body should be the reference implementation."""
    order = [b for b in dispatch.backends if b in impls]
    devices = {d for b in order for d in BACKEND_DEVICES[b] if d != "*"}
    kernels = _DEVICE_KERNELS.setdefault(op, {})
    _REFERENCE[op] = impls["reference"]
    for device in sorted(devices):
        names = tuple(b for b in order if device in BACKEND_DEVICES[b] or "*" in BACKEND_DEVICES[b])
        if names == ("reference",):
            continue
        choose = _chooser(dispatch, names, impls, probe)
        if device == "cuda":
            def kernel(*args, _choose=choose):
                return _run_on_cuda(_choose(*args), args[0].device.index, *args)
        else:
            def kernel(*args, _choose=choose):
                return _choose(*args)(*args)
        op.register_kernel(device)(kernel)
        kernels[device] = choose


def _chooser(dispatch: OpDispatch, names: tuple[str, ...], impls: dict[str, Callable], probe: Callable):
    """``choose(*op_args)``: the implementation of the backend :meth:`OpDispatch.select_among` takes for the
    arguments, from ``names``."""
    def choose(*args) -> Callable:
        read = probe(*args)
        chosen = (dispatch.select_among(names, **read) if isinstance(read, dict)
                  else dispatch.select_among(names, *read))
        return impls[chosen]
    return choose


def on_device(impl: Callable, device: torch.device) -> Callable:
    """``impl``, run with ``device`` as the current CUDA device when it is not (other devices: ``impl`` itself).

    Triton launches on the *current* device and its current stream, not on the tensors' device, and a Python
    custom op gets no device guard from the dispatcher: a layer on ``cuda:1`` called while ``cuda:0`` is current
    (a model split over GPUs, e.g. ``device_map="auto"``) would launch its kernels on the wrong GPU."""
    if device.type != "cuda":
        return impl
    return functools.partial(_run_on_cuda, impl, device.index)


def _run_on_cuda(impl: Callable, index: int, *args):
    if torch.cuda.current_device() == index:    # the common case: no guard entered
        return impl(*args)
    with torch.cuda.device(index):
        return impl(*args)


def register_autograd(op, backward: Callable, setup_context: Callable) -> None:
    """``op.register_autograd(backward, setup_context=setup_context)``, remembered for :class:`EagerOp`.

    ``backward`` runs as written, differentiably under ``create_graph=True`` (:func:`_first_order_backward`):
    its torch ops and the forward ops it calls have their derivatives; each :class:`BackwardOp` it calls
    refuses a double backward clearly instead."""
    op.register_autograd(_first_order_backward(op._qualname, backward), setup_context=setup_context)
    _AUTOGRAD[op] = (backward, setup_context)     # EagerOp's autograd.Function makes the same check inline


# ------------------------------------------------------------------------------------------ double backward
# Under create_graph=True autograd runs a first-order backward with grad mode on, and differentiates what it
# computes. A backward op (BackwardOp: a kernel of a gradient) has no derivative, so its result must not reach a
# second backward as a constant: it would silently drop the terms through it. Its result is tied instead to a
# node whose backward raises, anchored on everything it may depend on: its own arguments and, because a saved
# output can be marked non-differentiable while it depends on inputs (partial LoRA's u, attention's lse), the
# enclosing backward's incoming gradients and saved tensors that require grad.
_BACKWARDS = threading.local()      # .stack: (op name, _SavedOnce ctx, grads) of the create_graph backwards running


def _first_order_backward(name: str, backward: Callable) -> Callable:
    """``backward`` (an op's autograd formula), run by :func:`_create_graph_backward` under ``create_graph=True``."""
    def run(ctx, *grads):
        if not _grad_enabled():     # the ordinary backward: one check
            return backward(ctx, *grads)
        return _create_graph_backward(name, backward, ctx, grads)
    return run


def _create_graph_backward(name: str, backward: Callable, ctx, grads: tuple):
    """``backward(ctx, *grads)`` of op ``name`` with grad mode on: the backward ops it calls see ``name`` and the
    tensors it was given (:class:`BackwardOp`)."""
    stack = _BACKWARDS.__dict__.setdefault("stack", [])
    view = _SavedOnce(ctx)
    stack.append((name, view, grads))
    try:
        return backward(view, *grads)
    finally:
        stack.pop()


_grad_enabled = torch.is_grad_enabled


class _SavedOnce:
    """``ctx`` whose ``saved_tensors`` are unpacked once: a second unpack would run the saved-tensor hooks again
    (non-reentrant activation checkpointing refuses that; offloading would copy twice)."""

    def __init__(self, ctx):
        self._ctx = ctx
        self._saved = None

    @property
    def saved_tensors(self):
        if self._saved is None:
            self._saved = self._ctx.saved_tensors
        return self._saved

    def __getattr__(self, name):
        return getattr(self._ctx, name)


def double_backward_message(name: str, piece: str | None = None) -> str:
    """The error of a second backward through ``name`` (``piece``: the backward op without a derivative)."""
    through = f" (its gradient is computed by {piece}, which has no derivative)" if piece and piece != name else ""
    return (f"{name}: double backward (create_graph=True) is not supported{through}. The first-order "
            f"gradients are correct; for second derivatives use the pure-PyTorch functions of vlmkern.reference")


class _Refused(torch.autograd.Function):
    """Ties a backward op's results (computed without autograd) to the tensors they depend on; differentiating
    them raises."""

    @staticmethod
    def forward(ctx, message, outputs, *anchors):
        ctx.message = message
        return outputs

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(ctx.message)


def _refusing_double_backward(op: "BackwardOp", args: tuple):
    """``op(*args)`` with grad mode on: computed without autograd, then tied to a :class:`_Refused` node when
    anything it may depend on requires grad (nothing: a constant, which its value is)."""
    with torch.no_grad():
        result = EagerOp.__call__(op, *args)
    anchors = [t for a in args for t in (a if type(a) is list else (a,))
               if isinstance(t, torch.Tensor) and t.requires_grad]
    stack = getattr(_BACKWARDS, "stack", None)
    name = op.op._qualname
    if stack:
        name, view, grads = stack[-1]
        anchors += [t for t in (*grads, *view.saved_tensors) if t is not None and t.requires_grad]
    if not anchors:
        return result
    single = isinstance(result, torch.Tensor)
    tied = _Refused.apply(double_backward_message(name, op.op._qualname), (result,) if single else tuple(result),
                          *anchors)
    return tied[0] if single else tied


# op -> device type -> its chooser (:func:`_chooser`) for the kernel :func:`implement` registered
_DEVICE_KERNELS: dict = {}
_REFERENCE: dict = {}    # op -> its reference implementation (pure PyTorch, the op's signature)
_AUTOGRAD: dict = {}     # op -> (backward, setup_context) given to :func:`register_autograd`
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def eager_call(*args) -> bool:
    """Whether a call with ``args`` may run an op's kernel without the dispatcher: not under ``torch.compile``
    or ``torch.jit.trace``, no torch function or dispatch mode (``FakeTensorMode``, ``make_fx``, ``FlopCounterMode``,
    ``torch.device(...)`` as a context) and no functorch transform active (:func:`eager_mode`), and every tensor
    argument a plain ``torch.Tensor`` or ``nn.Parameter`` (no subclass such as ``DTensor``; :func:`plain_tensors`).
    Those all need the custom op."""
    return eager_mode() and plain_tensors(args)


def eager_mode() -> bool:
    """The part of :func:`eager_call` that does not depend on the arguments."""
    return not (_is_compiling() or _torch_function_mode() or _dispatch_modes() or _functorch_transforms()
                or _tracing_state() is not None)


# Bound once: every op call asks eager_mode() two or three times, and each dotted lookup is bytecode. The
# function objects are torch's own (torch.compile recognises is_compiling by identity and answers True first).
_is_compiling = torch.compiler.is_compiling
_torch_function_mode = torch._C._is_torch_function_mode_enabled
_dispatch_modes = torch._C._len_torch_dispatch_stack
_functorch_transforms = torch._C._are_functorch_transforms_active
_tracing_state = torch._C._get_tracing_state


def values_readable(t: torch.Tensor) -> bool:
    """Whether a value check (ids or indices in range, counts that must match) may read ``t``'s values: in eager
    mode (:func:`eager_mode`), not a meta tensor, and no CUDA graph being captured on the current stream, where
    a host read fails the capture (the originals, which read no values there, capture fine). Outside these the
    check steps aside, as under ``torch.compile``."""
    if t.is_meta or not eager_mode():
        return False
    return not t.is_cuda or not capturing()


_GRAPH_KEPT: list = []      # cached values a captured CUDA graph reads (by address): never freed


def capturing() -> bool:
    """Whether a CUDA graph is being captured on the current stream (False without CUDA)."""
    return _HAS_CUDA and torch.cuda.is_current_stream_capturing()


_HAS_CUDA = torch.cuda.is_available()


def keep_for_graphs(value):
    """``value``, kept alive for the rest of the process when a CUDA graph is being captured: the graph reads a
    cached device tensor by address on every replay, so a cache that later evicts it (an LRU, a clear at a size
    cap) must not let the allocator hand its memory to something else."""
    if capturing():
        _GRAPH_KEPT.append(value)
    return value


def eager_cache(maxsize: int) -> Callable:
    """``functools.lru_cache(maxsize)`` that is neither read nor filled outside :func:`eager_mode`: a call traced by
    ``torch.export``, ``make_fx`` or under a ``FakeTensorMode`` builds its tensors as fakes (which a later eager
    call must not get), and ``torch.compile`` traces the function itself."""
    def decorate(fn: Callable) -> Callable:
        cached = functools.lru_cache(maxsize=maxsize)(fn)

        @functools.wraps(fn)
        def call(*args):
            return keep_for_graphs(cached(*args)) if eager_mode() else fn(*args)
        call.cache_clear, call.cache_info = cached.cache_clear, cached.cache_info
        return call
    return decorate


def plain_tensors(args: tuple) -> bool:
    """Whether every tensor in ``args`` (or in a list argument) is a plain ``torch.Tensor`` or ``nn.Parameter``."""
    for a in args:
        if isinstance(a, torch.Tensor):
            if type(a) not in _PLAIN:
                return False
        elif type(a) is list:      # a loop, not any(<generator>): a frame per item saved
            for t in a:
                if isinstance(t, torch.Tensor) and type(t) not in _PLAIN:
                    return False
    return True


class EagerOp:
    """A custom op as its public functions call it: in eager mode (:func:`eager_call`) the op's kernel for the
    inputs' device runs directly (the backend :func:`implement` would select, remembered per input signature and
    environment while debug logging is off), under an ``autograd.Function`` made of the op's own setup-context
    and backward (:func:`register_autograd`) when a gradient is needed; otherwise, and for anything eager mode
    can't promise, the custom op ``op`` itself. Same kernels, same saved tensors, same gradients; only the
    dispatcher's and ``torch.library``'s per-call cost (~100 us of host time per fwd+bwd on a small CPU) is
    saved. Arguments as ``op``'s, positional; the first is a tensor on the device that decides the kernel.

    Under a functorch transform (``vmap``, ``grad``, ``jvp``, ``jacrev``, ``jacfwd``), and for inputs that carry
    ``torch.autograd.forward_ad`` tangents, the op's reference implementation runs instead (pure PyTorch, the
    same math): the custom op has no batching rule, no forward-mode formula (the dispatcher would give it a
    zero tangent, silently) and an autograd that functorch's ``grad`` refuses."""

    def __init__(self, op):
        self.op = op
        self._kernels = None
        self._function = None
        self._has_lists = False
        self._chosen: dict = {}

    def __call__(self, *args):
        if not eager_mode():        # first: torch.compile must not trace what follows
            if torch._C._are_functorch_transforms_active() and not torch.compiler.is_compiling():
                return _REFERENCE[self.op](*args)
            return self.op(*args)
        if _forward_ad._current_level >= 0 and _has_tangent(args):    # a dual level is open
            return _REFERENCE[self.op](*args)
        impl = self._implementation(args)
        if impl is None:   # a tensor subclass, or a device without a kernel of its own (meta: the fake; others:
            return self.op(*args)                                                       # the reference body)
        if torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
            if self._function is None:       # no autograd formula: the custom op says so on backward
                return self.op(*args)
            if not self._has_lists:
                return self._function.apply(impl, *args)
            lists = tuple(len(a) if type(a) is list else -1 for a in args)
            return self._function.apply(impl, lists, *[t for a in args for t in (a if type(a) is list else (a,))])
        return impl(*args)

    def _implementation(self, args) -> Callable | None:
        """The chosen backend's implementation for ``args``, or None for a tensor subclass among them
        (:func:`plain_tensors`, checked once per signature: a tensor's type is part of it) or a device without
        a kernel."""
        kernels = self._kernels if self._kernels is not None else self._resolve()
        if (debug := _debug_cached()) or (debug is None and _debug_logging()):   # logged: computed every call
            choose = kernels.get(args[0].device.type)
            return None if choose is None or not plain_tensors(args) else on_device(choose(*args), args[0].device)
        key = (_forced_raw(), _interpret_raw(), argument_key(args))
        impl = self._chosen.get(key, _UNSEEN)
        if impl is _UNSEEN:
            choose = kernels.get(args[0].device.type)
            impl = None if choose is None or not plain_tensors(args) else choose(*args)
            impl = getattr(impl, "resolve", lambda: impl)()     # a lazy backend room: the function itself
            impl = None if impl is None else on_device(impl, args[0].device)    # the device is part of the key
            if len(self._chosen) >= _MAX_REMEMBERED:
                self._chosen.clear()
            self._chosen[key] = impl
        return impl

    def forget(self) -> None:
        """Drop the remembered implementations (see :meth:`OpDispatch.forget`)."""
        self._chosen.clear()

    def _resolve(self) -> dict:
        if self.op in _AUTOGRAD:
            # Tensor[] arguments in the schema: the list variant flattens them for autograd.
            self._has_lists = "Tensor[]" in str(self.op._opoverload._schema)
            make = _eager_list_function if self._has_lists else _eager_function
            self._function = make(self.op._qualname, *_AUTOGRAD[self.op])
        self._kernels = _DEVICE_KERNELS[self.op]
        _EAGER_OPS.append(self)
        return self._kernels


class BackwardOp(EagerOp):
    """An :class:`EagerOp` that computes (part of) another op's gradient and has no derivative of its own. With
    grad mode on (a backward under ``create_graph=True``) its result is tied to a node that raises a clear
    error if a second backward reaches it (:func:`_refusing_double_backward`); otherwise it is the op."""

    def __call__(self, *args):
        if _grad_enabled():
            return _refusing_double_backward(self, args)
        return EagerOp.__call__(self, *args)


def transformed() -> bool:
    """Whether a functorch transform (``vmap``, ``grad``, ``jvp``, ...) or forward-mode AD sees this call: the
    reference math then runs (:class:`EagerOp`), and must avoid in-place and ``out=`` writes into tensors the
    transform does not track, and shapes that depend on values."""
    return torch._C._are_functorch_transforms_active() or _forward_ad._current_level >= 0


def _has_tangent(args) -> bool:
    """Whether a tensor in ``args`` (or in a list argument) carries a ``torch.autograd.forward_ad`` tangent."""
    return any(isinstance(t, torch.Tensor) and _forward_ad.unpack_dual(t).tangent is not None
               for a in args for t in (a if type(a) is list else (a,)))


_UNSEEN = object()
_EAGER_OPS: list = []      # every EagerOp called eagerly so far (for forget_selections)


def forget_selections() -> None:
    """Drop every remembered backend selection (:meth:`OpDispatch.forget` of every registered op and
    :meth:`EagerOp.forget` of every eager op): after changing what the reasons read other than the inputs and
    the two environment variables, e.g. a test swapping the Triton version."""
    for d in REGISTRY.values():
        d.forget()
    for e in _EAGER_OPS:
        e.forget()


def _nest(lists, flat):
    """Undo :class:`EagerOp`'s flattening of list arguments: ``lists[i]`` is list argument ``i``'s length, or -1."""
    out, i = [], 0
    for n in lists:
        if n < 0:
            out.append(flat[i])
            i += 1
        else:
            out.append(list(flat[i:i + n]))
            i += n
    return tuple(out)


def _eager_function(name: str, backward: Callable, setup_context: Callable):
    """The ``autograd.Function`` of :class:`EagerOp`: forward runs the chosen implementation (its first
    argument, which gets no gradient), then the op's setup-context; backward is the op's. ``forward`` takes
    ``ctx`` itself (a separate ``setup_context`` costs an ``inspect.signature`` per call).

    Gradients are not materialised: the ops' backwards read only their first output's gradient, and the others
    (``lse``, a saved pre-activation, window statistics) would each be a zero tensor allocated and filled per
    backward, as large as the output it stands for. A backward reached without a gradient for the first output
    passes none on."""

    def forward(ctx, impl, *args):
        ctx.set_materialize_grads(False)
        output = impl(*args)
        ctx.needs_input_grad = ctx.needs_input_grad[1:]
        setup_context(ctx, args, output)
        return output

    def bwd(ctx, *grads):
        if grads[0] is None:
            return (None,) * (len(ctx.needs_input_grad) + 1)
        result = backward(ctx, *grads) if not _grad_enabled() else _create_graph_backward(name, backward, ctx, grads)
        return (None, *result) if isinstance(result, tuple) else (None, result)

    return type(f"Eager_{name.replace('::', '_')}", (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(bwd)})


def _eager_list_function(name: str, backward: Callable, setup_context: Callable):
    """:func:`_eager_function` for an op with list arguments (``Tensor[]``, e.g. ``expert_linear``'s weights),
    which an ``autograd.Function`` does not track: they come flattened, after a first input saying how
    (``lists[i]``: argument ``i``'s length, or -1); the op's setup-context and backward see them nested, and
    ``needs_input_grad`` per argument (a list argument's entry: any of its tensors)."""

    def forward(ctx, impl, lists, *flat):
        ctx.set_materialize_grads(False)
        args = _nest(lists, flat)
        output = impl(*args)
        ctx.needs_input_grad = tuple(any(n) if isinstance(n, list) else n
                                     for n in _nest(lists, ctx.needs_input_grad[2:]))
        ctx.vlmkern_lists = lists
        setup_context(ctx, args, output)
        return output

    def bwd(ctx, *grads):
        if grads[0] is None:
            return (None,) * (sum(1 if n < 0 else n for n in ctx.vlmkern_lists) + 2)
        result = backward(ctx, *grads) if not _grad_enabled() else _create_graph_backward(name, backward, ctx, grads)
        result = result if isinstance(result, tuple) else (result,)
        flat = [None, None]
        for n, g in zip(ctx.vlmkern_lists, result):
            flat.extend((g,) if n < 0 else (g if g is not None else [None] * n))
        return tuple(flat)

    return type(f"Eager_{name.replace('::', '_')}_lists", (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(bwd)})


def eager_cpu_reference(dispatch: OpDispatch, x: torch.Tensor, *args) -> bool:
    """Whether an eager call on CPU tensors dispatches to the reference. Such calls run the reference math
    under plain autograd, as the originals do (autograd keeps what backward needs instead of the op's
    recompute-friendly saves): the fastest CPU path. Compiled graphs and GPU tensors keep the custom op, and so
    does anything outside eager mode (fake tensors, dispatch modes, jit.trace: the CPU path reads values)."""
    if not x.is_cpu or not eager_mode():
        return False
    forced = forced_backend()      # a forced backend decides alone (one that can't run raises in the op)
    return forced == "reference" if forced is not None else dispatch.select(x, *args) == "reference"


def needs_grad(*tensors) -> bool:
    """Whether autograd will want gradients of any of ``tensors`` (None entries ignored)."""
    if not torch.is_grad_enabled():
        return False
    for t in tensors:     # a loop, not any(<generator>) (a frame per tensor); torch.compile traces it too
        if t is not None and t.requires_grad:
            return True
    return False


REGISTRY: dict[str, OpDispatch] = {}
_MAX_REMEMBERED = 4096      # selections remembered per op before the memo starts over


def register(dispatch: OpDispatch) -> OpDispatch:
    REGISTRY[dispatch.name] = dispatch
    return dispatch


def environment_report(device: torch.device) -> dict[str, dict[str, list[str]]]:
    """Per op and backend, the reasons a backend can't run on ``device`` regardless of inputs."""
    env = {
        "triton": triton_env_reasons(device),
        "cuda": cuda_env_reasons(device),
        "cpp": cpu_ext_reasons(device),
        "reference": [],
    }
    return {name: {b: env.get(b, []) for b in d.backends} for name, d in REGISTRY.items()}
