"""The Triton backend of ``vlmkern::patch_embed``: launchers of ``vlmkern.kernels.patch_embed``, the shipped
configs, and the build signatures the offline build check compiles.

Forward: a Triton patchify kernel writes the normalised patches once, in the weight's dtype, into a
``(B*nP, K_pad)`` buffer (``K_pad``: ``K`` rounded up to 16 elements, zero-filled, so every row starts 16-byte
aligned), then torch's GEMM (cuBLAS on a GPU: pipelined, on the tensor cores) adds the Linear. A fused
gather-and-GEMM kernel cannot pipeline its main loop (a uint8 gather has no 4-byte runs for ``cp.async``), and
the extra pass costs ~19 MB of traffic against a ~51 GFLOP GEMM. The backward kernels stay fused.

Each launch's runtime arguments are written once, by an argument builder (``_patchify_args``, ...) that the
launcher and :func:`_builds` (with meta tensors) both call. The contract checks every input before these run.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from vlmkern.kernels.patch_embed import (_patch_embed_bwd_pixels_kernel, _patch_embed_bwd_weight_kernel,
                                         _patchify_kernel)
from vlmkern.ops.dispatch import keep_for_graphs
from vlmkern.ops.launch import (KernelBuild, LaunchPlan, build_from_args, cdiv, host_dots, launch, meta_tensor,
                                plan_from_args, register_builds, triton_type)

# Shipped launch configurations (the launchers use exactly these; the build check compiles them). The GEMM ones
# are keyed by the weight's element size: fp32 ("ieee") dots compile to FMAs and need smaller tiles not to spill.
# Patchify moves bytes only: 32 rows x 128 columns is 32 elements a thread in 16-byte stores (bf16), and K=2700
# (2704 padded) fills 22 column tiles with 4 % waste.
PATCHIFY_CONFIG = dict(BLOCK_M=32, BLOCK_K=128, num_warps=4, num_stages=1)
K_ALIGN = 16       # patch rows padded to this many elements: 16-byte aligned for any dtype, a "D" row stride
BWD_WEIGHT_CONFIG = {2: dict(BLOCK_M=32, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
                     4: dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=2)}
BWD_PIXELS_CONFIG = {2: dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, num_warps=8, num_stages=3),
                     4: dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=64, num_warps=4, num_stages=2)}


# ------------------------------------------------------------------------------------ argument builders
def _sizes(pixels: Tensor, p: int, **gemm: int) -> dict:
    """The GEMM sizes given (``M = B*nP`` patch rows, ``N`` features, ``K = C*p*p``) and the image / patch grid."""
    H, W = pixels.shape[2:]
    nW = cdiv(W, p)
    return dict(**gemm, H=H, W=W, nW=nW, nP=cdiv(H, p) * nW)


def _strides(names: str, t: Tensor) -> dict:
    return dict(zip(names.split(), t.stride()))


def _patchify_args(pixels, out, scale, shift, p, pad_value) -> dict:
    """``out (M, K_pad)`` dense; the patch width ``K = C*p*p``."""
    sizes = _sizes(pixels, p, M=out.shape[0], K=pixels.shape[1] * p * p)
    return dict(pix_ptr=pixels, out_ptr=out, scale_ptr=scale, shift_ptr=shift, **sizes, K_pad=out.shape[1],
                pad_value=float(pad_value), **_strides("s_pb s_pc s_ph s_pw", pixels))


def _bwd_weight_args(pixels, g, dw, scale, shift, p, pad_value) -> dict:
    """``g (M, N)`` the output gradient's rows, ``dw (N, K)``."""
    return dict(pix_ptr=pixels, g_ptr=g, dw_ptr=dw, scale_ptr=scale, shift_ptr=shift,
                **_sizes(pixels, p, M=g.shape[0], N=g.shape[1], K=dw.shape[1]), pad_value=float(pad_value),
                **_strides("s_pb s_pc s_ph s_pw", pixels), **_strides("s_gm s_gn", g), **_strides("s_dn s_dk", dw))


def _bwd_pixels_args(g, weight, dpix, scale, p) -> dict:
    """``g (M, N)``, ``dpix (B, C, H, W)``."""
    return dict(g_ptr=g, w_ptr=weight, dpix_ptr=dpix, scale_ptr=scale,
                **_sizes(dpix, p, M=g.shape[0], N=g.shape[1], K=weight.shape[1]), **_strides("s_gm s_gn", g),
                **_strides("s_wn s_wk", weight), **_strides("s_db s_dc s_dh s_dw", dpix))


def _constexprs(C: int, p: int, cfg: dict, *, upcast: bool, precision: str, **flags) -> dict:
    return dict(C=C, P=p, UPCAST=upcast, INPUT_PRECISION=precision, **flags, **cfg)


def _patchify_constexprs(C: int, p: int) -> dict:
    return dict(C=C, P=p, **PATCHIFY_CONFIG)


_SCALE_SHIFT: dict = {}


def _scale_shift(rescale: float, mean: list[float], std: list[float], device) -> tuple[Tensor, Tensor]:
    """Per channel ``norm(x) = x * scale + shift``: ``scale = rescale/std``, ``shift = -mean/std`` (fp32).

    Kept per (rescale, mean, std, device): the kernels only read them, and building them costs two tensors
    and two host-to-device copies per call (a model calls with the same normalisation every time)."""
    key = (rescale, tuple(mean), tuple(std), device)
    pair = _SCALE_SHIFT.get(key)
    if pair is None:
        scale = torch.tensor([rescale / s for s in std], dtype=torch.float32)
        shift = torch.tensor([-m / s for m, s in zip(mean, std)], dtype=torch.float32)
        if len(_SCALE_SHIFT) >= 64:
            _SCALE_SHIFT.clear()
        pair = _SCALE_SHIFT[key] = (scale.to(device), shift.to(device))
    return keep_for_graphs(pair) if pair[0].is_cuda else pair     # no call on the CPU host path


# --------------------------------------------------------------------------------------------- launch plans
# Launch plans (vlmkern.ops.launch.LaunchPlan): computed once per launch key by the argument builders on meta
# tensors; per call only the outputs are allocated and the pointers passed.
_PLANS = 256       # plans kept per launcher (an LRU: a model launches a handful of shapes)


@functools.lru_cache(maxsize=_PLANS)
def _patchify_plan(shape, stride, p: int, pad_value: float, pix_dtype: torch.dtype) -> tuple[LaunchPlan, tuple]:
    """The patchify launch's plan and the shape ``(B*nP, K_pad)`` of the buffer it writes."""
    B, C, H, W = shape
    M, K = B * cdiv(H, p) * cdiv(W, p), C * p * p
    buf = (M, cdiv(K, K_ALIGN) * K_ALIGN)
    grid = (cdiv(M, PATCHIFY_CONFIG["BLOCK_M"]), cdiv(buf[1], PATCHIFY_CONFIG["BLOCK_K"]))
    scale = meta_tensor((C,))
    args = _patchify_args(meta_tensor(shape, stride, pix_dtype), meta_tensor(buf), scale, scale, p, pad_value)
    return plan_from_args(grid, args, _patchify_constexprs(C, p)), buf


@functools.lru_cache(maxsize=_PLANS)
def _bwd_weight_plan(shape, stride, g_shape, g_stride, w_shape, p: int, pad_value: float, pix_dtype: torch.dtype,
                     dtype: torch.dtype, upcast: bool, precision: str) -> LaunchPlan:
    cfg = BWD_WEIGHT_CONFIG[dtype.itemsize]
    scale = meta_tensor((shape[1],))
    args = _bwd_weight_args(meta_tensor(shape, stride, pix_dtype), meta_tensor(g_shape, g_stride, dtype),
                            meta_tensor(w_shape, None, dtype), scale, scale, p, pad_value)
    grid = (cdiv(w_shape[0], cfg["BLOCK_N"]), cdiv(w_shape[1], cfg["BLOCK_K"]))
    return plan_from_args(grid, args, _constexprs(shape[1], p, cfg, upcast=upcast, precision=precision))


@functools.lru_cache(maxsize=_PLANS)
def _bwd_pixels_plan(shape, g_shape, g_stride, w_shape, w_stride, p: int, pix_dtype: torch.dtype,
                     dtype: torch.dtype, upcast: bool, precision: str) -> LaunchPlan:
    cfg = BWD_PIXELS_CONFIG[dtype.itemsize]
    args = _bwd_pixels_args(meta_tensor(g_shape, g_stride, dtype), meta_tensor(w_shape, w_stride, dtype),
                            meta_tensor(shape, None, pix_dtype), meta_tensor((shape[1],)), p)
    grid = (cdiv(args["M"], cfg["BLOCK_M"]), cdiv(w_shape[1], cfg["BLOCK_K"]))
    return plan_from_args(grid, args, _constexprs(shape[1], p, cfg, upcast=upcast, precision=precision))


# --------------------------------------------------------------------------------------------- launchers
def _patch_rows(pixels, plan: LaunchPlan, shape, rescale, mean, std, out_dtype) -> Tensor:
    """The dense ``shape = (B*nP, K_pad)`` patch buffer (columns ``K..K_pad`` zero) written by ``plan``'s launch."""
    buf = torch.empty(shape, device=pixels.device, dtype=out_dtype)
    scale, shift = _scale_shift(rescale, mean, std, pixels.device)
    launch(_patchify_kernel, plan.grid, dict(pix_ptr=pixels, out_ptr=buf, scale_ptr=scale, shift_ptr=shift),
           plan.static)
    return buf


def patchify(pixels, patch_size, pad_value, rescale, mean, std, out_dtype) -> Tensor:
    """``pixels (B, C, H, W)`` -> normalised patches ``(B, nP, K)`` in ``out_dtype`` (fp32/fp16/bf16), ``K =
    C*p*p``: a view of a dense ``(B*nP, K_pad)`` buffer whose columns ``K..K_pad`` hold zeros, so rows are
    ``K_pad`` apart (a multiple of 16 elements) and ``.view(B*nP, K)`` is a valid GEMM operand without a copy."""
    plan, shape = _patchify_plan(pixels.shape, pixels.stride(), patch_size, pad_value, pixels.dtype)
    buf = _patch_rows(pixels, plan, shape, rescale, mean, std, out_dtype)
    M, K_pad = shape
    nP, K = plan.static["nP"], plan.static["K"]
    return buf.as_strided((M // nP, nP, K), (nP * K_pad, K_pad, 1))


@functools.lru_cache(maxsize=_PLANS)
def _forward_plan(shape, stride, p: int, pad_value: float, pix_dtype: torch.dtype, N: int) -> tuple:
    """``(patchify plan, patch buffer shape, the GEMM's row view (None: the buffer itself), output shape)``."""
    plan, buf = _patchify_plan(shape, stride, p, pad_value, pix_dtype)
    M, K_pad = buf
    K = plan.static["K"]
    return plan, buf, None if K == K_pad else ((M, K), (K_pad, 1)), (shape[0], plan.static["nP"], N)


def forward(pixels, weight, bias, patch_size, pad_value, rescale, mean, std) -> Tensor:
    """``(B, nP, N)`` in ``weight.dtype``: the patches in the weight's dtype, then torch's ``F.linear`` (cuBLAS
    on a GPU; fp32 follows torch's TF32 setting as the reference does)."""
    plan, buf_shape, rows, out_shape = _forward_plan(pixels.shape, pixels.stride(), patch_size, pad_value,
                                                     pixels.dtype, weight.shape[0])
    if out_shape[2] == 0:                                  # no out_features: nothing to launch
        return torch.empty(out_shape, device=pixels.device, dtype=weight.dtype)
    buf = _patch_rows(pixels, plan, buf_shape, rescale, mean, std, weight.dtype)
    return F.linear(buf if rows is None else buf.as_strided(*rows), weight, bias).view(out_shape)


def grad_weight(grad, pixels, weight, patch_size, pad_value, rescale, mean, std) -> Tensor:
    N, K = weight.shape
    dw = torch.empty((N, K), device=weight.device, dtype=weight.dtype)
    if N == 0:
        return dw
    g = grad.reshape(-1, N)
    plan = _bwd_weight_plan(pixels.shape, pixels.stride(), g.shape, g.stride(), weight.shape, patch_size, pad_value,
                            pixels.dtype, weight.dtype, *host_dots(weight.dtype))
    scale, shift = _scale_shift(rescale, mean, std, pixels.device)
    launch(_patch_embed_bwd_weight_kernel, plan.grid,
           dict(pix_ptr=pixels, g_ptr=g, dw_ptr=dw, scale_ptr=scale, shift_ptr=shift), plan.static)
    return dw


def grad_pixels(grad, pixels, weight, patch_size, rescale, std) -> Tensor:
    B, C, H, W = pixels.shape
    N = weight.shape[0]
    dpix = torch.empty((B, C, H, W), device=pixels.device, dtype=pixels.dtype)
    if N == 0:                                             # no out_features: no gradient reaches the pixels
        return dpix.zero_()
    g = grad.reshape(-1, N)
    plan = _bwd_pixels_plan(pixels.shape, g.shape, g.stride(), weight.shape, weight.stride(), patch_size,
                            pixels.dtype, weight.dtype, *host_dots(weight.dtype))
    scale, _ = _scale_shift(rescale, [0.0] * C, std, pixels.device)
    launch(_patch_embed_bwd_pixels_kernel, plan.grid, dict(g_ptr=g, w_ptr=weight, dpix_ptr=dpix, scale_ptr=scale),
           plan.static)
    return dpix


# ----------------------------------------------------------------------------------------- build check
_PIXEL_DTYPES = (torch.uint8, torch.float16, torch.bfloat16, torch.float32)
_WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _builds() -> list[KernelBuild]:
    """Fuyu-8B: contiguous NCHW 3-channel images (unit innermost strides), patch 30, 4096 features, with bias."""
    B, C, H, W, p, N = 1, 3, 1080, 1920, 30, 4096
    M = B * cdiv(H, p) * cdiv(W, p)
    K_pad = cdiv(C * p * p, K_ALIGN) * K_ALIGN

    def meta(*shape, dtype):
        return torch.empty(shape, device="meta", dtype=dtype)

    builds = []
    for wdt in _WEIGHT_DTYPES:
        size = wdt.itemsize
        w, rows = meta(N, C * p * p, dtype=wdt), meta(M, N, dtype=wdt)
        scale = meta(C, dtype=torch.float32)
        dots = dict(upcast=False, precision="ieee" if size == 4 else "tf32")   # as on a GPU, TF32 off
        for pdt in _PIXEL_DTYPES:
            pix = meta(B, C, H, W, dtype=pdt)
            pair = f"{triton_type(pix)[1:]}->{triton_type(w)[1:]}"
            # As Triton's JIT specialises a 1080x1920 image: its row/plane/image strides and W are 16-divisible.
            builds.append(build_from_args(
                f"patch_embed_patchify[{pair}]", _patchify_kernel,
                _patchify_args(pix, meta(M, K_pad, dtype=wdt), scale, scale, p, 1.0),
                _patchify_constexprs(C, p), PATCHIFY_CONFIG,
                unit=("s_pw",), div16=("M", "K_pad", "W", "nW", "nP", "s_pb", "s_pc", "s_ph")))
            cfg = BWD_WEIGHT_CONFIG[size]
            builds.append(build_from_args(
                f"patch_embed_bwd_weight[{pair}]", _patch_embed_bwd_weight_kernel,
                _bwd_weight_args(pix, rows, w, scale, scale, p, 1.0), _constexprs(C, p, cfg, **dots), cfg,
                unit=("s_pw", "s_gn", "s_dk"), div16=("N", "s_gm")))
        for pdt in _PIXEL_DTYPES[1:]:
            dpix = meta(B, C, H, W, dtype=pdt)
            cfg = BWD_PIXELS_CONFIG[size]
            builds.append(build_from_args(
                f"patch_embed_bwd_pixels[{triton_type(w)[1:]}->{triton_type(dpix)[1:]}]",
                _patch_embed_bwd_pixels_kernel, _bwd_pixels_args(rows, w, dpix, scale, p),
                _constexprs(C, p, cfg, **dots), cfg,
                unit=("s_gn", "s_wk", "s_dw"), div16=("N", "s_gm")))
    return builds


register_builds(*_builds())
