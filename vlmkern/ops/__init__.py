"""Functional ops with autograd, each a ``vlmkern::`` torch.library custom op dispatched to
triton / cuda / cpp / reference (``VLMKERN_BACKEND`` forces one)."""
from vlmkern.ops.attention import cross_attention, qformer_attention
from vlmkern.ops.patch_embed import patch_embed
from vlmkern.ops.projector import linear_gelu

__all__ = ["cross_attention", "linear_gelu", "patch_embed", "qformer_attention"]
