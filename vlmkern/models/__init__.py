"""Full model parts built from ``vlmkern.nn``, loadable from the original checkpoints' layout.

``vlmkern.models.fuyu``: Fuyu's encoder-free image path (resize, patchify, fused patch embedding, image token
stream, scatter into the text embeddings).
"""
from vlmkern.models import fuyu

__all__ = ["fuyu"]
