"""Pure-PyTorch references: the test oracle and the CPU path. Same signatures as ``vlmkern.ops``."""
from vlmkern.reference.attention import (cross_attention, cross_attention_mask, masked_attention,
                                         qformer_attention, qformer_attention_mask)
from vlmkern.reference.patch_embed import patch_embed, patchify
from vlmkern.reference.projector import linear_gelu

__all__ = ["cross_attention", "cross_attention_mask", "linear_gelu", "masked_attention", "patch_embed", "patchify",
           "qformer_attention", "qformer_attention_mask"]
