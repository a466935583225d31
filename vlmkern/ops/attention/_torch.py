"""The attention ops' 'reference' backend: production PyTorch math on any device, and the eager CPU fast path.

Shapes as in the contract: ``q`` ``(B, H, Lq, d)``, ``k``/``v`` ``(B, H, Lk, d)``, ``key_mask`` ``(B, Lk - NQ)``
bool (True = real key) or None, ``lse`` ``(B, H, Lq)`` fp32 natural log (``+inf`` for a row that sees no key).
The mask follows :func:`vlmkern.masks.qformer_visible`; dropout follows :mod:`._dropout`.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from vlmkern.masks import QFormerMode, qformer_visible
from vlmkern.ops.attention import _dropout


def visibility(q_len: int, k_len: int, key_mask: Optional[Tensor], num_query: int, mode: int,
               device) -> Tensor:
    """Bool mask of the rows (the last ``q_len`` positions) over the keys, in its smallest broadcast shape:
    ``(1|B, 1, 1|q_len, k_len)``, never an expanded ``(B, 1, q_len, k_len)`` tensor."""
    rows = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    keys = torch.arange(k_len, device=device)[None, :]
    visible = qformer_visible(QFormerMode(mode), num_query, rows, keys)[None, None]
    if key_mask is None:
        return visible
    real = F.pad(key_mask != 0, (num_query, 0), value=True)         # queries are never padding
    return visible & real[:, None, None, :]


def additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """``mask`` as a bias of its shape: 0 where True, ``-inf`` where False."""
    return torch.where(mask, torch.zeros((), dtype=dtype, device=mask.device), float("-inf"))


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float,
              drop: Optional[Tensor] = None) -> Tensor:
    """``softmax(q k^T * scale, masked) (* drop) v`` in the input dtype, under plain autograd; a row that sees
    no key gives zeros (and zero gradients, never NaN)."""
    scores = q @ k.transpose(-1, -2) * scale
    if bool(mask.all()):
        probs = torch.softmax(scores, dim=-1)
    else:
        scores = scores + additive(mask, scores.dtype)
        seen = mask.any(-1, keepdim=True)
        if bool(seen.all()):
            probs = torch.softmax(scores, dim=-1)
        else:   # finite scores for the empty rows keep softmax's gradient finite; their probabilities are 0
            probs = torch.softmax(torch.where(seen, scores, 0.0), dim=-1).masked_fill(~mask, 0.0)
    return (probs if drop is None else probs * drop) @ v


def _multiplier(q: Tensor, k: Tensor, dropout_p: float, rng: Optional[Tensor], dtype) -> Optional[Tensor]:
    if dropout_p == 0.0:
        return None
    return _dropout.multiplier(rng, (q.shape[0], q.shape[1], q.shape[2], k.shape[2]), dropout_p, dtype)


def _cpu_flash(q: Tensor, k: Tensor) -> bool:
    """Whether torch's fused CPU flash kernels apply (one pass for out and lse, a fused backward): about 2x
    faster than explicit softmax on the CPU, and accumulating in fp32 for bf16."""
    return (q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16) and q.shape[2] > 0
            and k.shape[2] > 0 and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"))


# Eager CPU attention runs torch's fused flash kernel (with the mask as an additive -inf bias of its broadcast
# shape) instead of the explicit matmul-softmax-matmul, except for contiguous q/k/v with fewer score entries per
# head than this. Measured on the 2-core CI CPU, fp32, explicit vs flash, ms: strided views of the projections
# (as the models pass them) Q-Former cross 4x12 heads x 32x257 keys fwd 2.92 vs 1.55, fwd+bwd 8.4 vs 5.7;
# 32x12 x 32x677 fwd+bwd 295 vs 187; masked self-attention 64x12 x 64x64 fwd+bwd 66.7 vs 47.0. Contiguous:
# 16x12 x 32x257 fwd+bwd 14.3 vs 17.4 (explicit wins), 32 heads x 128x1600 34.8 vs 37.8, 512x6400 1119 vs 501.
_CPU_FLASH_MIN_SCORES = 1 << 17


def eager_cpu_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], num_query: int, mode: int,
                        scale: float, dropout_p: float, rng: Optional[Tensor]) -> Tensor:
    """An eager CPU call under plain autograd (no custom op): ``F.scaled_dot_product_attention`` (the flash CPU
    kernel) where it is faster and every row sees a key, else :func:`attention`."""
    mask = visibility(q.shape[2], k.shape[2], key_mask, num_query, mode, q.device)
    small = all(t.is_contiguous() for t in (q, k, v)) and q.shape[2] * k.shape[2] < _CPU_FLASH_MIN_SCORES
    if dropout_p == 0.0 and _cpu_flash(q, k) and not small:
        if bool(mask.all()):
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
        if bool(mask.any(-1).all()):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=additive(mask, q.dtype), scale=scale)
    return attention(q, k, v, mask, scale, _multiplier(q, k, dropout_p, rng, q.dtype))


def heads_interleaved(out: Tensor) -> Tensor:
    """``out (B, H, L, d)`` laid out ``(B, L, H, d)`` in memory, the layout every backend's forward returns (no copy
    when it already is, as torch's CPU flash kernel gives it)."""
    return out.transpose(1, 2).contiguous().transpose(1, 2)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def forward(q, k, v, key_mask, num_query, mode, scale, dropout_p, rng) -> tuple[Tensor, Tensor]:
    """``(out, lse)`` of the op; rows that see no key give zeros and ``lse = +inf``."""
    mask = visibility(q.shape[2], k.shape[2], key_mask, num_query, mode, q.device)
    empty = ~mask.any(-1)
    if _cpu_flash(q, k) and dropout_p == 0.0:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=additive(mask, q.dtype), scale=scale)
        return heads_interleaved(out.masked_fill(empty[..., None], 0.0)), lse.masked_fill(empty, float("inf"))
    out = attention(q, k, v, mask, scale, _multiplier(q, k, dropout_p, rng, q.dtype))
    scores = torch.matmul(q, k.transpose(-1, -2)).to(_compute_dtype(q.dtype)) * scale
    lse = torch.logsumexp(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return heads_interleaved(out), lse.masked_fill(empty, float("inf")).to(torch.float32)


def backward(grad, q, k, v, out, lse, key_mask, num_query, mode, scale, dropout_p,
             rng) -> tuple[Tensor, Tensor, Tensor]:
    """Softmax-attention gradients in fp32 (fp64 for fp64), recomputing the probabilities (or torch's fused
    CPU flash backward, from the forward's ``out`` and natural-log ``lse``; +inf rows get zero gradients).
    Dropout multiplies ``P`` in ``dV`` and ``dO V^T`` by the regenerated ``keep / (1 - p)``; the row term
    ``rowsum(P * dP)`` then is that of the dropped output."""
    mask = visibility(q.shape[2], k.shape[2], key_mask, num_query, mode, q.device)
    if _cpu_flash(q, k) and dropout_p == 0.0:
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad.contiguous(), q, k, v, out, lse, 0.0, False, attn_mask=additive(mask, q.dtype), scale=scale)
        # dense, as the fake declares and the Triton backward gives (torch's follow q / k / v's strides)
        return dq.contiguous(), dk.contiguous(), dv.contiguous()
    ct = _compute_dtype(q.dtype)
    qc, kc, vc, g = q.to(ct), k.to(ct), v.to(ct), grad.to(ct)
    has_key = mask.any(-1, keepdim=True)
    scores = torch.where(has_key, (qc @ kc.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf")), 0.0)
    p = torch.where(mask, torch.softmax(scores, dim=-1), 0.0)
    drop = _multiplier(q, k, dropout_p, rng, ct)
    dv = (p if drop is None else p * drop).transpose(-1, -2) @ g
    dp = g @ vc.transpose(-1, -2)
    if drop is not None:
        dp = dp * drop
    ds = p * (dp - (dp * p).sum(-1, keepdim=True))
    dq = ds @ kc * scale
    dk = ds.transpose(-1, -2) @ qc * scale
    return dq.to(q.dtype).contiguous(), dk.to(q.dtype).contiguous(), dv.to(q.dtype).contiguous()
