"""Pure-PyTorch references: the test oracle and the CPU path. Same signatures as ``vlmkern.ops``."""
from vlmkern.reference.attention import (additive_mask, cross_attention, cross_attention_mask, masked_attention,
                                         qformer_attention, qformer_attention_mask, qformer_mask_broadcast)
from vlmkern.reference.packing import gather_linear, gather_linear_gelu
from vlmkern.reference.patch_embed import patch_embed, patchify
from vlmkern.reference.projector import linear_gelu
from vlmkern.reference.routed_linear import cogvlm_expert_ids, expert_linear, partial_lora_linear
from vlmkern.reference.window_attention import patch_info_mining, window_attention, window_patches

__all__ = ["additive_mask", "cogvlm_expert_ids", "cross_attention", "cross_attention_mask", "expert_linear",
           "gather_linear", "gather_linear_gelu", "linear_gelu", "masked_attention", "partial_lora_linear",
           "patch_embed", "patch_info_mining", "patchify", "qformer_attention", "qformer_attention_mask",
           "qformer_mask_broadcast", "window_attention", "window_patches"]
