"""FLOP formulas of the ``vlmkern::`` ops for ``torch.utils.flop_counter.FlopCounterMode`` (which counts a custom
op as 0 without one), so that MFU and FLOP budgets measured on a model that uses vlmkern count its GEMMs and
attention as they count torch's own.

Conventions, as torch's formulas: 2 FLOPs per multiply-add of the matrix products; attention as
``scaled_dot_product_attention`` (forward: the two batched products; backward: recompute + four products);
element-wise work (GELU, LayerNorm, normalisation of pixels) not counted. A formula sees shapes, not values:
partial LoRA's adapter is counted on every row (an upper bound: the kernels run it on image rows only), and
window attention (element-wise per window) is not counted.
"""
from __future__ import annotations

import math

import torch
from torch.utils.flop_counter import register_flop_formula, sdpa_backward_flop_count, sdpa_flop_count


def _rows(shape) -> int:
    return math.prod(shape[:-1])


def _gemm(m: int, n: int, k: int) -> int:
    return 2 * m * n * k


@register_flop_formula(torch.ops.vlmkern.linear_gelu)
def _linear_gelu(x, weight, *args, **kwargs) -> int:
    return _gemm(_rows(x), weight[0], weight[1])


@register_flop_formula(torch.ops.vlmkern.gather_linear)
def _gather_linear(x, index, weight, *args, **kwargs) -> int:
    return _gemm(index[0], weight[0], weight[1])


@register_flop_formula(torch.ops.vlmkern.partial_lora_linear)
def _partial_lora_linear(x, weight, bias, lora_a, lora_b, *args, **kwargs) -> int:
    m, (n, k), r = _rows(x), weight, lora_a[0]
    return _gemm(m, n, k) + _gemm(m, r, k) + _gemm(m, n, r)


@register_flop_formula(torch.ops.vlmkern.lora_down)
def _lora_down(a, b, *args, **kwargs) -> int:
    return _gemm(a[0], b[0], a[1])


@register_flop_formula(torch.ops.vlmkern.lora_up)
def _lora_up(a, w, u, v, *args, **kwargs) -> int:
    return _gemm(a[0], w[0], a[1]) + _gemm(a[0], w[0], u[1])


@register_flop_formula(torch.ops.vlmkern.routed_tn)
def _routed_tn(p, q, *args, **kwargs) -> int:
    return _gemm(p[1], q[1], p[0])          # each row reaches one group


@register_flop_formula(torch.ops.vlmkern.expert_linear)
def _expert_linear(x, weights, *args, **kwargs) -> int:
    return _gemm(x[0], weights[0][0], x[1])  # each token through its one expert


@register_flop_formula([torch.ops.vlmkern.qformer_attention, torch.ops.vlmkern.cross_attention])
def _attention(q, k, v, *args, **kwargs) -> int:
    return sdpa_flop_count(q, k, v)


@register_flop_formula(torch.ops.vlmkern.masked_attention_backward)
def _attention_backward(grad, q, k, v, *args, **kwargs) -> int:
    return sdpa_backward_flop_count(grad, q, k, v)


def _patches(pixels, patch_size: int) -> int:
    B, _, H, W = pixels
    return B * -(-H // patch_size) * -(-W // patch_size)


@register_flop_formula(torch.ops.vlmkern.patch_embed)
def _patch_embed(pixels, weight, bias, patch_size, *args, **kwargs) -> int:
    return _gemm(_patches(pixels, patch_size), weight[0], weight[1])


@register_flop_formula([torch.ops.vlmkern.patch_embed_grad_weight, torch.ops.vlmkern.patch_embed_grad_pixels])
def _patch_embed_grads(grad, pixels, weight, patch_size, *args, **kwargs) -> int:
    return _gemm(_patches(pixels, patch_size), weight[0], weight[1])
