"""Fuyu: ``FuyuModel.vision_embed_tokens`` (``nn.Linear(3*30*30, hidden)``) -> ``FuyuPatchEmbed``.

``FuyuPatchEmbed`` is a ``vlmkern.nn.PatchEmbedLinear`` (an ``nn.Linear``, same keys) whose ``forward`` also
takes images: transformers' ``FuyuModel.get_image_features`` passes ``pixel_values`` straight to
``vision_embed_tokens``, so when the processor hands over uint8 pixels (``FusedFuyuProcessor``, see
:func:`fused_processor`) the patched model runs ``vlmkern.ops.patch_embed`` (border pad, rescale, normalise,
patchify and the GEMM in one op) and ``FuyuProcessor``'s float patches never exist. Float patches (transformers'
own ``FuyuProcessor``) still go through the Linear, so the model takes either processor's output.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from vlmkern.integrations.hf._registry import Family, Swap, load_into_empty, meta_init, register
from vlmkern.nn import PatchEmbedLinear


class FuyuPatchEmbed(PatchEmbedLinear):
    """``vision_embed_tokens`` of a patched Fuyu model: patches -> Linear, uint8 images -> fused embedding."""

    def forward(self, x: Tensor | Sequence[Tensor]) -> Tensor:
        """``x``: float patches ``(..., in_features)`` -> ``(..., out_features)`` (``nn.Linear``), or uint8 images
        already resized (``FusedFuyuProcessor``'s ``pixel_values``): ``(B, C, H, W)``, one ``(C, H, W)`` or a
        list of ``(C, h_i, w_i)`` -> ``(sum of patches, out_features)``, rows in image order then row-major patch
        order (the placeholder order of the token stream)."""
        if isinstance(x, (list, tuple)):
            if not x or not all(isinstance(t, Tensor) and t.dtype == torch.uint8 and t.dim() == 3 for t in x):
                raise ValueError("images given as a list must be non-empty (C, H, W) uint8 tensors "
                                 "(FusedFuyuProcessor's pixel_values)")
            return torch.cat([self._embed_images(t[None]) for t in x])
        if isinstance(x, Tensor) and x.dtype == torch.uint8:
            if x.dim() not in (3, 4):
                raise ValueError(f"uint8 images must be (B, C, H, W) or (C, H, W), got shape {tuple(x.shape)}")
            return self._embed_images(x if x.dim() == 4 else x[None])
        return super().forward(x)

    def _embed_images(self, pixels: Tensor) -> Tensor:
        out = self.forward_images(pixels.to(self.weight.device))
        return out.reshape(-1, out.shape[-1])


def _patch_embed(original: nn.Linear):
    new = meta_init(FuyuPatchEmbed, original.in_features, original.out_features, bias=original.bias is not None)
    return load_into_empty(original, new)


def fused_processor(processor):
    """``FusedFuyuProcessor`` sharing ``processor``'s (a transformers ``FuyuProcessor``) tokenizer and image
    processor: its ``pixel_values`` are resized uint8 images, which only a patched model takes."""
    from vlmkern.integrations.hf.fuyu_processor import FusedFuyuProcessor   # imports transformers
    return FusedFuyuProcessor.from_processor(processor)


FAMILY = register(Family("fuyu", [
    Swap("vision_embed_tokens", "torch.nn:Linear", _patch_embed,
         owners=("transformers.models.fuyu.modeling_fuyu:FuyuModel",
                 "transformers.models.fuyu.modeling_fuyu:FuyuForCausalLM")),  # older layouts kept it on the LM
], doc=__doc__))
