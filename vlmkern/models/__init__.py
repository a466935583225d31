"""Full model parts built from ``vlmkern.nn``, loadable from the original checkpoints' layout.

``vlmkern.models.blip2`` / ``instructblip``: drop-in Q-Formers on the masked attention ops; ``lavis``: LAVIS key names.
``vlmkern.models.fuyu``: Fuyu's encoder-free image path (resize, patchify, fused patch embedding, image token
stream, scatter into the text embeddings).
``vlmkern.models.llava_next``: AnyRes tiling helpers and the fused project-and-pack (unpadded rows only, newline
rows written in the same pass).
``vlmkern.models.internlm_xcomposer2``: InternLM2 decoder layer whose five linears are partial LoRA (PLoRA).
``vlmkern.models.cogvlm``: CogVLM visual-expert MLP and attention (token-routed linears).
``vlmkern.models.qwen_vl``: the position-aware resampler (cached key-side position term, query side once per call).
``vlmkern.models.mini_gemini``: patch info mining on the fused region-local window attention.
``vlmkern.models.cogagent``: high-resolution cross-attention with cross K/V computed once per image.
``vlmkern.models.internlm_xcomposer2_hd``: ``HD_transform`` and the fused 2x2-merge + separators + projector.
"""
from vlmkern.models import (blip2, cogagent, cogvlm, fuyu, instructblip, internlm_xcomposer2, internlm_xcomposer2_hd,
                            lavis, llava_next, mini_gemini, qwen_vl)

__all__ = ["blip2", "cogagent", "cogvlm", "fuyu", "instructblip", "internlm_xcomposer2", "internlm_xcomposer2_hd",
           "lavis", "llava_next", "mini_gemini", "qwen_vl"]
