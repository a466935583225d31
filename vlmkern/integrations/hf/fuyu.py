"""Fuyu: ``FuyuModel.vision_embed_tokens`` (``nn.Linear(3*30*30, hidden)``) -> ``vlmkern.nn.PatchEmbedLinear``.

``PatchEmbedLinear`` is an ``nn.Linear`` with the same keys and ``forward(patches)``, so transformers' forward
(which embeds the processor's patches) runs unchanged; ``forward_images`` adds the fused pixels -> embeddings
path for callers that skip ``FuyuImageProcessor``'s patchify.
"""
from __future__ import annotations

from torch import nn

from vlmkern.integrations.hf._registry import Family, Swap, load_into_empty, meta_init, register
from vlmkern.nn import PatchEmbedLinear


def _patch_embed(original: nn.Linear):
    new = meta_init(PatchEmbedLinear, original.in_features, original.out_features, bias=original.bias is not None)
    return load_into_empty(original, new)


FAMILY = register(Family("fuyu", [
    Swap("vision_embed_tokens", "torch.nn:Linear", _patch_embed,
         owners=("transformers.models.fuyu.modeling_fuyu:FuyuModel",
                 "transformers.models.fuyu.modeling_fuyu:FuyuForCausalLM")),  # older layouts kept it on the LM
], doc=__doc__))
