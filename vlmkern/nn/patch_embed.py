"""``PatchEmbedLinear``: drop-in for Fuyu's ``vision_embed_tokens = nn.Linear(C*p*p, hidden)``.

It *is* an ``nn.Linear`` (same constructor, parameters ``weight (out, C*p*p)`` / ``bias (out,)``, init and
``forward(patches)``), so ``load_state_dict`` from the original is strict-compatible. ``forward_images``
adds the fused path: raw ``(B, C, H, W)`` pixels -> normalise -> patchify -> GEMM + bias in one op
(``vlmkern.ops.patch_embed``), never materialising the ``(B, nP, C*p*p)`` patch tensor.
"""
from __future__ import annotations

import math
from typing import Sequence

from torch import Tensor, nn

from vlmkern import ops


def infer_patch_size(in_features: int, channels: int) -> int | None:
    """``p`` with ``channels * p * p == in_features``, or ``None`` when there is no such integer."""
    if channels <= 0 or in_features % channels:
        return None
    p = math.isqrt(in_features // channels)
    return p if p > 0 and p * p * channels == in_features else None


class PatchEmbedLinear(nn.Linear):
    """``nn.Linear(in_features, out_features, bias)`` over Fuyu patches, plus a fused path from pixels.

    ``patch_size`` is inferred from ``in_features`` for 3-channel images (2700 -> 30); ``forward_images``
    re-infers it from the pixels' channel count or takes it as an argument.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.patch_size = infer_patch_size(in_features, 3)

    def forward(self, patches: Tensor) -> Tensor:
        """``patches (..., in_features)`` (FuyuImageProcessor layout) -> ``(..., out_features)``."""
        if not isinstance(patches, Tensor):
            raise TypeError(f"patches must be a torch.Tensor, got {type(patches).__name__}")
        if not patches.is_floating_point():
            raise TypeError(f"patches must be a floating-point tensor, got {patches.dtype}")
        if patches.dim() == 0 or patches.shape[-1] != self.in_features:
            raise ValueError(f"patches must have last dim in_features={self.in_features}, "
                             f"got shape {tuple(patches.shape)}")
        return super().forward(patches)

    def forward_images(self, pixels: Tensor, *, patch_size: int | None = None, pad_value: float = 1.0,
                       rescale: float = 1 / 255, mean: float | Sequence[float] = 0.5,
                       std: float | Sequence[float] = 0.5) -> Tensor:
        """Fused path: raw pixels -> patch embeddings, equal to ``forward(patchify(pixels))``.

        Args:
            pixels: ``(B, C, H, W)`` or one image ``(C, H, W)``; uint8 or float in raw units (0..255),
                already resized (see ``vlmkern.models.fuyu.resize_to_fit``). Partial border patches are
                padded with ``pad_value`` in raw units, as FuyuImageProcessor does.
            patch_size: default: inferred so that ``C * patch_size**2 == in_features``.

        Returns:
            ``(B, ceil(H/p)*ceil(W/p), out_features)`` (no batch dim for a 3-D input) in ``weight.dtype``.
        """
        if not isinstance(pixels, Tensor):
            raise TypeError(f"pixels must be a torch.Tensor, got {type(pixels).__name__}")
        single = pixels.dim() == 3
        if single:
            pixels = pixels.unsqueeze(0)
        if pixels.dim() != 4:
            raise ValueError(f"pixels must be (B, C, H, W) or (C, H, W), got shape {tuple(pixels.shape)}")
        if patch_size is None:
            patch_size = infer_patch_size(self.in_features, pixels.shape[1])
            if patch_size is None:
                raise ValueError(
                    f"pixels has C={pixels.shape[1]} channels but in_features={self.in_features} is not "
                    f"C*patch_size**2 for any integer patch_size (this layer expects "
                    f"{'3-channel images' if self.patch_size else 'an explicit patch_size'}); "
                    f"pass patch_size or pixels with the right channel count")
        out = ops.patch_embed(pixels, self.weight, self.bias, patch_size=patch_size, pad_value=pad_value,
                              rescale=rescale, mean=mean, std=std)
        return out.squeeze(0) if single else out

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", patch_size={self.patch_size}" if self.patch_size else "")
