"""Functional ops with autograd, each a ``vlmkern::`` torch.library custom op whose backends (triton / cuda /
cpp / reference) are registered per device (``VLMKERN_BACKEND`` forces one). One package per op family:
``<family>/__init__.py`` is its contract, ``_triton.py`` / ``_torch.py`` / ``_cpp.py`` its backends."""
from vlmkern.ops.attention import cross_attention, qformer_attention
from vlmkern.ops.patch_embed import patch_embed, patchify
from vlmkern.ops.projector import gather_linear, gather_linear_gelu, linear_gelu
from vlmkern.ops.routed_linear import cogvlm_expert_ids, expert_linear, partial_lora_linear
from vlmkern.ops.window_attention import patch_info_mining, window_attention
from vlmkern.ops import flops  # noqa: F401,E402  (FlopCounterMode formulas of the ops above)

__all__ = ["cogvlm_expert_ids", "cross_attention", "expert_linear", "gather_linear", "gather_linear_gelu",
           "linear_gelu", "partial_lora_linear", "patch_embed", "patch_info_mining",
           "patchify", "qformer_attention", "window_attention"]
