"""``vlmkern::window_attention``: window-local LayerNorm attention pooling, and ``patch_info_mining`` on top of it
(Mini-Gemini's ``unified_resampler``, ``mgm/model/mgm_arch.py``).

The original projects every HR feature of every window to a key and a value (two ``C_aux x C`` GEMMs on
``B·N·M²`` rows) and then takes one ``1 x M²`` softmax per LR token. Both projections are linear, so per LR
token ``n`` with query ``q_n`` (``C``)::

    q_n · k_w = q_n · (Wk (ĥ_w ⊙ γk + βk) + bk) = u_n · ĥ_w + const_n,     u_n = (Wkᵀ q_n) ⊙ γk / sqrt(C)
    Σ_w a_w v_w = Wv (γv ⊙ s_n + βv) + bv,                            s_n = Σ_w a_w ĥ_w

(``const_n`` is the same for every key of the row, so the softmax ignores it; ``Σ a = 1``). ``ĥ`` is the
affine-free LayerNorm of ``h``, shared by the key and value paths. What remains per window is the custom op:
LayerNorm statistics, ``M²`` logits, softmax and a weighted sum in ``C_aux`` space, read in place from the
``(B, C_aux, Hh, Wh)`` map; the GEMMs ``q Wk`` and ``(…) Wvᵀ`` run once per LR token instead of once per HR
feature (``M²`` = 64 times fewer FLOP at 768 px), and neither K, V nor the re-arranged copy exists.

Logits are computed in fp32 (the original: in the model dtype, where they can overflow to ±inf before its
``nan_to_num``); a logit that is not finite even in fp32 (non-finite inputs) may come out as NaN -> 0 here
where the original clamps ±inf to ±max.

Backends: ``triton`` (``_triton.py``) and ``reference`` (``_torch.py``, pure PyTorch).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from vlmkern.ops import dispatch
from vlmkern.ops.checks import (FLOATS, as_dtype, autocasting, check_finite_scalar, check_same_device, check_tensor,
                                grid_axis_reasons, int32_count_reasons, int32_offset_reasons, once_per_key,
                                square_side)
from vlmkern.ops.dispatch import Capabilities, OpDispatch, register
from vlmkern.ops.window_attention import _torch

# What the Triton kernels take: the HR map's dtype (u is read as fp32 whatever its dtype).
TRITON = Capabilities(dtypes=(torch.float16, torch.bfloat16, torch.float32))


# --------------------------------------------------------------------------------------------- checks
def window_grid(num_tokens: int, aux_shape: Sequence[int], *, name: str = "images_aux",
                tokens_name: str = "u") -> tuple[int, int]:
    """``(PN, M)`` for ``num_tokens = PN²`` LR tokens (dim 1 of the argument ``tokens_name``) and an HR map
    ``name`` ``(..., PN·M, PN·M)``; ``ValueError`` naming the argument otherwise."""
    pn = square_side(num_tokens)
    if pn * pn != num_tokens or num_tokens == 0:
        raise ValueError(f"{tokens_name} must hold a number of low-resolution tokens (dim 1) that is a positive "
                         f"perfect square (a PN x PN grid), got {num_tokens}")
    hh, wh = aux_shape[-2], aux_shape[-1]
    if hh != wh or wh % pn or wh == 0:
        raise ValueError(f"{name} must be a square (PN·M, PN·M) map divisible into the {pn}x{pn} low-resolution "
                         f"grid, got spatial size ({hh}, {wh})")
    return pn, wh // pn


@once_per_key
def _check_window_inputs(u: Tensor, images_aux: Tensor, eps) -> None:
    check_tensor(u, "u", ndim=3, dtypes=FLOATS, shape_doc="(batch, tokens, channels)")
    check_tensor(images_aux, "images_aux", ndim=4, dtypes=FLOATS, shape_doc="(batch, channels, Hh, Wh)")
    check_same_device(u=u, images_aux=images_aux)
    if images_aux.shape[0] != u.shape[0]:
        raise ValueError(f"images_aux has batch {images_aux.shape[0]} but u has batch {u.shape[0]}")
    if images_aux.shape[1] != u.shape[2]:
        raise ValueError(f"images_aux has {images_aux.shape[1]} channels but u has {u.shape[2]}")
    if images_aux.shape[1] == 0:
        raise ValueError("images_aux must have at least one channel")
    window_grid(u.shape[1], images_aux.shape)
    check_finite_scalar(eps, "eps", minimum=0.0)


# ------------------------------------------------------------------------------------------- dispatch
def _triton_reasons(u, images_aux, *_, **__) -> list[str]:
    why = dispatch.triton_env_reasons(u.device) + TRITON.reasons(images_aux.dtype)
    # Batch and token bases are 64-bit; offsets inside one batch element of the map (and of its dense
    # gradient) and along a channel row are 32-bit.
    return (why + grid_axis_reasons(images=u.shape[0])         # one grid column per image
            + int32_count_reasons(images_aux, 1, "one images_aux batch element of its gradient")
            + int32_offset_reasons((1, 2, 3), images_aux=images_aux) + int32_offset_reasons((2,), u=u))


WINDOW_ATTENTION = register(OpDispatch("window_attention", {
    "triton": _triton_reasons,
    "reference": dispatch.never_refuses,
}))


# ------------------------------------------------------------------------------------ custom ops
@torch.library.custom_op("vlmkern::window_attention", mutates_args=())
def _window_attention_op(u: Tensor, images_aux: Tensor, eps: float
                         ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``s (B, N, C)`` and the rows the backward reads, ``mean, rstd, p, logit (B, N, M²)``."""
    return _torch.forward(u, images_aux, eps)


@_window_attention_op.register_fake
def _(u, images_aux, eps):
    B, N, C = u.shape
    _, m = window_grid(N, images_aux.shape)
    ct = _torch.compute_dtype(images_aux)
    rows = [u.new_empty((B, N, m * m), dtype=ct) for _ in range(4)]
    return (u.new_empty((B, N, C), dtype=ct), *rows)


@torch.library.custom_op("vlmkern::window_attention_backward", mutates_args=())
def _window_attention_backward_op(ds: Tensor, u: Tensor, images_aux: Tensor, mean: Tensor, rstd: Tensor,
                                  p: Tensor, logit: Tensor) -> tuple[Tensor, Tensor]:
    """``(du (B, N, C), d images_aux)`` for ``ds (B, N, C)``."""
    return _torch.backward(ds, u, images_aux, mean, rstd, p, logit)


@_window_attention_backward_op.register_fake
def _(ds, u, images_aux, mean, rstd, p, logit):
    return u.new_empty(u.shape, dtype=_torch.compute_dtype(images_aux)), torch.empty_like(
        images_aux, memory_format=torch.contiguous_format)


def _setup(ctx, inputs, output):
    u, images_aux, _eps = inputs
    s, mean, rstd, p, logit = output
    ctx.save_for_backward(u, images_aux, mean, rstd, p, logit)
    ctx.mark_non_differentiable(mean, rstd, p, logit)


def _backward(ctx, ds, *_):
    u, images_aux, mean, rstd, p, logit = ctx.saved_tensors
    du, dh = _window_attention_backward(ds, u, images_aux, mean, rstd, p, logit)
    return as_dtype(du, u.dtype), dh, None


dispatch.register_autograd(_window_attention_op, _backward, _setup)


def _on_triton(name: str):
    return dispatch.lazy(f"{__name__}._triton", name)

dispatch.implement(_window_attention_op, WINDOW_ATTENTION,
                   {"triton": _on_triton("forward"), "reference": _torch.forward},
                   probe=lambda u, images_aux, *_: (u, images_aux))
dispatch.implement(_window_attention_backward_op, WINDOW_ATTENTION,
                   {"triton": _on_triton("backward"), "reference": _torch.backward},
                   probe=lambda ds, u, images_aux, *_: (u, images_aux))


# Eager calls run the kernels without the dispatcher (dispatch.EagerOp); compiled ones see the ops.
_window_attention = dispatch.EagerOp(_window_attention_op)
_window_attention_backward = dispatch.BackwardOp(_window_attention_backward_op)


# ------------------------------------------------------------------------------------ public API
def window_attention(u: Tensor, images_aux: Tensor, eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """Each LR token attends to the affine-free LayerNorm of its own ``M x M`` HR window.

    Args:
        u: ``(B, N, C)`` per-token score vectors, ``N = PN²`` (any float dtype, any strides).
        images_aux: ``(B, C, PN·M, PN·M)`` HR feature map, any strides (read in place, never re-arranged).
        eps: LayerNorm epsilon.

    Returns:
        ``s (B, N, C)`` = ``Σ_w a_w ĥ_w`` and ``probs (B, N, M²)`` = ``softmax_w(nan_to_num(u · ĥ_w))``, both fp32
        (fp64 for fp64 inputs); ``s`` is differentiable in ``u`` and ``images_aux``.
    """
    _check_window_inputs(u, images_aux, eps)
    s, _mean, _rstd, p, _logit = _window_attention(u, images_aux, float(eps))
    return s, p


def _check_params(params, name: str, in_dim: int, out_dim: int | None, dtype: torch.dtype | None,
                  device: torch.device) -> None:
    """One ``(ln_weight, ln_bias, weight, bias)`` projector; ``dtype`` None (autocast) accepts any float dtype."""
    if not isinstance(params, (tuple, list)) or len(params) != 4:
        raise TypeError(f"{name} must be (ln_weight, ln_bias, weight, bias), got {type(params).__name__}")
    for part, t in zip(("ln_weight", "ln_bias", "weight", "bias"), params):
        check_tensor(t, f"{name} {part}", dtypes=FLOATS)
    ln_w, ln_b, w, b = params
    for pname, t, shape in ((f"{name} ln_weight", ln_w, (in_dim,)), (f"{name} ln_bias", ln_b, (in_dim,)),
                            (f"{name} weight", w, (out_dim if out_dim is not None else w.shape[0], in_dim)),
                            (f"{name} bias", b, (w.shape[0],))):
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{pname} must have shape {tuple(shape)}, got {tuple(t.shape)}")
        if dtype is not None and t.dtype != dtype:
            raise TypeError(f"{pname} has dtype {t.dtype} but the inputs are {dtype}")
        if t.device != device:
            raise ValueError(f"{pname} is on {t.device} but images is on {device}: all inputs must share one device")


def _check_eps(eps) -> tuple[float, float, float]:
    if not isinstance(eps, (tuple, list)) or len(eps) != 3:
        raise TypeError(f"eps must be a tuple of 3 floats (query, key, value LayerNorm eps), got {eps!r}")
    eps_q, eps_k, eps_v = (check_finite_scalar(e, f"eps[{i}]", minimum=0.0) for i, e in enumerate(eps))
    if eps_k != eps_v:
        raise ValueError(f"eps: the key and value LayerNorms must share eps (one set of statistics), got {eps_k} "
                         f"and {eps_v}")
    return eps_q, eps_k, eps_v


def _check_patch_info_mining(images, images_aux, query_params, key_params, value_params, eps):
    check_tensor(images, "images", ndim=3, dtypes=FLOATS, shape_doc="(batch, tokens, channels)")
    check_tensor(images_aux, "images_aux", ndim=4, dtypes=FLOATS, shape_doc="(batch, channels, Hh, Wh)")
    check_same_device(images=images, images_aux=images_aux)
    # Under autocast the originals' LayerNorms run in fp32 and Linears in the autocast dtype whatever the
    # parameters' dtypes: mixed dtypes are what autocast is for.
    dtype = None if autocasting(images) else images.dtype
    if dtype is not None and images_aux.dtype != dtype:
        raise TypeError(f"images_aux dtype {images_aux.dtype} must match images dtype {images.dtype}")
    if images_aux.shape[0] != images.shape[0]:
        raise ValueError(f"images_aux has batch {images_aux.shape[0]} but images has batch {images.shape[0]}")
    window_grid(images.shape[1], images_aux.shape, tokens_name="images")
    C, C_aux = images.shape[2], images_aux.shape[1]
    _check_params(query_params, "query_params", C, None, dtype, images.device)
    C_out = query_params[2].shape[0]
    if C_out == 0:
        raise ValueError("query_params weight must have at least one output feature")
    _check_params(key_params, "key_params", C_aux, C_out, dtype, images.device)
    _check_params(value_params, "value_params", C_aux, C_out, dtype, images.device)
    return _check_eps(eps)


def patch_info_mining(images: Tensor, images_aux: Tensor, query_params, key_params, value_params,
                      eps: tuple[float, float, float] = (1e-5, 1e-5, 1e-5)) -> Tensor:
    """Mini-Gemini ``unified_resampler``'s ``embed_feat`` (``mgm/model/mgm_arch.py``) through ``window_attention``.

    Args:
        images: ``(B, N, C)`` LR tokens, ``N = PN²``.
        images_aux: ``(B, C_aux, PN·M, PN·M)`` HR map (any strides).
        query_params, key_params, value_params: ``(ln_weight, ln_bias, weight, bias)`` of the three
            ``Sequential(LayerNorm, Linear)`` projectors: LayerNorm over ``C`` (query) / ``C_aux`` (key, value),
            Linear to ``C'`` (``C`` in Mini-Gemini); same dtype (any dtypes under ``torch.autocast``) and
            device as ``images``.
        eps: 3 finite non-negative epsilons of the query, key and value LayerNorms; key and value must agree
            (shared statistics).

    Returns:
        ``(B, N, C')`` in ``images.dtype`` (the autocast dtype under autocast, as the original's last Linear):
        ``Σ_w softmax_w(nan_to_num(q·k_w / sqrt(C'))) v_w`` over the token's window. A non-finite key-side
        constant ``q·(Wk βk + bk)`` (e.g. an infinite key bias) makes every logit of the row non-finite in the
        original, which ``nan_to_num`` maps to one value: the row's weights are uniform, here as there.
    """
    eps_q, eps_k, _ = _check_patch_info_mining(images, images_aux, query_params, key_params, value_params, eps)
    C, C_out = images.shape[2], query_params[2].shape[0]

    ln_qw, ln_qb, wq, bq = query_params
    q = F.linear(F.layer_norm(images, (C,), ln_qw, ln_qb, eps_q), wq, bq)          # (B, N, C')
    ln_kw, ln_kb, wk, bk = key_params
    ct = _torch.compute_dtype(images_aux)
    # Scaled first, as the original scales its keys before the product, and in the compute dtype: Wkᵀ q and the
    # row constant are partial sums of the logits, which in fp16 would overflow where the logits do not.
    qs = q.to(ct) / math.sqrt(C_out)
    q_aux = qs @ wk.to(ct)                                                        # Wkᵀ q / sqrt(C')  (B, N, C_aux)
    u = q_aux * ln_kw.to(ct)
    # βk and bk shift every logit of a row by the same amount (the softmax ignores it) unless it is not finite.
    shift = (q_aux * ln_kb.to(ct)).sum(-1, keepdim=True) + qs @ bk.to(ct).unsqueeze(-1)
    u = torch.where(torch.isfinite(shift), u, 0.0)
    s, _ = window_attention(u, images_aux, eps_k)
    ln_vw, ln_vb, wv, bv = value_params
    t = s * ln_vw.to(s.dtype) + ln_vb.to(s.dtype)                                  # Σ_w a_w LN_v(h_w)
    # The shift's gradient is exactly zero. Keep βk and bk in the graph anyway (zero gradients, as the
    # original's up to rounding) so that every parameter is used.
    t = t + shift.nan_to_num().to(t.dtype).mul(0.0)
    return F.linear(t.to(images.dtype), wv, bv)


__all__ = ["patch_info_mining", "window_attention", "window_grid"]
