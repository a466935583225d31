"""CogAgent high-resolution cross-attention (HF hub ``modeling_cogagent.py``: ``CrossAttention``).

Every LLM token (vision and language, every layer) attends to the ~6400 tokens of the 1120-px EVA2-CLIP-L
encoder, 32 heads of 32. ``CrossAttention`` keeps the original's parameters (``query``, ``key_value``,
``dense``, no biases), forward signature and return value ``(attn_output, None, past_key_value)``, and runs the
attention with ``vlmkern.ops.cross_attention`` (a non-causal ``Lq x 6400``, ``d = 32`` flash-style kernel).
The cross K/V are one ``key_value`` GEMM per image and layer, returned as ``past_key_value`` (the original's
``(B, H, Lk, d)`` layout, views into that GEMM's output) and reused on every later call of that layer
(decode steps) without recomputation; ``cross_kv`` computes them ahead of time.

Masks follow the original ``attention_fn``: an all-zero additive mask (the default ``zeros(B, 1, 1, 1)``) or
``None`` attends to every key (the kernel); an exactly lower-triangular 0/non-0 pattern takes SDPA with
``is_causal=True`` as the original does; any other mask takes the original's explicit path (fp32 softmax).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlmkern.models._config import positive_int
from vlmkern.ops.attention import cross_attention
from vlmkern.ops.checks import check_weight_dtype


@dataclass
class CogAgentCrossAttentionConfig:
    """What ``CrossAttention`` reads from its config; defaults are the released CogAgent's (``cogagent-chat-hf``).
    The original's config object (or any object with these attributes) works as well.

    Attributes:
        hidden_size: LLM width, the query input and output width (4096).
        cross_hidden_size: width of the high-resolution encoder's tokens, the key/value input (1024,
            EVA2-CLIP-L at 1120 px: 6400 tokens).
        cross_compute_hidden_size: width of the cross-attention's queries, keys and values (1024).
        num_attention_heads: heads; the cross head dim is ``cross_compute_hidden_size // num_attention_heads``
            (32 heads of 32).
    """

    hidden_size: int = 4096
    cross_hidden_size: int = 1024
    cross_compute_hidden_size: int = 1024
    num_attention_heads: int = 32


def _cfg(config, name: str) -> int:
    return positive_int(config, name, CogAgentCrossAttentionConfig)


class CrossAttention(nn.Module):
    """Drop-in for CogAgent's ``CrossAttention(config)``: ``hidden_states (B, Lq, hidden_size)``,
    ``encoder_outputs (B, Lk, cross_hidden_size)`` -> ``(attn_output (B, Lq, hidden_size), None, past_key_value)``.

    ``config``: a :class:`CogAgentCrossAttentionConfig`, or any object with its fields (the original's config).
    """

    def __init__(self, config: CogAgentCrossAttentionConfig):
        super().__init__()
        self.config = config
        self.hidden_size = _cfg(config, "hidden_size")
        self.cross_hidden_size = _cfg(config, "cross_hidden_size")
        self.cross_compute_hidden_size = _cfg(config, "cross_compute_hidden_size")
        self.num_heads = _cfg(config, "num_attention_heads")
        if self.cross_compute_hidden_size % self.num_heads:
            raise ValueError(f"config.cross_compute_hidden_size ({self.cross_compute_hidden_size}) must be divisible "
                             f"by config.num_attention_heads ({self.num_heads})")
        self.head_dim = self.hidden_size // self.num_heads
        self.cross_head_dim = self.cross_compute_hidden_size // self.num_heads
        self.max_position_embeddings = getattr(config, "max_position_embeddings", None)
        self.query = nn.Linear(self.hidden_size, self.cross_compute_hidden_size, bias=False)
        self.key_value = nn.Linear(self.cross_hidden_size, self.cross_compute_hidden_size * 2, bias=False)
        self.dense = nn.Linear(self.cross_compute_hidden_size, self.hidden_size, bias=False)

    def _heads(self, t: Tensor) -> Tensor:
        return t.unflatten(-1, (self.num_heads, self.cross_head_dim)).transpose(1, 2)

    def cross_kv(self, encoder_outputs: Tensor) -> tuple[Tensor, Tensor]:
        """Cross keys and values ``(B, H, Lk, d)`` each (views of one ``key_value`` GEMM), computed once per image."""
        if not isinstance(encoder_outputs, Tensor) or encoder_outputs.dim() != 3:
            raise ValueError("encoder_outputs must be a 3-D tensor (batch, image_tokens, cross_hidden_size), got "
                             f"{getattr(encoder_outputs, 'shape', type(encoder_outputs).__name__)}")
        if encoder_outputs.shape[-1] != self.cross_hidden_size:
            raise ValueError(f"encoder_outputs has last dim {encoder_outputs.shape[-1]} but "
                             f"config.cross_hidden_size is {self.cross_hidden_size}")
        if not encoder_outputs.is_floating_point():
            raise TypeError(f"encoder_outputs must be a floating-point tensor, got {encoder_outputs.dtype}")
        if encoder_outputs.device != self.key_value.weight.device:
            raise ValueError(f"encoder_outputs is on {encoder_outputs.device} but the module's weights are on "
                             f"{self.key_value.weight.device}")
        check_weight_dtype(encoder_outputs, "encoder_outputs", self.key_value.weight)
        kv = self.key_value(encoder_outputs)
        k, v = kv.split(self.cross_compute_hidden_size, dim=-1)
        return self._heads(k), self._heads(v)

    def _check(self, hidden_states, past_key_value) -> None:
        if not isinstance(hidden_states, Tensor) or hidden_states.dim() != 3:
            raise ValueError("hidden_states must be a 3-D tensor (batch, tokens, hidden_size), got "
                             f"{getattr(hidden_states, 'shape', type(hidden_states).__name__)}")
        if hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(f"hidden_states has last dim {hidden_states.shape[-1]} but config.hidden_size is "
                             f"{self.hidden_size}")
        if not hidden_states.is_floating_point():
            raise TypeError(f"hidden_states must be a floating-point tensor, got {hidden_states.dtype}")
        check_weight_dtype(hidden_states, "hidden_states", self.query.weight)
        if past_key_value is not None:
            if not isinstance(past_key_value, (tuple, list)) or len(past_key_value) != 2:
                raise ValueError("past_key_value must be the (key_states, value_states) pair returned with "
                                 "use_cache=True")
            k, v = past_key_value
            batch = k.shape[0] if k.dim() == 4 and k.shape[0] == 1 else hidden_states.shape[0]   # 1: broadcast
            want = (batch, self.num_heads, k.shape[2] if k.dim() == 4 else -1, self.cross_head_dim)
            for name, t in (("key_states", k), ("value_states", v)):
                if t.dim() != 4 or tuple(t.shape) != want:
                    raise ValueError(f"past_key_value {name} must have shape (batch or 1, heads, image_tokens, "
                                     f"head_dim) = {want}, got {tuple(t.shape)}")

    def _attention(self, q: Tensor, k: Tensor, v: Tensor, attention_mask: Optional[Tensor]) -> Tensor:
        if attention_mask is not None and attention_mask.device != q.device:
            raise ValueError(f"attention_mask is on {attention_mask.device} but hidden_states is on {q.device}")
        if attention_mask is None or attention_mask.is_meta:   # meta (all inputs): no values to choose a path by
            return cross_attention(q, k, v)
        keep = attention_mask == 0
        is_full = bool(keep.all())
        if is_full:
            return cross_attention(q, k, v)
        is_low_triangle = bool((keep == torch.ones_like(keep, dtype=torch.float).tril()).all())
        if is_low_triangle:   # the original's SDPA path (top-left aligned causal)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        scores = torch.matmul(q / math.sqrt(q.shape[-1]), k.transpose(-1, -2)) + attention_mask
        return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)

    def forward(self, hidden_states: Tensor, encoder_outputs: Optional[Tensor] = None,
                attention_mask: Optional[Tensor] = None, past_key_value: Optional[tuple[Tensor, Tensor]] = None,
                output_attentions: bool = False, use_cache: bool = False):
        """Cross-attention of every token to the image's high-resolution tokens, as the original's forward.

        Args:
            hidden_states: ``(B, Lq, hidden_size)``, the normed LLM hidden states (all tokens, any modality).
            encoder_outputs: ``(B, Lk, cross_hidden_size)``, the high-resolution encoder's tokens (Lk = 6400 at
                1120 px); required unless ``past_key_value`` is given, and then unused.
            attention_mask: additive mask broadcastable to ``(B, H, Lq, Lk)``; None or all-zero (the original's
                default ``zeros(B, 1, 1, 1)``) attends to every key.
            past_key_value: ``(key_states, value_states)``, each ``(B, H, Lk, d)``, as returned by an earlier
                call with ``use_cache=True`` (decode steps reuse them without recomputation).
            output_attentions: accepted for the original's signature; no weights are returned.
            use_cache: return the cross K/V as ``past_key_value``.

        Returns:
            ``(attn_output (B, Lq, hidden_size), None, past_key_value or None)``.
        """
        self._check(hidden_states, past_key_value)
        bsz, q_len, _ = hidden_states.shape
        if past_key_value is None:
            if encoder_outputs is None:
                raise ValueError("encoder_outputs is required when past_key_value is not given")
            if encoder_outputs.dim() == 3 and encoder_outputs.shape[0] not in (bsz, 1):
                raise ValueError(f"encoder_outputs has batch {encoder_outputs.shape[0]} but hidden_states has {bsz} "
                                 f"(or give one image, batch 1, for every row)")
            key_states, value_states = self.cross_kv(encoder_outputs)
        else:
            key_states, value_states = past_key_value
        query_states = self._heads(self.query(hidden_states))
        past_key_value = (key_states, value_states) if use_cache else None
        if key_states.shape[0] != bsz:     # one image for every row, as the original's SDPA broadcasts it
            key_states = key_states.expand(bsz, *key_states.shape[1:])
            value_states = value_states.expand(bsz, *value_states.shape[1:])
        context = self._attention(query_states, key_states, value_states, attention_mask)
        # the original reshapes to cross_hidden_size; equal to cross_compute_hidden_size in every release
        context = context.transpose(1, 2).reshape(bsz, q_len, self.cross_compute_hidden_size)
        return self.dense(context), None, past_key_value


__all__ = ["CogAgentCrossAttentionConfig", "CrossAttention"]
