"""The Triton backend of ``vlmkern::window_attention``: launchers of ``vlmkern.kernels.window_attention``, the
launch config, and the build signatures the offline build check compiles.

Each launch's runtime arguments are written once, by an argument builder (``_fwd_args``, ``_bwd_args``) that
:func:`_builds` and the launchers' launch plans (everything but the pointers, once per layout) both call with
meta tensors. One program per (token, batch) pair.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
from torch import Tensor

from vlmkern.kernels.window_attention import _window_attn_bwd_kernel, _window_attn_fwd_kernel
from vlmkern.ops.checks import as_dtype
from vlmkern.ops.launch import (KernelBuild, build_from_args, launch, layout, meta_from, register_builds, triton_type,
                                without_pointers)
from vlmkern.ops.window_attention._torch import window_sides

# Channel loops use ``tl.range(..., num_stages=3)``: loads that feed no dot are pipelined (cp.async) only
# when a loop asks for it. Tiles of at most 2048 fp32 values (8 warps: 8 per thread, no spills at M = 8;
# BLOCK_C <= 256 keeps the M = 2 backward spill-free): BLOCK_MC = next power of two of M, BLOCK_C fills the rest.
TILE = 2048
MAX_BLOCK_C = 256


def window_config(m: int, channels: int) -> dict:
    """Launch config for window side ``m`` and ``channels`` HR channels."""
    block_mc = triton.next_power_of_2(m)
    block_w = max(block_mc * block_mc, 2)
    block_c = min(MAX_BLOCK_C, max(16, TILE // block_w), max(16, triton.next_power_of_2(channels)))
    return dict(BLOCK_MC=block_mc, BLOCK_C=block_c, num_warps=8, num_stages=3)


# ------------------------------------------------------------------------------------ argument builders
def _strides(names: str, t: Tensor) -> dict:
    return dict(zip(names.split(), t.stride()))


def _fwd_args(u, h, s, mean, rstd, p, logit, eps) -> dict:
    """fp32 ``u, s (B, N, C)`` and saved rows ``(B, N, M²)``; ``h (B, C, PN·M, PN·M)`` any float dtype."""
    return dict(u_ptr=u, h_ptr=h, s_ptr=s, mean_ptr=mean, rstd_ptr=rstd, p_ptr=p, logit_ptr=logit,
                N=u.shape[1], PN=window_sides(u, h)[0], C=u.shape[2], eps=float(eps),
                **_strides("s_ub s_un s_uc", u), **_strides("s_hb s_hc s_hh s_hw", h), **_strides("s_sb s_sn s_sc", s))


def _bwd_args(ds, u, h, mean, rstd, p, logit, du, dh) -> dict:
    """fp32 ``ds, u, du (B, N, C)`` and saved rows; ``dh`` like ``h``."""
    return dict(ds_ptr=ds, u_ptr=u, h_ptr=h, mean_ptr=mean, rstd_ptr=rstd, p_ptr=p, logit_ptr=logit, du_ptr=du,
                dh_ptr=dh, N=u.shape[1], PN=window_sides(u, h)[0], C=u.shape[2],
                **_strides("s_gb s_gn s_gc", ds), **_strides("s_ub s_un s_uc", u), **_strides("s_hb s_hc s_hh s_hw", h),
                **_strides("s_dub s_dun s_duc", du), **_strides("s_db s_dc s_dh s_dw", dh))


def _constexprs(u: Tensor, h: Tensor) -> dict:
    """The window side ``M`` (one build per side) and its config."""
    m = window_sides(u, h)[1]
    return dict(M=m, **window_config(m, u.shape[2]))


# ------------------------------------------------------------------------------------------ launch plans
# Grid, sizes, strides, eps and constexprs depend only on the tensors' shapes, strides and the HR dtype: they are
# computed once per such key, by the argument builders above called on meta tensors of those layouts (a plan
# holds exactly what the builders give), and each call adds only its pointers.
class _Launch(NamedTuple):
    grid: tuple[int, int]
    args: dict       # the builder's runtime arguments but the pointers
    meta: dict       # constexprs, config and launch options
    rows: tuple      # shape of each saved row tensor (B, N, M²)


def _dense(t: Tensor) -> Tensor:
    """A meta stand-in of a result allocated like ``t`` but dense (as the launchers allocate s, du, dh)."""
    return torch.empty(t.shape, dtype=t.dtype, device="meta")


def _plan(u: tuple, h: tuple, h_dtype: torch.dtype, build) -> _Launch:
    """The launch of ``build(u, h, rows)`` (an argument builder's call on meta tensors) for the layouts ``u``
    (fp32) and ``h``; ``rows``: the four saved ``(B, N, M²)`` fp32 rows."""
    um, hm = meta_from(u), meta_from(h, h_dtype)
    B, N, _ = um.shape
    rows = (B, N, window_sides(um, hm)[1] ** 2)
    args = build(um, hm, [torch.empty(rows, device="meta")] * 4)
    return _Launch((N, B), without_pointers(args), _constexprs(um, hm), rows)


@functools.lru_cache(maxsize=256)
def _forward_plan(u: tuple, h: tuple, h_dtype: torch.dtype, eps: float) -> _Launch:
    return _plan(u, h, h_dtype, lambda um, hm, rows: _fwd_args(um, hm, _dense(um), *rows, eps))


@functools.lru_cache(maxsize=256)
def _backward_plan(ds: tuple, u: tuple, h: tuple, h_dtype: torch.dtype) -> _Launch:
    return _plan(u, h, h_dtype, lambda um, hm, rows: _bwd_args(meta_from(ds), um, hm, *rows, _dense(um), _dense(hm)))


# --------------------------------------------------------------------------------------------- launchers
# Outputs are allocated with empty_like where a layout to copy exists: a third of torch.empty's host time on a
# small CPU, where parsing a torch.Size and dtype/device keywords dominates an allocation.
_DENSE = torch.contiguous_format


def forward(u, h, eps) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``s (B, N, C)`` and the saved rows ``mean, rstd, p, logit (B, N, M²)``, all fp32."""
    u = as_dtype(u, torch.float32)
    plan = _forward_plan(layout(u), layout(h), h.dtype, eps)
    s = torch.empty_like(u, memory_format=_DENSE)
    mean = torch.empty(plan.rows, dtype=torch.float32, device=u.device)
    rows = (mean, torch.empty_like(mean), torch.empty_like(mean), torch.empty_like(mean))
    if u.shape[0] * u.shape[1]:
        launch(_window_attn_fwd_kernel, plan.grid, {**plan.args, "u_ptr": u, "h_ptr": h, "s_ptr": s, "mean_ptr": mean,
                                                   "rstd_ptr": rows[1], "p_ptr": rows[2], "logit_ptr": rows[3]},
               plan.meta)
    return (s, *rows)


def backward(ds, u, h, mean, rstd, p, logit) -> tuple[Tensor, Tensor]:
    """``du (B, N, C)`` fp32 and ``dh`` (dense, ``h``'s dtype)."""
    ds, u = as_dtype(ds, torch.float32), as_dtype(u, torch.float32)
    du = torch.empty_like(u, memory_format=_DENSE)
    dh = torch.empty_like(h, memory_format=_DENSE)
    if u.shape[0] * u.shape[1]:
        plan = _backward_plan(layout(ds), layout(u), layout(h), h.dtype)
        launch(_window_attn_bwd_kernel, plan.grid, {**plan.args, "ds_ptr": ds, "u_ptr": u, "h_ptr": h,
                                                   "mean_ptr": mean, "rstd_ptr": rstd, "p_ptr": p, "logit_ptr": logit,
                                                   "du_ptr": du, "dh_ptr": dh}, plan.meta)
    return du, dh


# ----------------------------------------------------------------------------------------- build check
SHIPPED_WINDOWS = (2, 4, 8)     # M = 8: normal 768 px setting; 4 and 2 for smaller aux maps
SHIPPED_CHANNELS = 2880         # ConvNeXt-L (the tile shape is the same for every C >= 512)
SHIPPED_GRID = 24               # 576 LR tokens


def _builds() -> list[KernelBuild]:
    """Every HR dtype x shipped window size; u, s, du and the saved rows are fp32, unit channel stride for u/s."""
    out = []
    B, pn, C = 1, SHIPPED_GRID, SHIPPED_CHANNELS
    f32 = dict(device="meta", dtype=torch.float32)
    vec = torch.empty((B, pn * pn, C), **f32)            # u, s, ds, du
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        for m in SHIPPED_WINDOWS:
            h = torch.empty((B, C, pn * m, pn * m), device="meta", dtype=dt)
            rows = [torch.empty((B, pn * pn, m * m), **f32) for _ in range(4)]
            consts = _constexprs(vec, h)
            name = f"{triton_type(h)[1:]},M{m}"
            out.append(build_from_args(
                f"window_attention_fwd[{name}]", _window_attn_fwd_kernel, _fwd_args(vec, h, vec, *rows, 1e-5),
                consts, consts, unit=("s_uc", "s_sc", "s_hw"),
                div16=("s_ub", "s_un", "s_sb", "s_sn", "s_hb", "s_hc", "s_hh")))
            out.append(build_from_args(
                f"window_attention_bwd[{name}]", _window_attn_bwd_kernel, _bwd_args(vec, vec, h, *rows, vec, h),
                consts, consts, unit=("s_gc", "s_uc", "s_duc", "s_hw", "s_dw"),
                div16=("s_gb", "s_gn", "s_ub", "s_un", "s_dub", "s_dun", "s_hb", "s_hc", "s_hh",
                       "s_db", "s_dc", "s_dh")))
    return out


register_builds(*_builds())
