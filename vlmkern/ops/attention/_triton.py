"""The attention ops' Triton backend: launch configs, argument builders, launchers and the shipped builds.

Shapes as in the contract (``q`` ``(B, H, Lq, d)``, ``k``/``v`` ``(B, H, Lk, d)``, any strides). Each launch's
runtime arguments are written once, by a ``_*_args`` builder used, with meta tensors, by :func:`_builds` (the
offline GPU build check compiles exactly what launches) and by the launchers' launch plans (everything but the
pointers, computed once per layout and scalar arguments). Imported lazily by the contract.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch import Tensor

from vlmkern.kernels import attention as K
from vlmkern.masks import QFormerMode
from vlmkern.ops.attention import _dropout
from vlmkern.ops.checks import as_dtype
from vlmkern.ops.launch import (KernelBuild, build_from_args, cdiv, host_dots, launch, layout, meta_from, placeholder,
                                register_builds, without_pointers)

LOG2E = 1.4426950408889634      # the kernels' softmax runs in base 2: scores are scaled by scale * log2(e)

# ------------------------------------------------------------------------------- shipped configurations
DELTA_CONFIG = dict(BLOCK_M=64, num_warps=4, num_stages=1)

# (kernel, family) -> (small: d <= 64, big: d = 128) as (BLOCK_M, BLOCK_N, num_warps, num_stages).
# family: "half" (fp16/bf16 on tensor cores), "tf32" and "ieee" (fp32; ieee runs on FMA units, whose dot
# operands live in registers, hence the smaller tiles). Chosen with gpu_build_check: no spills on sm_80 and
# sm_90, shared memory within sm_80's 164 KB.
_CONFIGS = {
    ("fwd", "half"): ((64, 64, 4, 3), (64, 64, 8, 2)),
    ("dkdv", "half"): ((32, 64, 4, 2), (32, 64, 8, 2)),
    ("dq", "half"): ((64, 32, 4, 2), (64, 32, 8, 2)),
    ("fwd", "tf32"): ((64, 32, 4, 2), (64, 32, 8, 2)),
    ("dkdv", "tf32"): ((32, 32, 4, 1), (32, 32, 8, 1)),
    ("dq", "tf32"): ((32, 32, 4, 2), (32, 32, 8, 1)),
    ("fwd", "ieee"): ((64, 32, 8, 2), (32, 16, 8, 2)),
    ("dkdv", "ieee"): ((32, 32, 8, 2), (16, 32, 8, 1)),
    ("dq", "ieee"): ((32, 32, 4, 2), (32, 32, 8, 1)),
}

# With dropout, where the Philox state of a tile does not fit beside the attention tiles: the fp32 (tf32) dq
# tiles of _CONFIGS spill with it (gpu_build_check, d = 64 and 128 on sm_90, (32, 32, 8, 2) at d = 64 on
# sm_80; (16, 32, 8, 1) at d = 128 on sm_90 with Triton 3.6), these do not.
_DROPOUT_CONFIGS = {
    ("dq", "tf32"): ((16, 32, 4, 2), (16, 16, 8, 1)),
}
DROPOUT_MASK_CONFIG = dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=1)


def config_family(elem_bytes: int, precision: str) -> str:
    """"half" for 2-byte inputs, else the fp32 dot precision ("tf32" or "ieee")."""
    return "half" if elem_bytes == 2 else precision


def attention_config(kernel: str, family: str, head_dim: int, dropout: bool = False) -> dict:
    """Launch config of ``kernel`` in ("fwd", "dkdv", "dq") for a config family and head dim."""
    if (kernel, family) not in _CONFIGS:
        raise ValueError(f"no attention config for kernel {kernel!r}, family {family!r}")
    table = _DROPOUT_CONFIGS if dropout and (kernel, family) in _DROPOUT_CONFIGS else _CONFIGS
    m, n, w, st = table[kernel, family][head_dim > 64]
    return dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=st)


def _launch_params(dtype: torch.dtype, interpreting: bool, precision: str) -> tuple[bool, str, str]:
    """(UPCAST, dot precision, config family) for ``precision = dispatch.dot_precision(dtype)``. fp32 follows
    torch's TF32 switch, as ``torch.matmul`` does; the interpreter's low-precision dot is not trustworthy
    (bf16), so it computes in fp32 there."""
    family = config_family(dtype.itemsize, precision)
    if interpreting:
        return True, "ieee", family
    return False, precision, family


def _constexprs(head_dim: int, mode: int, has_kpm: bool, dropout: bool, upcast: bool, precision: str,
                cfg: dict) -> dict:
    return dict(HEAD_DIM=head_dim, MODE=int(mode), HAS_KPM=has_kpm, DROPOUT=dropout, UPCAST=upcast,
                PRECISION=precision, **cfg)


# ------------------------------------------------------------------------------------ argument builders
_STRIDE_NAMES: dict[tuple[str, str], tuple[str, ...]] = {}


def _strides(name: str, t: Tensor, row: str) -> dict[str, int]:
    """``s_<name>b, s_<name>h, s_<name><row>, s_<name>d``: the strides of a ``(B, H, L, d)`` tensor."""
    names = _STRIDE_NAMES.get((name, row))
    if names is None:        # the names are built once, not per launch
        names = _STRIDE_NAMES[name, row] = (f"s_{name}b", f"s_{name}h", f"s_{name}{row}", f"s_{name}d")
    return dict(zip(names, t.stride()))


def _row_offset(q: Tensor, k: Tensor, num_query: int) -> int:
    """Sequence position of q's first row: the rows are the last Lq positions of [queries ; text]
    (0 when q holds every row, num_query for the ITG text-only rows; always 0 for cross-attention,
    which has num_query = 0 and no notion of position)."""
    return k.shape[2] - q.shape[2] if num_query else 0


def _kpm_bytes(kpm: Tensor | None) -> Tensor | None:
    """The key mask as the kernels read it: uint8, nonzero = real key (a bool mask is viewed, not copied)."""
    return None if kpm is None else (kpm if kpm.dtype == torch.bool else kpm != 0).view(torch.uint8)


def _masked_pointers(q, k, v, kpm, rng) -> dict:
    """The pointers of :func:`_masked_args`: ``kpm`` as :func:`_kpm_bytes` gives it, ``rng`` None without
    dropout. An absent one gets a never-read placeholder (HAS_KPM / DROPOUT off) of the dtype that keeps the
    build-checked signature: uint8 for the mask, int64 for the Philox pair."""
    return dict(q_ptr=q, k_ptr=k, v_ptr=v, kpm_ptr=placeholder(torch.uint8, q.device) if kpm is None else kpm,
                rng_ptr=placeholder(torch.int64, q.device) if rng is None else rng)


def _masked_args(q, k, v, kpm, num_query, scale, dropout_p, rng) -> dict:
    """The runtime arguments the forward, dK/dV and dQ kernels share."""
    kpm = _kpm_bytes(kpm)
    s_mb, s_mt = (0, 1) if kpm is None else kpm.stride()
    if dropout_p == 0.0:
        rng, thresh, drop_scale = None, 0, 1.0
    else:
        thresh, drop_scale = _dropout.threshold(dropout_p), _dropout.scale(dropout_p)
    return dict(_masked_pointers(q, k, v, kpm, rng), H=q.shape[1], Lq=q.shape[2], Lk=k.shape[2], NQ=num_query,
                row_off=_row_offset(q, k, num_query), qk_scale=scale * LOG2E, drop_thresh=thresh,
                drop_scale=drop_scale, **_strides("q", q, "m"), **_strides("k", k, "n"), **_strides("v", v, "n"),
                s_mb=s_mb, s_mt=s_mt)


def _fwd_args(q, k, v, out, lse, kpm, num_query, scale, dropout_p, rng) -> dict:
    return dict(_masked_args(q, k, v, kpm, num_query, scale, dropout_p, rng), o_ptr=out, lse_ptr=lse,
                **_strides("o", out, "m"))


def _delta_args(out, grad, delta) -> dict:
    return dict(o_ptr=out, do_ptr=grad, delta_ptr=delta, H=out.shape[1], Lq=out.shape[2],
                **_strides("o", out, "m"), **_strides("g", grad, "m"))


def _grad_args(grad, lse, delta, q, k, v, kpm, num_query, scale, dropout_p, rng) -> dict:
    """What the dK/dV and dQ kernels share beyond :func:`_masked_args`."""
    return dict(_masked_args(q, k, v, kpm, num_query, scale, dropout_p, rng), do_ptr=grad, lse_ptr=lse,
                delta_ptr=delta, sm_scale=scale, **_strides("g", grad, "m"))


def _dkdv_args(grad, lse, delta, dk, dv, *inputs) -> dict:
    return dict(_grad_args(grad, lse, delta, *inputs), dk_ptr=dk, dv_ptr=dv, **_strides("dk", dk, "n"),
                **_strides("dv", dv, "n"))


def _dq_args(grad, lse, delta, dq, *inputs) -> dict:
    return dict(_grad_args(grad, lse, delta, *inputs), dq_ptr=dq, **_strides("dq", dq, "m"))


def _mask_args(rng, keep, dropout_p) -> dict:
    return dict(rng_ptr=rng, keep_ptr=keep, Lq=keep.shape[1], Lk=keep.shape[2], thresh=_dropout.threshold(dropout_p))


# ------------------------------------------------------------------------------------------ launch plans
# What a launch needs besides its pointers (grid, sizes, strides, scalars, constexprs, config) depends only on
# the inputs' shapes, strides and dtype, the scalar arguments, the interpreter flag and the dot precision: it
# is computed once per such key, by the argument builders above called on meta tensors of those shapes and
# strides (so a plan holds exactly what the builders give), and each call adds only its pointers.
class _Launch(NamedTuple):
    grid: tuple[int, int]
    args: dict       # the builder's runtime arguments but the pointers
    meta: dict       # constexprs, config and launch options


def _plan_inputs(dtype, q, k, v, kpm, num_query, scale, dropout_p) -> tuple:
    """Meta stand-ins of the ``inputs`` the builders take, from plan-key layouts."""
    rng = torch.empty(2, dtype=torch.int64, device="meta") if dropout_p != 0.0 else None
    return (meta_from(q, dtype), meta_from(k, dtype), meta_from(v, dtype), meta_from(kpm, torch.bool), num_query, scale,
            dropout_p, rng)


@functools.lru_cache(maxsize=512, typed=True)    # typed: an int scale is an i32 argument, a float one fp32
def _forward_plan(dtype, q, k, v, kpm, num_query, mode, scale, dropout_p, interpreting, precision) -> _Launch:
    """The forward's launch for the layouts (``launch.layout``) ``q, k, v`` and ``kpm`` (after :func:`_kpm_bytes`)."""
    inputs = _plan_inputs(dtype, q, k, v, kpm, num_query, scale, dropout_p)
    qm = inputs[0]
    B, H, Lq, d = qm.shape
    out = _result(qm)
    lse = torch.empty((B, H, Lq), dtype=torch.float32, device="meta")
    upcast, precision, family = _launch_params(dtype, interpreting, precision)
    cfg = attention_config("fwd", family, d, dropout_p > 0)
    return _Launch((cdiv(Lq, cfg["BLOCK_M"]), B * H), without_pointers(_fwd_args(*inputs[:3], out, lse, *inputs[3:])),
                   _constexprs(d, mode, kpm is not None, dropout_p > 0, upcast, precision, cfg))


class _BackwardPlan(NamedTuple):
    delta: _Launch
    dkdv: _Launch | None     # None without keys (Lk = 0)
    dq: _Launch


@functools.lru_cache(maxsize=512, typed=True)
def _backward_plan(dtype, grad, out, q, k, v, kpm, num_query, mode, scale, dropout_p, interpreting,
                   precision) -> _BackwardPlan:
    """The three backward launches for the layouts of ``grad`` (in q's dtype), ``out``, ``q, k, v``, ``kpm``."""
    inputs = _plan_inputs(dtype, q, k, v, kpm, num_query, scale, dropout_p)
    qm, km = inputs[0], inputs[1]
    B, H, Lq, d = qm.shape
    Lk = km.shape[2]
    gm, om = meta_from(grad, dtype), meta_from(out, dtype)
    lse = delta = torch.empty((B, H, Lq), dtype=torch.float32, device="meta")
    dq = torch.empty((B, H, Lq, d), dtype=dtype, device="meta")
    dk = torch.empty((B, H, Lk, d), dtype=dtype, device="meta")
    upcast, precision, family = _launch_params(dtype, interpreting, precision)

    def plan(kernel: str, rows: int, block: str, args: dict) -> _Launch:
        cfg = attention_config(kernel, family, d, dropout_p > 0)
        meta = _constexprs(d, mode, kpm is not None, dropout_p > 0, upcast, precision, cfg)
        return _Launch((cdiv(rows, cfg[block]), B * H), without_pointers(args), meta)

    return _BackwardPlan(
        _Launch((cdiv(Lq, DELTA_CONFIG["BLOCK_M"]), B * H), without_pointers(_delta_args(om, gm, delta)),
                dict(HEAD_DIM=d, **DELTA_CONFIG)),
        plan("dkdv", Lk, "BLOCK_N", _dkdv_args(gm, lse, delta, dk, dk, *inputs)) if Lk > 0 else None,
        plan("dq", Lq, "BLOCK_M", _dq_args(gm, lse, delta, dq, *inputs)))


# ------------------------------------------------------------------------------------------ launchers
# Gradients are allocated dense (torch.empty's strides) with empty_like: a third of torch.empty's host time on a
# small CPU, where parsing a torch.Size and dtype/device keywords dominates an allocation. The forward's ``out`` is
# not dense (:func:`_result`): its layout saves the models a copy of it per layer in training.
_DENSE = torch.contiguous_format


def _result(q: Tensor) -> Tensor:
    """The forward's ``out``: ``(B, H, Lq, d)`` laid out ``(B, Lq, H, d)``, as the contract's fake gives it."""
    B, H, Lq, d = q.shape
    return q.new_empty_strided(q.shape, (Lq * H * d, d, H * d, 1))     # one call: as cheap as empty_like


def forward(q, k, v, kpm, num_query, mode, scale, dropout_p, rng) -> tuple[Tensor, Tensor]:
    """``(out (B, H, Lq, d) laid out (B, Lq, H, d), lse (B, H, Lq) fp32)``."""
    B, H, Lq, _ = q.shape
    out = _result(q)
    lse = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)
    if q.numel() == 0:
        return out, lse
    kpm = _kpm_bytes(kpm)
    plan = _forward_plan(q.dtype, layout(q), layout(k), layout(v), layout(kpm), num_query, mode, scale,
                         dropout_p, *host_dots(q.dtype))
    pointers = _masked_pointers(q, k, v, kpm, rng if dropout_p != 0.0 else None)
    launch(K._masked_attn_fwd_kernel, plan.grid, {**plan.args, **pointers, "o_ptr": out, "lse_ptr": lse}, plan.meta)
    return out, lse


def backward(grad, q, k, v, out, lse, kpm, num_query, mode, scale, dropout_p,
             rng) -> tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)`` shaped as ``q, k, v`` (contiguous), recomputing the probabilities from ``lse``."""
    B, H, Lq, _ = q.shape
    grad = as_dtype(grad, q.dtype)
    dq = torch.empty_like(q, memory_format=_DENSE)
    dk = torch.empty_like(k, dtype=q.dtype, memory_format=_DENSE)
    dv = torch.empty_like(k, dtype=q.dtype, memory_format=_DENSE)
    if q.numel() == 0:  # no rows: nothing flows to the keys
        return dq, dk.zero_(), dv.zero_()
    delta = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)
    kpm = _kpm_bytes(kpm)
    plan = _backward_plan(q.dtype, layout(grad), layout(out), layout(q), layout(k), layout(v), layout(kpm),
                          num_query, mode, scale, dropout_p, *host_dots(q.dtype))
    # the pointers all three gradient kernels read, built once
    shared = {**_masked_pointers(q, k, v, kpm, rng if dropout_p != 0.0 else None), "do_ptr": grad,
              "lse_ptr": lse.contiguous(), "delta_ptr": delta}
    step = plan.delta
    launch(K._masked_attn_bwd_delta_kernel, step.grid, {**step.args, "o_ptr": out, "do_ptr": grad,
                                                         "delta_ptr": delta}, step.meta)
    if plan.dkdv is not None:
        step = plan.dkdv
        launch(K._masked_attn_bwd_dkdv_kernel, step.grid, {**step.args, **shared, "dk_ptr": dk, "dv_ptr": dv},
               step.meta)
    step = plan.dq
    launch(K._masked_attn_bwd_dq_kernel, step.grid, {**step.args, **shared, "dq_ptr": dq}, step.meta)
    return dq, dk, dv


def dropout_keep_mask_triton(dropout_rng: Tensor, shape: tuple[int, int, int, int], dropout_p: float) -> Tensor:
    """The keep mask ``(B, H, Lq, Lk)`` bool as the Triton kernels draw it (compiled, or interpreted on CPU
    tensors), for checking them against ``vlmkern.reference.attention.dropout_keep_mask``."""
    B, H, Lq, Lk = shape
    keep = torch.empty((B * H, Lq, Lk), dtype=torch.uint8, device=dropout_rng.device)
    if keep.numel():
        cfg = DROPOUT_MASK_CONFIG
        launch(K._dropout_mask_kernel, (cdiv(Lq, cfg["BLOCK_M"]), B * H), _mask_args(dropout_rng, keep, dropout_p),
               cfg)
    return keep.view(B, H, Lq, Lk).bool()


# --------------------------------------------------------------------------------------- shipped builds
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_UNIT_STRIDES = ("s_qd", "s_kd", "s_vd", "s_od", "s_gd", "s_dqd", "s_dkd", "s_dvd", "s_mt")


def _specialized(label: str, fn, args: dict, consts: dict, cfg: dict, div16_extra=()) -> KernelBuild:
    """The common runtime case: contiguous head dim (stride 1) and 16-divisible pointers and outer strides
    (any (B, H, L, d) tensor or fused-QKV view with d in 32/64/128)."""
    div16 = [n for n in fn.arg_names if n.startswith("s_") and n != "s_mb"] + list(div16_extra)
    return build_from_args(label, fn, args, consts, cfg, unit=_UNIT_STRIDES, div16=div16)


def _meta_args(kernel: str, dtype: torch.dtype, d: int, kpm: bool, drop: bool) -> dict:
    """The launchers' argument builders on meta tensors of a (1, 2, 64 rows = 32 queries + 32 text) call."""
    def t(*shape, dt=dtype):
        return torch.empty(*shape, dtype=dt, device="meta")
    q, k, v, grad, out, dq, dk, dv = (t(1, 2, 64, d) for _ in range(8))
    lse, delta = t(1, 2, 64, dt=torch.float32), t(1, 2, 64, dt=torch.float32)
    inputs = (q, k, v, t(1, 32, dt=torch.bool) if kpm else None, 32, 0.125, 0.1 if drop else 0.0,
              t(2, dt=torch.int64) if drop else None)
    if kernel == "fwd":
        return _fwd_args(q, k, v, out, lse, *inputs[3:])
    if kernel == "dkdv":
        return _dkdv_args(grad, lse, delta, dk, dv, *inputs)
    return _dq_args(grad, lse, delta, dq, *inputs)


# The head dims the kernels are built for: the contract's ``TRITON.head_dims`` (a room never imports its contract;
# tests/ops/test_qformer_attention.py checks the two agree).
HEAD_DIMS = (32, 64, 128)


def _builds() -> list[KernelBuild]:
    """Every dtype x head dim x kernel with the heaviest mask (causal + key padding), without and with
    dropout; the other mask modes share tile shapes, so they are compiled once each (bf16, d = 64) to prove
    they build, and with dropout once more for cross-attention (full mask, no padding)."""
    builds = []
    head_dims = HEAD_DIMS
    causal, full, unimodal = QFormerMode.MULTIMODAL_CAUSAL, QFormerMode.BIDIRECTIONAL, QFormerMode.UNIMODAL
    heaviest = [(dt, d, causal, True, "ieee" if dt == "fp32" else "tf32") for dt in _DTYPES for d in head_dims]
    heaviest += [("fp32", d, causal, True, "tf32") for d in head_dims]
    variants = [(*v, False) for v in heaviest] + [(*v, True) for v in heaviest]
    variants += [("bf16", 64, m, kpm, "tf32", False) for m in (full, unimodal) for kpm in (False, True)]
    variants += [("bf16", 64, full, False, "tf32", True)]
    for dt, d, mode, kpm, prec, drop in variants:
        tag = f"{dt},d{d},mode{int(mode)},{'kpm' if kpm else 'nokpm'},{prec}" + (",dropout" if drop else "")
        for kernel, fn in (("fwd", K._masked_attn_fwd_kernel), ("dkdv", K._masked_attn_bwd_dkdv_kernel),
                           ("dq", K._masked_attn_bwd_dq_kernel)):
            cfg = attention_config(kernel, config_family(_DTYPES[dt].itemsize, prec), d, drop)
            unused = () if drop else ("drop_thresh",)        # launched as 0 without dropout: 16-divisible
            builds.append(_specialized(f"masked_attention_{kernel}[{tag}]", fn,
                                       _meta_args(kernel, _DTYPES[dt], d, kpm, drop),
                                       _constexprs(d, mode, kpm, drop, False, prec, cfg), cfg, unused))
    for dt, dtype in _DTYPES.items():
        for d in head_dims:
            out = torch.empty(1, 2, 64, d, dtype=dtype, device="meta")
            args = _delta_args(out, torch.empty_like(out), torch.empty(1, 2, 64, device="meta"))
            builds.append(_specialized(f"masked_attention_bwd_delta[{dt},d{d}]", K._masked_attn_bwd_delta_kernel,
                                       args, dict(HEAD_DIM=d, **DELTA_CONFIG), DELTA_CONFIG))
    keep = torch.empty(2, 64, 257, dtype=torch.uint8, device="meta")
    args = _mask_args(torch.empty(2, dtype=torch.int64, device="meta"), keep, 0.1)
    builds.append(build_from_args("attention_dropout_mask", K._dropout_mask_kernel, args, DROPOUT_MASK_CONFIG,
                                  DROPOUT_MASK_CONFIG))
    return builds


register_builds(*_builds())
