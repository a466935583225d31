"""Triton launch signatures, written once: what a launcher passes is what the offline build check compiles.

Each op family's Triton backend (``vlmkern/ops/<family>/_triton.py``) writes every launch as an argument builder,
a function returning the kernel's runtime arguments by name. The launcher calls the kernel with them
(:func:`launch`); the same builder, called with meta tensors, gives the build check's signature
(:func:`build_from_args`), which registers the exact (signature, constexprs, attrs, num_warps, num_stages)
combinations that ship, so ``python -m vlmkern.tools.gpu_build_check`` compiles precisely what runs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, NamedTuple

import torch

from vlmkern.ops import dispatch


@dataclass(frozen=True)
class KernelBuild:
    label: str                       # e.g. "patch_embed_patchify[u8->bf16]"
    kernel: Any                      # triton JITFunction
    signature: dict[str, str]        # argument name -> triton type ('*bf16', 'i32', 'fp32', 'constexpr')
    constexprs: dict[str, Any] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3
    attrs: dict[str, Any] = field(default_factory=dict)   # argument name -> "D" (16-divisible)


SHIPPED: list[KernelBuild] = []


def register_builds(*builds: KernelBuild) -> None:
    SHIPPED.extend(builds)


def launched(label: str, kernel: Any, types: dict[str, str], constexprs: dict[str, Any], cfg: dict[str, Any], *,
             unit: Iterable[str] = (), div16: Iterable[str] = ()) -> KernelBuild:
    """The variant Triton's JIT compiles for the common runtime case, not a generic one that never runs.

    At launch Triton turns an int argument equal to 1 into a constant and marks 16-divisible pointers and
    ints; registers and spills depend on both. ``types`` gives every runtime argument; ``constexprs`` the
    ``tl.constexpr`` values plus launch-only keys (``num_warps``/``num_stages`` come from ``cfg``); names in
    ``unit`` are strides that are 1 at runtime; pointers and names in ``div16`` are 16-divisible.
    """
    consts = {k: v for k, v in constexprs.items() if k not in ("num_warps", "num_stages")}
    sig, attrs = {}, {}
    unit, div16 = set(unit), set(div16)
    for name in kernel.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in unit:
            sig[name], consts[name] = "constexpr", 1
        else:
            sig[name] = types[name]
            if types[name].startswith("*") or name in div16:
                attrs[name] = "D"
    return KernelBuild(label, kernel, sig, consts, cfg["num_warps"], cfg["num_stages"], attrs)


_TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
                 torch.int8: "i8", torch.uint8: "u8", torch.int16: "i16", torch.int32: "i32", torch.int64: "i64",
                 torch.bool: "i1"}


def triton_type(value: Any) -> str:
    """The Triton signature type of a runtime argument: ``*fp16`` for a tensor, ``i32``/``i64`` for an int,
    ``fp32`` for a float (as Triton's JIT specialises them)."""
    if isinstance(value, torch.Tensor):
        return "*" + _TRITON_TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for a runtime argument of type {type(value).__name__}")


def build_from_args(label: str, kernel: Any, args: Mapping[str, Any], constexprs: dict[str, Any],
                    cfg: dict[str, Any], *, unit: Iterable[str] = (), div16: Iterable[str] = ()) -> KernelBuild:
    """:func:`launched` with the types read off a launcher's own argument builder (meta tensors will do)."""
    return launched(label, kernel, {k: triton_type(v) for k, v in args.items()}, constexprs, cfg,
                    unit=unit, div16=div16)


def launch(kernel: Any, grid: tuple[int, ...], args: Mapping[str, Any], constexprs: Mapping[str, Any]) -> None:
    """``kernel[grid](**args, **constexprs)``: the launch the build check compiled for ``args``' builder."""
    kernel[grid](**args, **constexprs)


_PLACEHOLDERS: dict = {}


def placeholder(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An empty tensor for a pointer argument a launch never reads (its constexpr flag is off), one per
    (dtype, device) and kept: no allocation per call. Never returned to a caller."""
    key = (dtype, device)
    t = _PLACEHOLDERS.get(key)
    if t is None:
        t = _PLACEHOLDERS[key] = torch.empty(0, dtype=dtype, device=device)
    return t


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for grids (no ``triton`` import on the host path)."""
    return -(-a // b)


# ------------------------------------------------------------------------------------------ launch plans
# Everything a launch passes but its pointers (grid, sizes, strides, scalars, constexprs, config) depends only on
# the operands' layouts and dtypes, the scalar arguments, the interpreter flag and the dot precision. Each family
# computes it once per such key (``functools.lru_cache``) by running its argument builder on meta tensors of the
# same layouts, so a plan holds exactly what the builder gives; a call allocates its outputs and passes its
# pointers next to the plan.
class LaunchPlan(NamedTuple):
    """``grid`` and ``static``: the builder's non-tensor runtime arguments, the constexprs and the launch options,
    passed by name next to the pointers."""
    grid: tuple
    static: dict


def without_pointers(args: Mapping[str, Any]) -> dict:
    """An argument builder's ``args`` less its tensors (on meta tensors, the pointers a plan does not keep)."""
    return {name: a for name, a in args.items() if not isinstance(a, torch.Tensor)}


def plan_from_args(grid: tuple, args: Mapping[str, Any], constexprs: Mapping[str, Any]) -> LaunchPlan:
    """A :class:`LaunchPlan` from an argument builder's ``args`` on meta tensors and the launch's constexprs."""
    return LaunchPlan(grid, {**without_pointers(args), **constexprs})


def layout(t: torch.Tensor | None) -> tuple | None:
    """The plan-key part of an optional tensor operand: ``(shape, strides)``, None when absent."""
    return None if t is None else (t.shape, t.stride())


def meta_tensor(shape, stride=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A meta tensor of ``shape`` (and ``stride``; contiguous when None) standing for a launch's operand."""
    if stride is None:
        return torch.empty(shape, dtype=dtype, device="meta")
    return torch.empty_strided(shape, stride, dtype=dtype, device="meta")


def meta_from(layout: tuple | None, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    """The meta stand-in of an operand from its plan-key :func:`layout` (None stays None)."""
    return None if layout is None else torch.empty_strided(*layout, dtype=dtype, device="meta")


host_dots = dispatch.host_dots   # launch-plan key part; defined beside what it reads
