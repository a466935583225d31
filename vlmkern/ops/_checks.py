"""Argument checks shared by every op: each error names the argument and what was expected."""
from __future__ import annotations

from typing import Iterable

import torch


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


INT32_MAX = 2 ** 31 - 1


def int32_span_reasons(dims: Iterable[int], **tensors) -> list[str]:
    """Why a kernel that indexes dims ``dims`` of each tensor with 32-bit offsets (batch/head bases are 64-bit)
    could overflow: the largest such offset, ``Σ (n-1)·|stride|``, exceeds ``2**31 - 1``. Shapes and strides only
    (meta tensors work), so the decision is testable without allocating."""
    dims = tuple(dims)
    why = []
    for name, t in tensors.items():
        if t is None or t.numel() == 0:
            continue
        span = sum((t.shape[i] - 1) * abs(t.stride(i)) for i in dims if i < t.dim())
        if span > INT32_MAX:
            why.append(f"{name} spans {span + 1} elements in dims {dims} (the kernel offsets them in int32)")
    return why


def autocast_enabled(device: torch.device) -> bool:
    """Whether ``torch.autocast`` is on for ``device``'s type (False for types autocast does not know: meta)."""
    return device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type)


def autocast_inputs(device: torch.device, *tensors):
    """Under ``torch.autocast`` for ``device``'s type, the floating tensors cast to the autocast dtype (what
    ``F.scaled_dot_product_attention`` and ``F.linear`` do); unchanged otherwise. None entries pass through."""
    if not autocast_enabled(device):
        return tensors
    dt = torch.get_autocast_dtype(device.type)
    return tuple(t.to(dt) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in tensors)


def check_finite_scalar(value, name: str, *, minimum: float | None = None) -> float:
    """``value`` as a float: a real, finite number (TypeError otherwise, as for a wrong type), ``>= minimum`` when given (ValueError)."""
    import math
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite float, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return float(value)
