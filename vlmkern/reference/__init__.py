"""Pure-PyTorch references: the test oracle and the CPU path. Same signatures as ``vlmkern.ops``."""
from vlmkern.reference.patch_embed import patch_embed, patchify
from vlmkern.reference.projector import linear_gelu

__all__ = ["patch_embed", "patchify", "linear_gelu"]
