"""The Triton backend of the token-routed GEMMs: launch configurations, launchers and the shipped builds.

Every launch's runtime arguments are written once, by an argument builder (``_down_args``, ``_up_args``,
``_expert_args``, ``_tn_args``): the launchers pass what it returns, and :func:`_builds` calls it with meta
tensors laid out as the contract's calls lay them out, so the build check compiles what runs. Shapes are in
the launchers' docstrings; every operand may have any strides.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from vlmkern.kernels.routed_linear import _expert_gemm_kernel, _lora_down_kernel, _lora_up_kernel, _routed_tn_kernel
from vlmkern.ops.dispatch import dot_precision, triton_interpreting
from vlmkern.ops.launch import KernelBuild, build_from_args, cdiv, launch, register_builds

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


def _dot_flags(dtype: torch.dtype) -> dict:
    # the interpreter's low-precision dot is not trustworthy (bf16): fp32 products there
    return dict(UPCAST=triton_interpreting(), INPUT_PRECISION=dot_precision(dtype))


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
# Routing (mask / sel / ids) comes in as the kernels read it (``_flat``), a keep mask as uint8 or None.
def _down_args(a, b, mask, keep, out, scale, keep_scale) -> dict:
    return dict(a_ptr=a, b_ptr=b, mask_ptr=mask, keep_ptr=mask if keep is None else keep, out_ptr=out,
                M=a.shape[0], R=b.shape[0], K=a.shape[1], scale=float(scale), keep_scale=float(keep_scale),
                **_strides("am ak", a), **_strides("br bk", b), **_strides("km kk", keep), **_strides("om or", out))


def _up_args(a, w, u, v, bias, mask, keep, out, keep_scale) -> dict:
    return dict(a_ptr=a, w_ptr=w, u_ptr=u, v_ptr=v, bias_ptr=w if bias is None else bias, mask_ptr=mask,
                keep_ptr=mask if keep is None else keep, out_ptr=out,
                M=a.shape[0], N=w.shape[0], K=a.shape[1], R=u.shape[1], keep_scale=float(keep_scale),
                **_strides("am ak", a), **_strides("wn wk", w), **_strides("um ur", u), **_strides("vn vr", v),
                **_strides("km kn", keep), **_strides("om on", out))


def _expert_args(a, w0, w1, s_we, ids, out, num_experts) -> dict:
    s_wn, s_wk = w0.stride()[-2:]
    return dict(a_ptr=a, w_ptr=w0, w1_ptr=w1, ids_ptr=ids, out_ptr=out,
                M=a.shape[0], N=w0.shape[-2], K=a.shape[1], E=num_experts, **_strides("am ak", a),
                s_we=s_we, s_wn=s_wn, s_wk=s_wk, **_strides("om on", out))


def _tn_args(p, q, sel, keep, out, sel_base, scale, keep_scale) -> dict:
    return dict(p_ptr=p, q_ptr=q, sel_ptr=sel, keep_ptr=sel if keep is None else keep, out_ptr=out,
                M=p.shape[0], N=p.shape[1], K=q.shape[1], sel_base=int(sel_base), scale=float(scale),
                keep_scale=float(keep_scale), **_strides("pm pn", p), **_strides("qm qk", q),
                **_strides("km kk", keep), **_strides("og on ok", out))


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


# ----------------------------------------------------------------------------------------- launchers
def lora_down(a, b, mask, keep, scale, keep_scale) -> Tensor:
    """``m ⊙ scale·(drop(a) bᵀ)``: a (M, K), b (R, K), mask (M,) bool, keep (M, K) bool or None -> (M, R)."""
    M, K = a.shape
    R = b.shape[0]
    out = torch.empty((M, R), device=a.device, dtype=a.dtype)
    if out.numel() == 0 or K == 0:  # nothing to launch (a zero-size grid is an error)
        return out.zero_()
    cfg = config("down", a.dtype)
    launch(_lora_down_kernel, (cdiv(M, cfg["BLOCK_M"]), cdiv(R, cfg["BLOCK_R"])),
           _down_args(a, b, _flat(mask), _u8(keep), out, scale, keep_scale),
           dict(HAS_KEEP=keep is not None, **_dot_flags(a.dtype), **cfg))
    return out


def lora_up(a, w, u, v, mask, keep, keep_scale, bias=None) -> Tensor:
    """``a wᵀ + m ⊙ (u vᵀ) ⊙ keep·keep_scale + bias``: a (M, K), w (N, K), u (M, R), v (N, R) -> (M, N)."""
    M, N = a.shape[0], w.shape[0]
    out = torch.empty((M, N), device=a.device, dtype=a.dtype)
    if out.numel() == 0:
        return out
    cfg = config("up", a.dtype)
    launch(_lora_up_kernel, (cdiv(M, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"]),),
           _up_args(a, w, u, v, None if bias is None else _flat(bias), _flat(mask), _u8(keep), out, keep_scale),
           dict(HAS_BIAS=bias is not None, HAS_KEEP=keep is not None, **_dot_flags(a.dtype), **cfg))
    return out


def partial_lora(x, weight, bias, lora_a, lora_b, im_mask, keep, scaling, keep_scale) -> tuple[Tensor, Tensor]:
    """The forward: ``U = m ⊙ s·(drop(x) Aᵀ)`` (M, r), then ``y = x Wᵀ + U Bᵀ + b`` (M, out)."""
    u = lora_down(x, lora_a, im_mask, keep, scaling, keep_scale)
    return lora_up(x, weight, u, lora_b, im_mask, None, 1.0, bias), u


def routed_tn(p, q, sel, groups, sel_base, keep, scale, keep_scale) -> Tensor:
    """``out[g] = scale · Σ_{sel = g + base} p[m]ᵀ drop(q)[m]``: p (M, N), q (M, K) -> (groups, N, K)."""
    M, N = p.shape
    K = q.shape[1]
    out = torch.empty((groups, N, K), device=p.device, dtype=p.dtype)
    if out.numel() == 0 or M == 0:
        return out.zero_()
    cfg = config("tn", p.dtype)
    launch(_routed_tn_kernel, (cdiv(N, cfg["BLOCK_N"]), cdiv(K, cfg["BLOCK_K"]), groups),
           _tn_args(p, q, _flat(sel), _u8(keep), out, sel_base, scale, keep_scale),
           dict(HAS_KEEP=keep is not None, **_dot_flags(p.dtype), **cfg))
    return out


def expert_linear(a, ws, ids) -> Tensor:
    """``out[m] = ws[ids[m]] a[m]``: a (M, K), ws E matrices (N, K), ids (M,) int32 -> (M, N)."""
    M, N = a.shape[0], ws[0].shape[0]
    out = torch.empty((M, N), device=a.device, dtype=a.dtype)
    if out.numel() == 0:
        return out
    cfg = config("expert", a.dtype)
    w0, w1, s_we = _expert_operands(ws)
    launch(_expert_gemm_kernel, (cdiv(M, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"]),),
           _expert_args(a, w0, w1, s_we, _flat(ids), out, len(ws)),
           dict(PAIR=len(ws) <= 2, **_dot_flags(a.dtype), **cfg))
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
        g, u, keep = meta(M, N), meta(M, R), _u8(meta(M, D, dtype=torch.bool))
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
