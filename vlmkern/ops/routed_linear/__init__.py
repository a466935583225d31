"""Token-routed GEMMs: ``vlmkern::partial_lora_linear`` (IXC2 PLoRA) and ``vlmkern::expert_linear`` (CogVLM).

Neither op synchronises with the host (no ``.item()``, ``nonzero``, boolean indexing, data-dependent
shapes) in forward or backward: the routing is read inside the kernels. The only exception is the
opt-in value check of ``expert_ids`` on CUDA (``validate_ids=True``).

Shapes: ``x (..., in)``; Partial LoRA ``weight (out, in)``, ``bias (out,)``, ``lora_a (r, in)``,
``lora_b (out, r)``, ``im_mask`` bool ``x.shape[:-1]``; expert ``weights (E, out, in)``, ``expert_ids``
integer ``x.shape[:-1]`` (weights may also be E separate ``(out, in)`` matrices). Results ``(..., out)`` in ``x.dtype``.

This module is the contract: the public functions and their argument checks, the ``vlmkern::`` custom ops
(whose bodies are the 'reference' backend), their autograd and the backend choice (:data:`PARTIAL_LORA`,
:data:`EXPERT_LINEAR`), registered per device. The backends: ``_triton`` (launchers, configs, shipped
builds; imported on the first Triton call) and ``_torch`` (pure PyTorch, any device).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from vlmkern.ops import dispatch as _dispatch
from vlmkern.ops.checks import (FLOATS, INT32_MAX, MASK_DTYPES, MAX_BLOCK, accumulate_dtype, as_dtype,
                                autocast_inputs, check_dropout_p, check_flag, check_same_device, check_tensor,
                                finite_number, int32_offset_reasons, once_per_key, rows_2d)
from vlmkern.ops.dispatch import Capabilities, OpDispatch, register
from vlmkern.ops.routed_linear import _dropout, _torch

_ID_DTYPES = MASK_DTYPES                # expert ids: any integer, or bool (two experts)
_TYPE_ID_DTYPES = MASK_DTYPES           # token types: integers, or bool (True = vision, as the original compares)
VISION_TOKEN_TYPE = 1                   # CogVLM's token_type_ids value of an image token


# --------------------------------------------------------------------------------------------- checks
def _check_same_dtype(first_name: str, first: Tensor, **tensors) -> None:
    for name, t in tensors.items():
        if t is not None and t.dtype != first.dtype:
            raise TypeError(f"{name} dtype {str(t.dtype).replace('torch.', '')} must match {first_name} dtype "
                            f"{str(first.dtype).replace('torch.', '')}")


@once_per_key
def check_im_mask(x: Tensor, im_mask: Optional[Tensor]) -> None:
    """``im_mask`` None or a bool ``x.shape[:-1]`` tensor (one flag per token of ``x``); errors name ``im_mask``.
    Also used by ``nn.PLoRA`` when it calls its adapter modules instead of this op."""
    if im_mask is None:
        return
    if not isinstance(im_mask, Tensor):
        raise TypeError(f"im_mask must be a bool torch.Tensor or None, got {type(im_mask).__name__}")
    if im_mask.dtype != torch.bool:
        raise TypeError(f"im_mask must have dtype bool (True = image token), got "
                        f"{str(im_mask.dtype).replace('torch.', '')}")
    if tuple(im_mask.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"im_mask must have shape x.shape[:-1] = {tuple(x.shape[:-1])} (one flag per token), "
                         f"got {tuple(im_mask.shape)}")


@once_per_key
def _check_partial_lora(x, weight, bias, lora_a, lora_b, im_mask, scaling, dropout_p) -> None:
    check_tensor(x, "x", dtypes=FLOATS)
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension (..., in_features), got a scalar")
    check_tensor(weight, "weight", ndim=2, dtypes=FLOATS, shape_doc="(out_features, in_features)")
    check_tensor(lora_a, "lora_a", ndim=2, dtypes=FLOATS, shape_doc="(r, in_features)")
    check_tensor(lora_b, "lora_b", ndim=2, dtypes=FLOATS, shape_doc="(out_features, r)")
    out_f, in_f = weight.shape
    if x.shape[-1] != in_f:
        raise ValueError(f"x has {x.shape[-1]} features in its last dimension but weight expects "
                         f"in_features={in_f}")
    if lora_a.shape[1] != in_f:
        raise ValueError(f"lora_a must have shape (r, in_features={in_f}), got {tuple(lora_a.shape)}")
    r = lora_a.shape[0]
    if r == 0:
        raise ValueError("lora_a must have rank r >= 1 rows, got 0")
    if tuple(lora_b.shape) != (out_f, r):
        raise ValueError(f"lora_b must have shape (out_features={out_f}, r={r}) to match weight and lora_a, "
                         f"got {tuple(lora_b.shape)}")
    if bias is not None:
        check_tensor(bias, "bias", ndim=1, dtypes=FLOATS, shape_doc="(out_features,)")
        if bias.shape[0] != out_f:
            raise ValueError(f"bias must have out_features={out_f} elements, got {bias.shape[0]}")
    _check_same_dtype("x", x, weight=weight, bias=bias, lora_a=lora_a, lora_b=lora_b)
    check_im_mask(x, im_mask)
    if not finite_number(scaling):
        raise ValueError(f"scaling must be a finite float (lora_alpha / lora_r), got {scaling!r}")
    check_dropout_p(dropout_p)
    check_same_device(x=x, weight=weight, bias=bias, lora_a=lora_a, lora_b=lora_b, im_mask=im_mask)


def _expert_weights(weights) -> list[Tensor]:
    """``(E, out, in)`` tensor or a sequence of E ``(out, in)`` tensors -> list of E ``(out, in)`` tensors (the
    matrices of a sequence are checked by :func:`_check_expert_linear`, once per layout)."""
    if isinstance(weights, Tensor):
        check_tensor(weights, "weights", ndim=3, dtypes=FLOATS, shape_doc="(num_experts, out_features, in_features)")
        ws = list(weights.unbind(0))
    elif isinstance(weights, (list, tuple)):
        ws = list(weights)
    else:
        raise TypeError(f"weights must be a (num_experts, out, in) tensor or a sequence of (out, in) tensors, "
                        f"got {type(weights).__name__}")
    if not ws:
        raise ValueError("weights must hold at least one expert, got num_experts=0")
    return ws


@once_per_key
def _check_expert_linear(x, ws, expert_ids) -> None:
    for i, w in enumerate(ws):
        check_tensor(w, f"weights[{i}]", ndim=2, dtypes=FLOATS, shape_doc="(out_features, in_features)")
        if w.shape != ws[0].shape:
            raise ValueError(f"weights[{i}] has shape {tuple(w.shape)} but weights[0] has {tuple(ws[0].shape)}: "
                             "every expert must have the same (out_features, in_features)")
    check_tensor(x, "x", dtypes=FLOATS)
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension (..., in_features), got a scalar")
    if x.shape[-1] != ws[0].shape[1]:
        raise ValueError(f"x has {x.shape[-1]} features in its last dimension but weights expects "
                         f"in_features={ws[0].shape[1]}")
    _check_same_dtype("x", x, weights=ws[0], **{f"weights[{i}]": w for i, w in enumerate(ws)})
    check_tensor(expert_ids, "expert_ids", dtypes=_ID_DTYPES)
    if expert_ids.dtype == torch.bool and len(ws) < 2:     # True is expert 1, which does not exist
        raise ValueError(f"expert_ids is bool (True = expert 1) but weights hold {len(ws)} expert: give two "
                         f"experts or integer ids")
    if tuple(expert_ids.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"expert_ids must have shape x.shape[:-1] = {tuple(x.shape[:-1])} (one expert per token), "
                         f"got {tuple(expert_ids.shape)}")
    check_same_device(x=x, expert_ids=expert_ids, **{f"weights[{i}]": w for i, w in enumerate(ws)})


def _check_ids_in_range(expert_ids: Tensor, num_experts: int) -> None:
    """One reduction (``aminmax``) and, off the CPU, one synchronisation."""
    if expert_ids.numel() == 0 or expert_ids.dtype == torch.bool or expert_ids.is_meta:
        return
    lo, hi = torch.aminmax(expert_ids)
    # two scalar reads on the CPU (cheaper than a stack); elsewhere one synchronisation for both
    lo, hi = (lo.item(), hi.item()) if expert_ids.is_cpu else torch.stack((lo, hi)).tolist()
    if lo < 0 or hi >= num_experts:
        raise ValueError(f"expert_ids must lie in [0, num_experts={num_experts}), got values in [{lo}, {hi}]")


# ------------------------------------------------------------------------------------------- dispatch
TRITON = Capabilities(dtypes=(torch.float16, torch.bfloat16, torch.float32))


def _triton_reasons(x, **tensors) -> list[str]:
    """``tensors``: every other tensor the launch reads, by name (their 32-bit offsets are checked; None entries
    are skipped)."""
    return (_dispatch.triton_env_reasons(x.device) + TRITON.reasons(x.dtype)
            + int32_offset_reasons(margin=MAX_BLOCK, x=x, **tensors))


def _expert_reasons(x, **tensors) -> list[str]:
    ws = [t for n, t in tensors.items() if n.startswith("weights[")]
    reasons = _triton_reasons(x, **tensors)
    if len(ws) > 2 and len(ws) * ws[0].numel() > INT32_MAX:  # stacked (E, N, K), expert offset e·N·K in 32-bit
        reasons.append(f"{len(ws)} experts of shape {tuple(ws[0].shape)} stack to more than 2**31-1 elements")
    return reasons


PARTIAL_LORA = register(OpDispatch("partial_lora_linear", {
    "triton": _triton_reasons,
    "reference": _dispatch.never_refuses,
}))
EXPERT_LINEAR = register(OpDispatch("expert_linear", {
    "triton": _expert_reasons,
    "reference": _dispatch.never_refuses,
}))


def _implement(op, dispatch: OpDispatch, name: str, probe: Callable[..., tuple]) -> None:
    """Register ``op`` per device: Triton's launcher ``name`` where it can run, else ``_torch.<name>``."""
    impls = {"triton": _dispatch.lazy(f"{__name__}._triton", name), "reference": getattr(_torch, name)}
    _dispatch.implement(op, dispatch, impls, probe)


# ------------------------------------------------------------------------------- partial LoRA op
@torch.library.custom_op("vlmkern::partial_lora_linear", mutates_args=())
def _partial_lora_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor,
                     im_mask: Tensor, keep: Optional[Tensor], scaling: float,
                     keep_scale: float) -> tuple[Tensor, Tensor]:
    """2-D core: x (M, in), im_mask (M,), keep None or the packed dropout mask (M, packed_width(in)) uint8
    (``_dropout``) -> (y (M, out), u (M, r)); u is saved for dB. Every op's ``keep`` is packed so."""
    return _torch.partial_lora(x, weight, bias, lora_a, lora_b, im_mask, keep, scaling, keep_scale)


@_partial_lora_op.register_fake
def _(x, weight, bias, lora_a, lora_b, im_mask, keep, scaling, keep_scale):
    return x.new_empty((x.shape[0], weight.shape[0])), x.new_empty((x.shape[0], lora_a.shape[0]))


@torch.library.custom_op("vlmkern::lora_down", mutates_args=())
def _lora_down_op(a: Tensor, b: Tensor, mask: Tensor, keep: Optional[Tensor], scale: float,
                  keep_scale: float) -> Tensor:
    """``m ⊙ scale·(drop(a) bᵀ)``, (M, R); backward of partial LoRA: ``G = m ⊙ s·(dY B)`` with b = Bᵀ."""
    return _torch.lora_down(a, b, mask, keep, scale, keep_scale)


@_lora_down_op.register_fake
def _(a, b, mask, keep, scale, keep_scale):
    return a.new_empty((a.shape[0], b.shape[0]))


@torch.library.custom_op("vlmkern::lora_up", mutates_args=())
def _lora_up_op(a: Tensor, w: Tensor, u: Tensor, v: Tensor, mask: Tensor, keep: Optional[Tensor],
                keep_scale: float) -> Tensor:
    """``a wᵀ + m ⊙ (u vᵀ) ⊙ drop-mask``; backward of partial LoRA: ``dX = dY W + keep ⊙ (G A)``."""
    return _torch.lora_up(a, w, u, v, mask, keep, keep_scale)


@_lora_up_op.register_fake
def _(a, w, u, v, mask, keep, keep_scale):
    return a.new_empty((a.shape[0], w.shape[0]))


@torch.library.custom_op("vlmkern::routed_tn", mutates_args=())
def _routed_tn_op(p: Tensor, q: Tensor, sel: Tensor, groups: int, sel_base: int, keep: Optional[Tensor],
                  scale: float, keep_scale: float) -> Tensor:
    """Weight gradients of routed rows: ``out[g] = scale · Σ_{sel = g + base} p[m]ᵀ drop(q)[m]``."""
    return _torch.routed_tn(p, q, sel, groups, sel_base, keep, scale, keep_scale)


@_routed_tn_op.register_fake
def _(p, q, sel, groups, sel_base, keep, scale, keep_scale):
    return p.new_empty((groups, p.shape[1], q.shape[1]))


def _plora_setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, im_mask, keep, scaling, keep_scale = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x, weight, lora_a, lora_b, im_mask, keep, output[1])
    ctx.scaling, ctx.keep_scale = scaling, keep_scale


def _plora_backward(ctx, grad, _grad_u):
    """dX = dY W + keep ⊙ (G A), dW = dYᵀ X, db = Σ dY, dA = Gᵀ drop(X), dB = dYᵀ U; G = m ⊙ s·(dY B)."""
    x, weight, lora_a, lora_b, im_mask, keep, u = ctx.saved_tensors
    need = ctx.needs_input_grad
    g = as_dtype(grad, x.dtype)
    dx = dw = db = da = dbl = None
    gm = None
    if need[0] and keep is None and not torch.is_grad_enabled():
        # Without dropout (G A unmasked) dX and G are the forward's own two GEMMs on (dY, Wᵀ, Bᵀ, Aᵀ): one op
        # call instead of two, same kernels and launches. Not under create_graph: the forward op's second output
        # is non-differentiable, so a double backward through it would silently miss G's dependencies; the two
        # backward ops run instead, and a second backward through them raises a clear error (dispatch.BackwardOp).
        dx, gm = _partial_lora(g, weight.t(), None, lora_b.t(), lora_a.t(), im_mask, None, ctx.scaling, 1.0)
    elif need[0] or need[3]:
        gm = _lora_down(g, lora_b.t(), im_mask, None, ctx.scaling, 1.0)
        if need[0]:
            dx = _lora_up(g, weight.t(), gm, lora_a.t(), im_mask, keep, ctx.keep_scale)
    if need[1]:
        dw = g.t().matmul(x)
    if need[2]:
        db = as_dtype(g.sum(dim=0, dtype=accumulate_dtype(x.dtype)), x.dtype)
    if need[3]:
        da = _routed_tn(gm, x, im_mask, 1, 1, keep, 1.0, ctx.keep_scale).squeeze(0)
    if need[4]:
        dbl = _routed_tn(g, u, im_mask, 1, 1, None, 1.0, 1.0).squeeze(0)
    return dx, dw, db, da, dbl, None, None, None, None


_dispatch.register_autograd(_partial_lora_op, _plora_backward, _plora_setup_context)
_implement(_partial_lora_op, PARTIAL_LORA, "partial_lora",
           lambda x, weight, bias, lora_a, lora_b, im_mask, keep, *_: dict(
               x=x, weight=weight, lora_a=lora_a, lora_b=lora_b, keep=keep))
_implement(_lora_down_op, PARTIAL_LORA, "lora_down", lambda a, b, mask, keep, *_: dict(x=a, b=b, keep=keep))
_implement(_lora_up_op, PARTIAL_LORA, "lora_up",
           lambda a, w, u, v, mask, keep, *_: dict(x=a, w=w, u=u, v=v, keep=keep))
_implement(_routed_tn_op, PARTIAL_LORA, "routed_tn",
           lambda p, q, sel, groups, base, keep, *_: dict(x=p, q=q, keep=keep))


# ------------------------------------------------------------------------------- expert linear op
@torch.library.custom_op("vlmkern::expert_linear", mutates_args=())
def _expert_linear_op(x: Tensor, weights: list[Tensor], expert_ids: Tensor) -> Tensor:
    """2-D core: x (M, in), E weights (out, in) any strides, expert_ids (M,) int32 -> (M, out)."""
    return _torch.expert_linear(x, weights, expert_ids)


@_expert_linear_op.register_fake
def _(x, weights, expert_ids):
    return x.new_empty((x.shape[0], weights[0].shape[0]))


def _expert_setup_context(ctx, inputs, output):
    x, weights, expert_ids = inputs
    ctx.num_experts = len(weights)
    ctx.save_for_backward(x, expert_ids, *weights)


def _expert_backward(ctx, grad):
    """dX[t] = dY[t] W_{e(t)} (same kernel, weights transposed); dW_e = Σ_{e(t)=e} dY[t]ᵀ x[t]."""
    x, ids, *weights = ctx.saved_tensors
    g = as_dtype(grad, x.dtype)
    dx = dws = None
    if ctx.needs_input_grad[0]:
        dx = _expert_linear(g, [w.t() for w in weights], ids)
    if ctx.needs_input_grad[1]:
        dws = list(_routed_tn(g, x, ids, ctx.num_experts, 0, None, 1.0, 1.0).unbind(0))
    return dx, dws, None


_dispatch.register_autograd(_expert_linear_op, _expert_backward, _expert_setup_context)
_implement(_expert_linear_op, EXPERT_LINEAR, "expert_linear",
           lambda x, weights, ids: dict(x=x, **{f"weights[{i}]": w for i, w in enumerate(weights)}))


# Eager calls run the kernels without the dispatcher (dispatch.EagerOp); compiled ones see the ops.
_partial_lora = _dispatch.EagerOp(_partial_lora_op)
_lora_down = _dispatch.BackwardOp(_lora_down_op)
_lora_up = _dispatch.BackwardOp(_lora_up_op)
_routed_tn = _dispatch.BackwardOp(_routed_tn_op)
_expert_linear = _dispatch.EagerOp(_expert_linear_op)


# ------------------------------------------------------------------------------------ public API
def _text_only_cpu_inference(x2, weight, bias, lora_a, lora_b, im_mask) -> bool:
    """An eager CPU call (``x2``: x's rows) on the reference backend that needs no gradient and has no image
    row (reading a CPU mask costs no sync). With gradients the op still runs, so that the adapter's parameters
    get their (zero) gradients, as the original's. Cheapest tests first."""
    return (im_mask.is_cpu and not _dispatch.needs_grad(x2, weight, bias, lora_a, lora_b)
            and _dispatch.eager_cpu_reference(PARTIAL_LORA, x2) and not bool(im_mask.any()))


def partial_lora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor,
                        im_mask: Optional[Tensor], scaling: float, dropout_p: float = 0.0,
                        training: bool = False) -> Tensor:
    """Partial LoRA linear: ``y = x Wᵀ + b + m · s · (drop(x) Aᵀ) Bᵀ`` with ``m = im_mask``.

    Args:
        x: ``(..., in)`` fp16 / bf16 / fp32; ``weight (out, in)``; ``bias (out,)`` or None;
            ``lora_a (r, in)``; ``lora_b (out, r)``, all in ``x.dtype`` (under ``torch.autocast`` all are
            cast to the autocast dtype first, as ``F.linear`` does).
        im_mask: bool ``x.shape[:-1]``, True on image tokens; None = no adapter (a plain linear).
        scaling: ``lora_alpha / lora_r``.
        dropout_p, training: dropout on the adapter input only, active when ``training and dropout_p > 0``;
            the keep mask is drawn from the current torch generator for every row
            (:func:`dropout_keep_mask`), so the reference reproduces it from the same state.

    The adapter runs on image rows only — exactly the base GEMM when there are none — and nothing
    synchronises with the host. Differentiable in x, weight, bias, lora_a and lora_b.
    """
    check_flag(training, "training")
    x, weight, bias, lora_a, lora_b = autocast_inputs(x, weight, bias, lora_a, lora_b)
    _check_partial_lora(x, weight, bias, lora_a, lora_b, im_mask, scaling, dropout_p)
    if im_mask is None:
        return torch.nn.functional.linear(x, weight, bias)
    keep, keep_scale = dropout_keep_mask(x, float(dropout_p), bool(training))
    x2 = rows_2d(x)
    if keep is None and _text_only_cpu_inference(x2, weight, bias, lora_a, lora_b, im_mask):
        # A decode step of text tokens: exactly the base GEMM, without the custom op's per-call overhead
        # (~70 us on the CPU, 160 PLoRA linears per InternLM-XComposer2 token).
        return torch.nn.functional.linear(x, weight, bias)
    y, _ = _partial_lora(x2, weight, bias, lora_a, lora_b, _rows_1d(im_mask),
                         None if keep is None else rows_2d(keep), float(scaling), float(keep_scale))
    return y if x2 is x else y.reshape(*x.shape[:-1], weight.shape[0])


def expert_linear(x: Tensor, weights: Tensor | Sequence[Tensor], expert_ids: Tensor, *,
                  validate_ids: Optional[bool] = None) -> Tensor:
    """Token-routed linear: ``y[t] = W_{expert_ids[t]} x[t]``, each token computed once by its expert.

    Args:
        x: ``(..., in)`` fp16 / bf16 / fp32.
        weights: ``(E, out, in)`` or a sequence of E ``(out, in)`` matrices (e.g. CogVLM's
            ``[language_expert.weight, vision_expert.weight]``, used in place: two experts are never
            stacked), in ``x.dtype``; no bias.
        expert_ids: integer or bool ``x.shape[:-1]`` with values in ``[0, E)``.
        validate_ids: check the id values (raises ValueError). Default: only when ids are on the CPU
            (where it costs no sync) and in eager mode (not traced, fake or transformed); on CUDA a row with an
            out-of-range id comes out NaN instead (never an out-of-bounds read). ``True`` on CUDA synchronises
            once.

    Differentiable in x and weights; no host synchronisation in forward or backward.
    """
    check_flag(validate_ids, "validate_ids", optional=True)
    ws = _expert_weights(weights)
    x, ws = autocast_inputs(x, ws)
    _check_expert_linear(x, ws, expert_ids)
    if validate_ids is None:  # free on the CPU; a data-dependent check would break a compiled graph
        validate_ids = expert_ids.is_cpu and _dispatch.eager_mode()
    if validate_ids:
        _check_ids_in_range(expert_ids, len(ws))
    x2 = rows_2d(x)
    y = _expert_linear(x2, ws, _int32_ids(_rows_1d(expert_ids), len(ws)))
    return y if x2 is x else y.reshape(*x.shape[:-1], ws[0].shape[0])


def _rows_1d(t: Tensor) -> Tensor:
    """A per-token tensor ``x.shape[:-1]`` as ``(prod(...),)``: a 1-D one itself (no view made per call)."""
    return t if t.dim() == 1 else t.reshape(-1)


def _int32_ids(ids: Tensor, num_experts: int) -> Tensor:
    """The kernels' int32 ids: int64 values are saturated to [-1, E] first, so an id beyond int32 stays out of
    range (its row comes out NaN) instead of wrapping onto a real expert."""
    if ids.dtype == torch.int32:
        return ids
    if ids.dtype == torch.int64:
        ids = ids.clamp(-1, num_experts)
    return ids.to(torch.int32)


@once_per_key
def _check_token_types(token_type_ids) -> None:
    check_tensor(token_type_ids, "token_type_ids", ndim=2, dtypes=_TYPE_ID_DTYPES, shape_doc="(B, L)")


def cogvlm_expert_ids(token_type_ids: Tensor) -> Tensor:
    """CogVLM routing: expert 1 (vision) iff a token and the next are vision-type (``get_expert_mask``), else 0.

    ``token_type_ids (B, L)`` integer or bool (True = vision) -> int32 ``(B, L)``, computed on device without
    a sync: the ``eoi`` token and a vision-type token in the last position use the language expert.
    """
    _check_token_types(token_type_ids)
    vision = token_type_ids.eq(VISION_TOKEN_TYPE)
    if vision.shape[1] == 0:
        return torch.zeros(vision.shape, dtype=torch.int32, device=vision.device)
    # a vision token followed by one (the eoi token is not): each token's successor is the mask shifted left
    # by one, a text flag padded in at the end (four torch ops in all)
    return (vision & torch.constant_pad_nd(vision, (-1, 1))).to(torch.int32)


def dropout_keep_mask(x: Tensor, dropout_p: float, training: bool) -> tuple[Optional[Tensor], float]:
    """The adapter input's dropout: ``(keep, keep_scale)``, keep the bit-packed uint8 mask
    ``(*x.shape[:-1], packed_width(in))`` (``_dropout.pack_keep``; None without dropout, i.e. unless
    ``training and dropout_p > 0``). The bool mask of ``x.shape`` is drawn from the current generator of ``x``'s
    device for every row, image or not, so that the random stream does not depend on the mask, exactly as the
    oracle (``vlmkern.reference.routed_linear``) draws it, then packed (and freed): 1 bit per element of ``x`` is
    what the backward keeps. The adapter sees ``x * keep * keep_scale``."""
    keep, keep_scale = _dropout.draw_keep(x, dropout_p, training)
    return (None if keep is None else _dropout.pack_keep(keep)), keep_scale
