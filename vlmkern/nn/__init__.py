"""Drop-in modules: same constructor, state_dict keys and forward as the originals; no math here."""
from vlmkern.nn.patch_embed import PatchEmbedLinear
from vlmkern.nn.plora import PLoRA
from vlmkern.nn.projector import MLPProjector
from vlmkern.nn.qformer import (QFormerAttention, QFormerEncoder, QFormerLayer, QFormerMultiHeadAttention,
                                QFormerTextEmbeddings)

__all__ = ["MLPProjector", "PLoRA", "PatchEmbedLinear", "QFormerAttention", "QFormerEncoder", "QFormerLayer",
           "QFormerMultiHeadAttention", "QFormerTextEmbeddings"]
