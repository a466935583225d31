"""Mini-Gemini patch info mining (``mgm_arch.py: unified_resampler``) in plain PyTorch.

``patch_info_mining`` is the original ``unified_resampler`` (the port in
:mod:`vlmkern.reference.originals.mini_gemini`) on the op's arguments. ``window_attention`` is the window-local
core of ``vlmkern.ops`` (the same signature), written with the same copy so that it is an independent oracle.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from vlmkern.reference.originals.mini_gemini import unified_resampler


def window_patches(images_aux: Tensor, patch_num: int) -> Tensor:
    """``(B, C, PN*M, PN*M)`` -> ``(B, PN², M², C)``, window position ``r*M + c`` (the original's order)."""
    B, C, _, W = images_aux.shape
    M = W // patch_num
    x = images_aux.permute(0, 2, 3, 1).reshape(B, patch_num, M, patch_num, M, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(B, patch_num ** 2, M ** 2, C)


def window_attention(u: Tensor, images_aux: Tensor, eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """``s_n = Σ_w softmax_w(nan_to_num(u_n · ĥ_w)) ĥ_w`` over token ``n``'s own window, ``ĥ`` the affine-free
    LayerNorm of the HR features. ``u (B, N, C)``, ``images_aux (B, C, Hh, Wh)`` -> ``(s (B, N, C), probs
    (B, N, M²))`` in ``u``'s dtype (the softmax in that dtype)."""
    pn = int(round(u.shape[1] ** 0.5))
    h = window_patches(images_aux.to(u.dtype), pn)
    hhat = F.layer_norm(h, (h.shape[-1],), eps=eps)
    logits = (hhat @ u.unsqueeze(-1)).squeeze(-1).nan_to_num()
    probs = logits.softmax(-1)
    return (probs.unsqueeze(-2) @ hhat).squeeze(-2), probs


def _ln_linear(params, eps: float):
    ln_w, ln_b, w, b = params
    return lambda x: F.linear(F.layer_norm(x, (x.shape[-1],), ln_w, ln_b, eps), w, b)


def patch_info_mining(images: Tensor, images_aux: Tensor, query_params, key_params, value_params,
                      eps: tuple[float, float, float] = (1e-5, 1e-5, 1e-5)) -> Tensor:
    """The original ``unified_resampler``'s ``embed_feat`` ``(B, N, C)``: ``images (B, N, C)`` LR tokens,
    ``images_aux (B, C_aux, Hh, Wh)``; each ``*_params`` = ``(ln_weight, ln_bias, weight, bias)`` of a
    ``Sequential(LayerNorm, Linear)``; ``eps`` of the query, key and value LayerNorms."""
    return unified_resampler(images, images_aux, _ln_linear(query_params, eps[0]), _ln_linear(key_params, eps[1]),
                             _ln_linear(value_params, eps[2]))
