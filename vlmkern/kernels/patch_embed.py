"""Fuyu patch embedding: raw pixels -> normalised patches (forward: written once, then a cuBLAS GEMM), and
its fused backward.

Row ``m`` of the GEMM is patch ``m % nP`` of image ``m // nP``; column ``k`` of a patch is
``(r*P + c)*C + ch`` (Fuyu's, channel-last inside a patch). A patch element is gathered straight from
the ``(B, C, H, W)`` pixel tensor; outside the image it is ``pad_value`` (raw units), and every value is
normalised as ``x * scale[ch] + shift[ch]`` (``scale = rescale/std``, ``shift = -mean/std``).
"""
from __future__ import annotations

import triton
import triton.language as tl

from vlmkern.kernels._common import dot


@triton.jit
def _patch_tile(pix_ptr, scale_ptr, shift_ptr, rm, rk, M, K, H, W, nW, nP, pad_value,
                s_pb, s_pc, s_ph, s_pw, C: tl.constexpr, P: tl.constexpr):
    """Normalised patch values for rows ``rm`` x columns ``rk`` as fp32 ``(len(rm), len(rk))``.

    Address = per-row base (image, patch origin; 64-bit) + per-column offset inside the patch (32-bit),
    so the 2-D work is one add and two compares per element.
    """
    img = rm // nP
    pidx = rm % nP
    y0 = (pidx // nW) * P
    x0 = (pidx % nW) * P
    ch = rk % C
    rc = rk // C
    r = rc // P
    c = rc % P
    row_base = img.to(tl.int64) * s_pb + y0.to(tl.int64) * s_ph + x0 * s_pw
    col_off = ch * s_pc + r * s_ph + c * s_pw
    inside = ((rm < M)[:, None] & (rk < K)[None, :]
              & (r[None, :] < (H - y0)[:, None]) & (c[None, :] < (W - x0)[:, None]))
    v = tl.load(pix_ptr + row_base[:, None] + col_off[None, :], mask=inside, other=0).to(tl.float32)
    v = tl.where(inside, v, pad_value)
    scale = tl.load(scale_ptr + ch, mask=rk < K, other=0.0)
    shift = tl.load(shift_ptr + ch, mask=rk < K, other=0.0)
    return v * scale[None, :] + shift[None, :]


@triton.jit
def _patchify_kernel(
    pix_ptr, out_ptr, scale_ptr, shift_ptr,
    M, K, K_pad, H, W, nW, nP, pad_value,
    s_pb, s_pc, s_ph, s_pw,
    C: tl.constexpr, P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[m, k] = patch[m, k] for k < K, 0 for K <= k < K_pad; out is dense ``(M, K_pad)`` in its own dtype.

    The forward's first half (a cuBLAS GEMM does the rest): memory bound, so each tile is read once from the
    pixels and written once as full, 16-element-aligned row segments (``K_pad`` is a multiple of 16), which
    compile to 16-byte vector stores. 2-D grid: (row tiles, column tiles), row tiles on the unbounded axis.
    """
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    # scale/shift read 0 past K, so the padding columns come out as exact zeros.
    v = _patch_tile(pix_ptr, scale_ptr, shift_ptr, rm, rk, M, K, H, W, nW, nP, pad_value,
                    s_pb, s_pc, s_ph, s_pw, C, P)
    offs = rm[:, None].to(tl.int64) * K_pad + rk[None, :]
    tl.store(out_ptr + offs, v.to(out_ptr.dtype.element_ty), mask=(rm < M)[:, None] & (rk < K_pad)[None, :])


@triton.jit
def _patch_embed_bwd_weight_kernel(
    pix_ptr, g_ptr, dw_ptr, scale_ptr, shift_ptr,
    M, N, K, H, W, nW, nP, pad_value,
    s_pb, s_pc, s_ph, s_pw, s_gm, s_gn, s_dn, s_dk,
    C: tl.constexpr, P: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dW[n, k] = sum_m g[m, n] * patch[m, k]; patches are re-gathered from pixels, never stored."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        a = _patch_tile(pix_ptr, scale_ptr, shift_ptr, rm, rk, M, K, H, W, nW, nP, pad_value,
                        s_pb, s_pc, s_ph, s_pw, C, P)
        a = tl.where((rm < M)[:, None], a, 0.0)
        gt = tl.load(g_ptr + rm[None, :].to(tl.int64) * s_gm + rn[:, None] * s_gn,
                     mask=(rm < M)[None, :] & (rn < N)[:, None], other=0.0)
        acc += dot(gt, a.to(gt.dtype), UPCAST, INPUT_PRECISION)
    offs = rn[:, None].to(tl.int64) * s_dn + rk[None, :] * s_dk
    tl.store(dw_ptr + offs, acc.to(dw_ptr.dtype.element_ty), mask=(rn < N)[:, None] & (rk < K)[None, :])


@triton.jit
def _patch_embed_bwd_pixels_kernel(
    g_ptr, w_ptr, dpix_ptr, scale_ptr,
    M, N, K, H, W, nW, nP,
    s_gm, s_gn, s_wn, s_wk, s_db, s_dc, s_dh, s_dw,
    C: tl.constexpr, P: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dpix[img, ch, y, x] = scale[ch] * (g @ W)[m, k] for the one (m, k) that pixel feeds.

    Patches do not overlap, so every in-image pixel is written exactly once and padding is dropped:
    no atomics, no zero-fill.
    """
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        g = tl.load(g_ptr + rm[:, None].to(tl.int64) * s_gm + rn[None, :] * s_gn,
                    mask=(rm < M)[:, None] & (rn < N)[None, :], other=0.0)
        w = tl.load(w_ptr + rn[:, None].to(tl.int64) * s_wn + rk[None, :] * s_wk,
                    mask=(rn < N)[:, None] & (rk < K)[None, :], other=0.0)
        acc += dot(g, w.to(g.dtype), UPCAST, INPUT_PRECISION)
    img = rm // nP
    pidx = rm % nP
    y0 = (pidx // nW) * P
    x0 = (pidx % nW) * P
    ch = rk % C
    rc = rk // C
    r = rc // P
    c = rc % P
    inside = ((rm < M)[:, None] & (rk < K)[None, :]
              & (r[None, :] < (H - y0)[:, None]) & (c[None, :] < (W - x0)[:, None]))
    scale = tl.load(scale_ptr + ch, mask=rk < K, other=0.0)
    row_base = img.to(tl.int64) * s_db + y0.to(tl.int64) * s_dh + x0 * s_dw
    col_off = ch * s_dc + r * s_dh + c * s_dw
    tl.store(dpix_ptr + row_base[:, None] + col_off[None, :], (acc * scale[None, :]).to(dpix_ptr.dtype.element_ty),
             mask=inside)

