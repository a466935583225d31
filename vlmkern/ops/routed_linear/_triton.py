"""The Triton backend of the token-routed GEMMs: launch configurations, launchers and the shipped builds.

Every launch's runtime arguments are written once, by an argument builder (``_down_args``, ``_up_args``,
``_expert_args``, ``_tn_args``): the launchers pass what it returns, and :func:`_builds` calls it with meta
tensors laid out as the contract's calls lay them out, so the build check compiles what runs. A launcher
takes all but the pointers from a launch plan, the builder's result on meta tensors of the call's layouts,
memoised per (layouts, scalars, config, interpreter flag, dot precision), and adds the call's pointers
(``_*_ptrs``, which the builder itself uses). Shapes are in the launchers' docstrings; every operand may have
any strides.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from vlmkern.kernels.routed_linear import _expert_gemm_kernel, _lora_down_kernel, _lora_up_kernel, _routed_tn_kernel
from vlmkern.ops.routed_linear._dropout import check_packed, packed_width
from vlmkern.ops.launch import (KernelBuild, build_from_args, cdiv, host_dots, launch, layout, meta_from,
                                register_builds, without_pointers)

# Shipped launch configurations (the launchers use exactly these; the build check compiles them).
# Tests may swap entries of CONFIGS for small tiles to exercise multi-tile routing under the interpreter.
DOWN_CONFIG = dict(BLOCK_M=64, BLOCK_R=64, BLOCK_K=64, num_warps=4, num_stages=3)
UP_CONFIG = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
# Experts: 128 x 64 tiles because the per-expert accumulators (row isolation) spill on sm_80 with Triton 3.6
# at 128 x 128.
EXPERT_CONFIG = dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
# TN: 128 x 128 output tiles, 64-token reduction steps; two stages (two shared-memory buffers) because Triton
# 3.6 spills the expert dW build on sm_80 with three.
TN_CONFIG = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=2)
# fp32 (tf32 / ieee dots) operands take twice the registers and shared memory: smaller tiles (sized so
# that no shipped build spills on sm_80 / sm_90 with Triton 3.6 or 3.9, see ``python -m
# vlmkern.tools.gpu_build_check``; TN's 32-token reduction step and the two-stage fp32 down pipeline
# are what Triton 3.6 needs to stay spill-free; the fp32 expert GEMM, which stores per expert for row isolation,
# is single-stage: two stages spilled 4-16 B on sm_80 with Triton 3.9).
DOWN_FP32_CONFIG = dict(BLOCK_M=64, BLOCK_R=64, BLOCK_K=32, num_warps=8, num_stages=2)
# fp32 up: 16-wide K steps, because the low-rank-first loop spilled 8-12 B with Triton 3.6 at 32.
UP_FP32_CONFIG = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, GROUP_M=8, num_warps=8, num_stages=3)
EXPERT_FP32_CONFIG = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, GROUP_M=8, num_warps=8, num_stages=1)
TN_FP32_CONFIG = dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, num_warps=8, num_stages=3)
CONFIGS = {"down": DOWN_CONFIG, "up": UP_CONFIG, "expert": EXPERT_CONFIG, "tn": TN_CONFIG,
           "down_fp32": DOWN_FP32_CONFIG, "up_fp32": UP_FP32_CONFIG, "expert_fp32": EXPERT_FP32_CONFIG,
           "tn_fp32": TN_FP32_CONFIG}


def config(name: str, dtype: torch.dtype) -> dict:
    """The shipped launch configuration of kernel family ``name`` (down / up / expert / tn) for ``dtype``."""
    return CONFIGS[name + "_fp32" if dtype == torch.float32 else name]


def _u8(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.view(torch.uint8)


def _flat(t: Tensor) -> Tensor:
    """A 1-D routing / bias tensor the kernels index as ``ptr + i``: contiguous (a strided view would put the
    routing on the wrong rows), bool as uint8."""
    t = t.contiguous()
    return _u8(t) if t.dtype == torch.bool else t


def _strides(names: str, t: Optional[Tensor]) -> dict:
    """``{"s_am": a.stride(0), "s_ak": a.stride(1)}`` from ``"am ak"``; zeros for an absent tensor."""
    keys = ["s_" + n for n in names.split()]
    return dict(zip(keys, t.stride() if t is not None else (0,) * len(keys)))


# ------------------------------------------------------------------------------- argument builders
# Routing (mask / sel / ids) comes in as the kernels read it (``_flat``), a keep mask packed (``_dropout``)
# or None.
# ``_*_ptrs`` are a launch's pointer arguments (per call), ``_*_args`` all of its runtime arguments.
def _down_ptrs(a, b, mask, keep, out) -> dict:
    return dict(a_ptr=a, b_ptr=b, mask_ptr=mask, keep_ptr=mask if keep is None else keep, out_ptr=out)


def _down_args(a, b, mask, keep, out, scale, keep_scale) -> dict:
    return dict(**_down_ptrs(a, b, mask, keep, out),
                M=a.shape[0], R=b.shape[0], K=a.shape[1], scale=float(scale), keep_scale=float(keep_scale),
                **_strides("am ak", a), **_strides("br bk", b), **_strides("km kb", keep), **_strides("om or", out))


def _up_ptrs(a, w, u, v, bias, mask, keep, out) -> dict:
    return dict(a_ptr=a, w_ptr=w, u_ptr=u, v_ptr=v, bias_ptr=w if bias is None else bias, mask_ptr=mask,
                keep_ptr=mask if keep is None else keep, out_ptr=out)


def _up_args(a, w, u, v, bias, mask, keep, out, keep_scale) -> dict:
    return dict(**_up_ptrs(a, w, u, v, bias, mask, keep, out),
                M=a.shape[0], N=w.shape[0], K=a.shape[1], R=u.shape[1], keep_scale=float(keep_scale),
                **_strides("am ak", a), **_strides("wn wk", w), **_strides("um ur", u), **_strides("vn vr", v),
                **_strides("km kb", keep), **_strides("om on", out))


def _expert_ptrs(a, w0, w1, ids, out) -> dict:
    return dict(a_ptr=a, w_ptr=w0, w1_ptr=w1, ids_ptr=ids, out_ptr=out)


def _expert_args(a, w0, w1, s_we, ids, out, num_experts) -> dict:
    s_wn, s_wk = w0.stride()[-2:]
    return dict(**_expert_ptrs(a, w0, w1, ids, out),
                M=a.shape[0], N=w0.shape[-2], K=a.shape[1], E=num_experts, **_strides("am ak", a),
                s_we=s_we, s_wn=s_wn, s_wk=s_wk, **_strides("om on", out))


def _tn_ptrs(p, q, sel, keep, out) -> dict:
    return dict(p_ptr=p, q_ptr=q, sel_ptr=sel, keep_ptr=sel if keep is None else keep, out_ptr=out)


def _tn_args(p, q, sel, keep, out, sel_base, scale, keep_scale) -> dict:
    return dict(**_tn_ptrs(p, q, sel, keep, out),
                M=p.shape[0], N=p.shape[1], K=q.shape[1], sel_base=int(sel_base), scale=float(scale),
                keep_scale=float(keep_scale), **_strides("pm pn", p), **_strides("qm qk", q),
                **_strides("km kb", keep), **_strides("og on ok", out))


def _expert_operands(ws: list[Tensor]) -> tuple[Tensor, Tensor, int]:
    """``(w0, w1, s_we)``: two experts as their own matrices, never stacked (read with one set of strides);
    more as one stacked ``(E, N, K)`` tensor, keeping the experts' layout (a copy, not a transposition)."""
    if len(ws) <= 2:
        if ws[0].stride() != ws[-1].stride():
            ws = [w.contiguous() for w in ws]
        return ws[0], ws[-1], 0
    if all(w.stride(0) == 1 for w in ws):  # transposed views (the input gradient): stack the plain matrices
        stacked = torch.stack([w.t() for w in ws]).transpose(1, 2)
    else:
        stacked = torch.stack(ws)
    return stacked, stacked, stacked.stride(0)


# ------------------------------------------------------------------------------------- launch plans
# Everything a launch passes but its pointers depends only on the operands' shapes and strides, scalar
# arguments, the dtype's config, the interpreter flag and the dot precision: it is computed once per such key
# (the builder run on meta tensors of the same layouts, so a plan holds exactly what the builder gives) and
# looked up per call, where only the outputs are allocated and the pointers passed.
class _Plan(NamedTuple):
    grid: tuple
    static: dict        # the builder's runtime arguments less the pointers
    consts: dict        # constexpr flags, dot flags and the launch config


_PLANS = 1024           # plans remembered per launcher (distinct shapes / layouts / scalars)


def _setup(name: str, dtype: torch.dtype) -> tuple:
    """What a plan reads besides its operands: the kernel family (its config is read when the plan is made:
    after swapping a ``CONFIGS`` entry, :func:`clear_plans`), the dtype, the interpreter flag and the dot
    precision, in :func:`_plan_consts`' argument order."""
    return (name, dtype, *host_dots(dtype))


def _plan_consts(name: str, dtype, upcast: bool, precision: str, **flags) -> tuple[dict, dict]:
    """``(cfg, consts)`` of a plan from :func:`_setup`'s key parts and the launch's constexpr flags. UPCAST:
    the interpreter's low-precision dot is not trustworthy (bf16), so fp32 products there."""
    cfg = dict(config(name, dtype))
    return cfg, dict(**flags, UPCAST=upcast, INPUT_PRECISION=precision, **cfg)


def _dense(*shape: int, dtype: torch.dtype) -> Tensor:
    """A meta stand-in for a launcher's output or a ``_flat`` routing / bias tensor (contiguous)."""
    return torch.empty(shape, dtype=dtype, device="meta")


@functools.lru_cache(maxsize=_PLANS)
def _down_plan(a, b, keep, scale, keep_scale, *setup) -> _Plan:
    """``a``, ``b``, ``keep``: ``launch.layout`` of the operands; ``setup``: :func:`_setup` ``("down", dtype)``."""
    cfg, consts = _plan_consts(*setup, HAS_KEEP=keep is not None)
    dtype = setup[1]
    (M, _), R = a[0], b[0][0]
    args = _down_args(meta_from(a, dtype), meta_from(b, dtype), _dense(M, dtype=torch.uint8),
                      meta_from(keep, torch.uint8), _dense(M, R, dtype=dtype), scale, keep_scale)
    return _Plan((cdiv(M, cfg["BLOCK_M"]), cdiv(R, cfg["BLOCK_R"])), without_pointers(args), consts)


@functools.lru_cache(maxsize=_PLANS)
def _up_plan(a, w, u, v, has_bias, keep, keep_scale, *setup) -> _Plan:
    cfg, consts = _plan_consts(*setup, HAS_BIAS=has_bias, HAS_KEEP=keep is not None)
    dtype = setup[1]
    M, N = a[0][0], w[0][0]
    args = _up_args(meta_from(a, dtype), meta_from(w, dtype), meta_from(u, dtype), meta_from(v, dtype),
                    _dense(N, dtype=dtype) if has_bias else None, _dense(M, dtype=torch.uint8),
                    meta_from(keep, torch.uint8), _dense(M, N, dtype=dtype), keep_scale)
    return _Plan((cdiv(M, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"]),), without_pointers(args), consts)


@functools.lru_cache(maxsize=_PLANS)
def _tn_plan(p, q, keep, groups, sel_base, scale, keep_scale, *setup) -> _Plan:
    cfg, consts = _plan_consts(*setup, HAS_KEEP=keep is not None)
    dtype = setup[1]
    (M, N), K = p[0], q[0][1]
    args = _tn_args(meta_from(p, dtype), meta_from(q, dtype), _dense(M, dtype=torch.uint8),
                    meta_from(keep, torch.uint8), _dense(groups, N, K, dtype=dtype), sel_base, scale, keep_scale)
    return _Plan((cdiv(N, cfg["BLOCK_N"]), cdiv(K, cfg["BLOCK_K"]), groups), without_pointers(args), consts)


@functools.lru_cache(maxsize=_PLANS)
def _expert_plan(a, w0, s_we, num_experts, *setup) -> _Plan:
    cfg, consts = _plan_consts(*setup, PAIR=num_experts <= 2)
    dtype = setup[1]
    M, N = a[0][0], w0[0][-2]
    w = meta_from(w0, dtype)
    args = _expert_args(meta_from(a, dtype), w, w, s_we, _dense(M, dtype=torch.int32),
                        _dense(M, N, dtype=dtype), num_experts)
    return _Plan((cdiv(M, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"]),), without_pointers(args), consts)


def clear_plans() -> None:
    """Forget every launch plan: after changing ``CONFIGS`` (the plans hold the configs they were made with)."""
    for plan in (_down_plan, _up_plan, _tn_plan, _expert_plan, _forward_plans):
        plan.cache_clear()


# ----------------------------------------------------------------------------------------- launchers
def lora_down(a, b, mask, keep, scale, keep_scale) -> Tensor:
    """``m ⊙ scale·(drop(a) bᵀ)``: a (M, K), b (R, K), mask (M,) bool, keep None or packed
    (M, packed_width(K)) uint8 (``_dropout``) -> (M, R)."""
    return _down(a, layout(a), b, _flat(mask), keep, scale, keep_scale)


def lora_up(a, w, u, v, mask, keep, keep_scale, bias=None) -> Tensor:
    """``a wᵀ + m ⊙ (u vᵀ) ⊙ keep·keep_scale + bias``: a (M, K), w (N, K), u (M, R), v (N, R), keep
    None or packed (M, packed_width(N)) uint8 -> (M, N)."""
    return _up(a, layout(a), w, u, v, bias, _flat(mask), keep, keep_scale)


def partial_lora(x, weight, bias, lora_a, lora_b, im_mask, keep, scaling, keep_scale) -> tuple[Tensor, Tensor]:
    """The forward: ``U = m ⊙ s·(drop(x) Aᵀ)`` (M, r), then ``y = x Wᵀ + U Bᵀ + b`` (M, out); the mask is
    flattened once and both launches' plans come from one lookup (:func:`_forward_plans`)."""
    mask, x_layout = _flat(im_mask), layout(x)
    (M, K), N = x.shape, weight.shape[0]
    if M == 0 or K == 0 or N == 0:       # the launchers' empty cases
        u = _down(x, x_layout, lora_a, mask, keep, scaling, keep_scale)
        return _up(x, x_layout, weight, u, lora_b, bias, mask, None, 1.0), u
    down, up = _forward_plans(x_layout, layout(weight), bias is not None, layout(lora_a), layout(lora_b),
                              layout(keep), scaling, keep_scale, x.dtype, *host_dots(x.dtype))
    u = torch.empty((M, lora_a.shape[0]), device=x.device, dtype=x.dtype)
    ptrs = _down_ptrs(x, lora_a, mask, keep if keep is None else check_packed(keep, M, K), u)
    launch(_lora_down_kernel, down.grid, {**down.static, **ptrs}, down.consts)
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    ptrs = _up_ptrs(x, weight, u, lora_b, None if bias is None else _flat(bias), mask, None, y)
    launch(_lora_up_kernel, up.grid, {**up.static, **ptrs}, up.consts)
    return y, u


@functools.lru_cache(maxsize=_PLANS)
def _forward_plans(x, w, has_bias, lora_a, lora_b, keep, scaling, keep_scale, dtype, upcast,
                   precision) -> tuple[_Plan, _Plan]:
    """The plans of :func:`partial_lora`'s two launches (``launch.layout`` of the operands; U is the dense
    ``(M, r)`` result of the first)."""
    M, r = x[0][0], lora_a[0][0]
    u = ((M, r), (r, 1))
    return (_down_plan(x, lora_a, keep, scaling, keep_scale, "down", dtype, upcast, precision),
            _up_plan(x, w, u, lora_b, has_bias, None, 1.0, "up", dtype, upcast, precision))


# The two launches of lora_down / lora_up: ``a_layout`` is ``layout(a)``, ``mask`` already ``_flat``.
def _down(a, a_layout, b, mask, keep, scale, keep_scale) -> Tensor:
    M, K = a.shape
    out = torch.empty((M, b.shape[0]), device=a.device, dtype=a.dtype)
    if out.numel() == 0 or K == 0:  # nothing to launch (a zero-size grid is an error)
        return out.zero_()
    plan = _down_plan(a_layout, layout(b), layout(keep), scale, keep_scale, *_setup("down", a.dtype))
    ptrs = _down_ptrs(a, b, mask, keep if keep is None else check_packed(keep, M, K), out)
    launch(_lora_down_kernel, plan.grid, {**plan.static, **ptrs}, plan.consts)
    return out


def _up(a, a_layout, w, u, v, bias, mask, keep, keep_scale) -> Tensor:
    out = torch.empty((a.shape[0], w.shape[0]), device=a.device, dtype=a.dtype)
    if out.numel() == 0:
        return out
    plan = _up_plan(a_layout, layout(w), layout(u), layout(v), bias is not None, layout(keep), keep_scale,
                    *_setup("up", a.dtype))
    ptrs = _up_ptrs(a, w, u, v, None if bias is None else _flat(bias), mask,
                    keep if keep is None else check_packed(keep, *out.shape), out)
    launch(_lora_up_kernel, plan.grid, {**plan.static, **ptrs}, plan.consts)
    return out


def routed_tn(p, q, sel, groups, sel_base, keep, scale, keep_scale) -> Tensor:
    """``out[g] = scale · Σ_{sel = g + base} p[m]ᵀ drop(q)[m]``: p (M, N), q (M, K), keep None or
    packed (M, packed_width(K)) uint8 -> (groups, N, K)."""
    out = torch.empty((groups, p.shape[1], q.shape[1]), device=p.device, dtype=p.dtype)
    if out.numel() == 0 or p.shape[0] == 0:
        return out.zero_()
    plan = _tn_plan(layout(p), layout(q), layout(keep), groups, sel_base, scale, keep_scale,
                    *_setup("tn", p.dtype))
    ptrs = _tn_ptrs(p, q, _flat(sel), keep if keep is None else check_packed(keep, *q.shape), out)
    launch(_routed_tn_kernel, plan.grid, {**plan.static, **ptrs}, plan.consts)
    return out


def expert_linear(a, ws, ids) -> Tensor:
    """``out[m] = ws[ids[m]] a[m]``: a (M, K), ws E matrices (N, K), ids (M,) int32 -> (M, N)."""
    out = torch.empty((a.shape[0], ws[0].shape[0]), device=a.device, dtype=a.dtype)
    if out.numel() == 0:
        return out
    w0, w1, s_we = _expert_operands(ws)
    plan = _expert_plan(layout(a), layout(w0), s_we, len(ws), *_setup("expert", a.dtype))
    launch(_expert_gemm_kernel, plan.grid, {**plan.static, **_expert_ptrs(a, w0, w1, _flat(ids), out)},
           plan.consts)
    return out


# -------------------------------------------------------------------------------------- shipped builds
def _build(label, kernel, args, flags, cfg) -> KernelBuild:
    """Unit strides are the ones the meta launch has (contiguous inner dims, incl. transposed views).
    Divisible by 16: every pointer, every other stride and the model dims N, K, R (hidden sizes, ranks);
    never the token count M."""
    unit = [n for n, v in args.items() if n.startswith("s_") and v == 1]
    div16 = [n for n in args if n.startswith("s_") or n in ("N", "K", "R")]
    return build_from_args(label, kernel, args, {**flags, **cfg}, cfg, unit=unit, div16=div16)


def _builds() -> list[KernelBuild]:
    """The launches the contract makes, with meta tensors of a typical shape: forward and backward calls
    pass the same operands (transposed views included) as ``vlmkern.ops.routed_linear``'s op bodies."""
    M, D, N, R = 512, 4096, 6144, 64   # tokens, in, out, rank: only the layouts and flags matter
    builds = []
    for dt, t in ((torch.float16, "fp16"), (torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        meta = lambda *s, dtype=dt: torch.empty(s, dtype=dtype, device="meta")  # noqa: E731
        x, w, bias, a, b = meta(M, D), meta(N, D), meta(N), meta(R, D), meta(N, R)
        g, u, keep = meta(M, N), meta(M, R), meta(M, packed_width(D), dtype=torch.uint8)
        mask, ids = _flat(meta(M, dtype=torch.bool)), meta(M, dtype=torch.int32)
        base = dict(UPCAST=False, INPUT_PRECISION="ieee" if dt == torch.float32 else "tf32")

        def add(name, variant, kernel, args, family, **flags):
            builds.append(_build(f"{name}[{t},{variant}]", kernel, args, {**base, **flags}, config(family, dt)))

        for k in (keep, None):  # forward U = m·s·(drop(x) Aᵀ)
            add("lora_down", f"fwd,keep={k is not None}", _lora_down_kernel,
                _down_args(x, a, mask, k, meta(M, R), 1.0, 1.0), "down", HAS_KEEP=k is not None)
        add("lora_down", "bwd G=m·s·(dY B)", _lora_down_kernel,
            _down_args(g, b.t(), mask, None, meta(M, R), 1.0, 1.0), "down", HAS_KEEP=False)
        for bs in (bias, None):  # forward x Wᵀ + U Bᵀ + b
            add("lora_up", f"fwd,bias={bs is not None}", _lora_up_kernel,
                _up_args(x, w, u, b, bs, mask, None, g, 1.0), "up", HAS_BIAS=bs is not None, HAS_KEEP=False)
        for k in (keep, None):  # dX = dY W + keep ⊙ (G A)
            add("lora_up", f"dx,keep={k is not None}", _lora_up_kernel,
                _up_args(g, w.t(), u, a.t(), None, mask, k, meta(M, D), 1.0), "up", HAS_BIAS=False,
                HAS_KEEP=k is not None)
        for experts in ([w, meta(N, D)], [w, meta(N, D), meta(N, D)]):  # CogVLM's two nn.Linear weights; a stack
            for variant, rows, ws in (("fwd", x, experts), ("dx", g, [e.t() for e in experts])):
                add("expert_gemm", f"{variant},pair={len(ws) <= 2}", _expert_gemm_kernel,
                    _expert_args(rows, *_expert_operands(ws), ids, meta(M, ws[0].shape[0]), len(ws)), "expert",
                    PAIR=len(ws) <= 2)
        for k in (keep, None):  # adapter dA = Gᵀ drop(x) (keep) and dB = dYᵀ U
            add("routed_tn", f"lora,keep={k is not None}", _routed_tn_kernel,
                _tn_args(u, x, mask, k, meta(1, R, D), 1, 1.0, 1.0), "tn", HAS_KEEP=k is not None)
        add("routed_tn", "expert dW", _routed_tn_kernel, _tn_args(g, x, ids, None, meta(2, N, D), 0, 1.0, 1.0),
            "tn", HAS_KEEP=False)
    return builds


register_builds(*_builds())
