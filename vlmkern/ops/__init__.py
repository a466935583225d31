"""Functional ops with autograd, each a ``vlmkern::`` torch.library custom op dispatched to
triton / cuda / cpp / reference (``VLMKERN_BACKEND`` forces one)."""
from vlmkern.ops.patch_embed import patch_embed
from vlmkern.ops.projector import linear_gelu

__all__ = ["patch_embed", "linear_gelu"]
