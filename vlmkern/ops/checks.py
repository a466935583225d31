"""Argument checks shared by every op, and by the modules and models above them: each error names the argument
and what was expected, before any launch."""
from __future__ import annotations

import functools
import math
from typing import Callable, Iterable

import torch

from vlmkern.ops.dispatch import argument_key, eager_mode


def check_tensor(t, name: str, *, ndim: int | None = None, dtypes: Iterable[torch.dtype] | None = None,
                 shape_doc: str = "") -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {shape_doc}, got shape {tuple(t.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise TypeError(f"{name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")


def check_same_device(**tensors) -> None:
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {k: v.device for k, v in present.items()}
    first_name, first = next(iter(devices.items()))
    for name, dev in devices.items():
        if dev != first:
            raise ValueError(f"{name} is on {dev} but {first_name} is on {first}: all inputs must share one device")


FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)   # float64: the reference backend only
INDEX_DTYPES = (torch.int32, torch.int64)
MASK_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)

INT32_MAX = 2**31 - 1
CUDA_GRID_YZ_MAX = 65535     # a CUDA grid's second and third axes (the first takes 2**31-1)
# The largest tile edge any shipped config uses: an index runs up to size + block before its mask applies.
MAX_BLOCK = 128


def grid_axis_reasons(**sizes: int) -> list[str]:
    """Why a launch that puts ``sizes`` (name -> count) on its grid's second or third axis cannot run: CUDA caps
    those axes at :data:`CUDA_GRID_YZ_MAX` blocks (a launch past it fails). Empty list: it can."""
    return [f"{name} = {n} is launched over a CUDA grid axis of at most {CUDA_GRID_YZ_MAX} blocks"
            for name, n in sizes.items() if n > CUDA_GRID_YZ_MAX]


def int32_offset_reasons(dims: Iterable[int] | None = None, *, margin: int = 0, **tensors) -> list[str]:
    """Why a Triton launch reading ``tensors`` could overflow a 32-bit offset (empty list: it cannot).

    The kernels offset dims ``dims`` of each tensor in 32-bit (``index * stride`` summed) and the others in
    64-bit (batch / head / row bases). ``margin`` is how far a tile index runs past a dim's size before its mask
    applies (:data:`MAX_BLOCK` for the tiled GEMMs). ``dims=None`` is the GEMM layout: every dim but the first
    (rows) in 32-bit, and rows stepped by ``margin * stride`` in 32-bit pointer increments. Shapes and strides
    only, so meta tensors answer too; None and empty tensors are skipped.
    """
    why = []
    for name, t in tensors.items():
        if t is None or t.dim() == 0 or t.numel() == 0:
            continue
        size, stride = t.shape, t.stride()
        ds = range(1, t.dim()) if dims is None else [i for i in dims if i < t.dim()]
        reach = sum((size[i] - 1 + margin) * abs(stride[i]) for i in ds)
        if dims is None:
            reach = max(reach, size[0] + margin, margin * abs(stride[0]))
        if reach > INT32_MAX:
            why.append(f"{name} of shape {tuple(size)} and strides {tuple(stride)} needs offsets up to {reach} "
                       f"beyond 2**31-1 (the Triton kernels compute them in int32)")
    return why


def int32_count_reasons(t, start_dim: int, what: str) -> list[str]:
    """Why a dense buffer laid out like ``t``'s dims ``start_dim..`` (e.g. one image's gradient, offset in
    int32 from a 64-bit base) could overflow: it holds more than ``2**31 - 1`` elements."""
    n = math.prod(t.shape[start_dim:])
    return [f"{what} holds {n} elements (offset in int32)"] if n > INT32_MAX else []


def float64_reason(x) -> list[str]:
    """float64 runs on the reference backend: no Triton kernel takes it."""
    return ["float64 is not supported by vlmkern's Triton kernels"] if x.dtype == torch.float64 else []


def autocast_inputs(x, *tensors):
    """Under ``torch.autocast`` a linear runs in the autocast dtype, as ``F.linear``: cast the floating inputs
    (float64 excepted, which autocast leaves alone) of ``x`` and ``tensors`` (tensors, None or lists)."""
    if not _any_autocast() or not isinstance(x, torch.Tensor) or not autocasting(x):  # the first: no frame
        return (x, *tensors)
    dt = torch.get_autocast_dtype(x.device.type)

    def cast(t):
        ok = isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64
        return t.to(dt) if ok else t
    return (cast(x), *[[cast(w) for w in t] if isinstance(t, (list, tuple)) else cast(t) for t in tensors])


def rows_2d(x: torch.Tensor) -> torch.Tensor:
    """``x (..., C)`` -> ``(prod(...), C)``, also when ``C == 0`` (where ``reshape(-1, C)`` is ambiguous); a 2-D
    ``x`` itself."""
    return x if x.dim() == 2 else x.reshape(math.prod(x.shape[:-1]), x.shape[-1])


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)`` without the call when ``t`` already has it (most calls on a hot path; the call alone costs
    ~1 us of host time)."""
    return t if t.dtype == dtype else t.to(dtype)


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """What sums of ``dtype`` values accumulate in: float32, float64 for float64 (its gradients stay exact)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def is_meta(*tensors) -> bool:
    """Whether any of ``tensors`` lives on the meta device (values can't be read: value checks are skipped)."""
    return any(isinstance(t, torch.Tensor) and t.device.type == "meta" for t in tensors)


# One C call (~0.1 us) answers the common case, no autocast on any device; the per-device query costs ~1.5 us.
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


def autocasting(x) -> bool:
    """Whether ``torch.autocast`` is on for ``x``'s device (dtype mismatches are then autocast's to resolve)."""
    if not _any_autocast():
        return False
    dev = x.device.type
    return torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev)


def square_side(n) -> int:
    """The side of a square count ``n``: ``round(sqrt(n))``, exact for the perfect squares below 2**52 (callers
    check ``side * side == n``). Unlike ``math.isqrt`` it takes a symbolic size, as ``torch.compile`` makes a
    size that changed between calls (``dynamic=None``) or every size (``dynamic=True``); a size that
    ``torch.jit.trace`` records (a tensor) is read as an int."""
    if isinstance(n, torch.Tensor):
        n = int(n)
    return round(n ** 0.5)


def is_finite(value) -> bool:
    """``math.isfinite(value)`` for a real number, in comparisons: ``torch.compile(dynamic=True)`` makes a float
    default argument symbolic, and ``math.isfinite`` of it cannot be traced (a graph break, an error with
    ``fullgraph=True``); a comparison can (NaN compares false)."""
    return -math.inf < value < math.inf


def finite_number(value) -> bool:
    """Whether ``value`` is a finite ``int`` or ``float`` (not a bool)."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and is_finite(value)


def check_finite_scalar(value, name: str, *, minimum: float | None = None) -> float:
    """``value`` as a float: a real, finite number (TypeError otherwise, as for a wrong type), ``>= minimum`` when given (ValueError)."""
    if not finite_number(value):
        raise TypeError(f"{name} must be a finite float, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return float(value)


def check_weight_dtype(t: torch.Tensor, name: str, weight: torch.Tensor,
                       owner: str = "the module's weights") -> None:
    """``t`` in ``weight``'s dtype (any under ``torch.autocast``, whose Linears cast), else TypeError naming it
    (instead of torch's matmul dtype error)."""
    if t.dtype != weight.dtype and not autocasting(t):
        raise TypeError(f"{name} has dtype {t.dtype} but {owner} are {weight.dtype}: cast one of them, or run "
                        f"under torch.autocast")


def check_flag(value, name: str, *, optional: bool = False) -> None:
    """A boolean switch: a ``bool`` (None too with ``optional``), else TypeError naming it (a string such as
    ``"False"`` or a float would otherwise switch by its truth value)."""
    if not (isinstance(value, bool) or (optional and value is None)):
        raise TypeError(f"{name} must be a bool{' or None' if optional else ''}, got {value!r}")


def check_dropout_p(dropout_p) -> None:
    """A dropout probability: a real number in [0, 1] (bools refused), else ValueError."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1], got {dropout_p!r}")


# ------------------------------------------------------------------------------------ checks run once per key
_MAX_PASSED = 4096     # keys remembered per check before its memo starts over


def once_per_key(check: Callable[..., None]) -> Callable[..., None]:
    """``check`` run once per :func:`argument_key` of its arguments: a key that passed is remembered and not
    checked again (the checks cost several microseconds per call, more than the rest of an op's host path);
    a failing key raises every time. Only for checks that read nothing else: value checks (index ranges,
    expert ids) and checks that read global state (autocast) stay outside. Outside eager mode (``torch.compile``,
    ``jit.trace``, a fake-tensor or dispatch mode, a functorch transform) the check runs as written: a mutable
    global memo has no place in a traced graph, and a traced tensor's key may not be computable."""
    passed: set = set()

    @functools.wraps(check)
    def run(*args, **kwargs) -> None:
        if not eager_mode():
            return check(*args, **kwargs)
        try:
            key = (argument_key(args), argument_key(tuple(kwargs.items()))) if kwargs else argument_key(args)
            if key in passed:
                return None
        except (TypeError, RuntimeError):   # unhashable, or a tensor without strides: check every time
            return check(*args, **kwargs)
        check(*args, **kwargs)
        if len(passed) >= _MAX_PASSED:
            passed.clear()
        passed.add(key)
        return None
    run.forget = passed.clear
    return run
