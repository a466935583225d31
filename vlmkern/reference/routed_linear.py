"""Token-routed linears in plain PyTorch: Partial LoRA (IXC2) and the CogVLM visual expert.

The oracle (the ops' own pure-PyTorch backend, ``vlmkern.ops.routed_linear._torch``, is checked against it):
every row is computed by every branch and the routed result is selected with ``torch.where`` (never ``× 0``,
so an overflow on a row that does not take the branch cannot become NaN). The routing itself matches the
originals, which gather the routed rows instead.

Dropout convention of the adapter input (``vlmkern.ops.routed_linear.dropout_keep_mask`` draws the same mask):
when ``training and dropout_p > 0`` a keep mask of ``x``'s full shape is drawn with
``torch.empty(x.shape, dtype=bool).bernoulli_(1 - p)`` from the current generator of ``x``'s device — for every
row, image or not, so the random stream does not depend on the mask — and the adapter sees
``x * keep / (1 - p)``. The original draws ``nn.Dropout`` on the gathered image rows only, so its draws differ;
its distribution is the same.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

LANGUAGE_TOKEN_TYPE = 0
VISION_TOKEN_TYPE = 1


def dropout_keep_mask(x: Tensor, dropout_p: float, training: bool) -> tuple[Tensor | None, float]:
    """``(keep, keep_scale)`` for the adapter input: a bool mask of ``x.shape`` (None without dropout)."""
    if not training or dropout_p <= 0.0:
        return None, 1.0
    keep = torch.empty(x.shape, dtype=torch.bool, device=x.device).bernoulli_(1.0 - dropout_p)
    return keep, (0.0 if dropout_p >= 1.0 else 1.0 / (1.0 - dropout_p))


def partial_lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor,
                        im_mask: Tensor | None, scaling: float, dropout_p: float = 0.0, training: bool = False,
                        *, keep: Tensor | None = None, keep_scale: float | None = None) -> Tensor:
    """``y = x Wᵀ + b + m · s · (drop(x) Aᵀ) Bᵀ``, ``m = im_mask``.

    Shapes: ``x (..., in)``, ``weight (out, in)``, ``bias (out,)``, ``lora_a (r, in)``, ``lora_b (out, r)``,
    ``im_mask`` bool ``x.shape[:-1]`` (None: no adapter). ``keep``/``keep_scale`` give the dropout mask
    explicitly instead of drawing it (the ops layer draws it once and passes it here).
    """
    y = F.linear(x, weight, bias)
    if im_mask is None:
        return y
    if keep is None and keep_scale is None:
        keep, keep_scale = dropout_keep_mask(x, dropout_p, training)
    xd = x if keep is None else x * (keep.to(x.dtype) * keep_scale)
    low = F.linear(F.linear(xd, lora_a), lora_b) * scaling
    return y + torch.where(im_mask[..., None], low, torch.zeros((), dtype=low.dtype, device=low.device))


def expert_linear(x: Tensor, weights: Tensor | Sequence[Tensor], expert_ids: Tensor) -> Tensor:
    """``y[t] = W_{expert_ids[t]} x[t]``; ``x (..., in)``, ``weights (E, out, in)`` or E ``(out, in)``
    matrices, ids ``x.shape[:-1]``.

    Rows whose id is outside ``[0, E)`` come out NaN (the ops layer rejects such ids where it can check).
    """
    out = torch.full((*x.shape[:-1], weights[0].shape[0]), float("nan"), dtype=x.dtype, device=x.device)
    for e, w in enumerate(weights):
        out = torch.where((expert_ids == e)[..., None], F.linear(x, w), out)
    return out


def cogvlm_expert_ids(token_type_ids: Tensor) -> Tensor:
    """CogVLM routing (``get_expert_mask``): 1 (vision expert) where a token and the next are vision-type.

    ``token_type_ids (B, L)`` -> int32 ``(B, L)``; ``eoi`` and a vision token in the last position get 0.
    """
    vis = token_type_ids == VISION_TOKEN_TYPE
    both = vis[:, :-1] & vis[:, 1:]
    last = torch.zeros_like(vis[:, :1])
    return torch.cat([both, last], dim=1).to(torch.int32)
