"""InternLM-XComposer2's InternLM2 decoder layer with Partial LoRA on all five linears (``modeling_internlm2.py``).

``modeling_internlm2.py`` (IXC2-7B / VL / 4KHD), eager path, training / prefill: RMSNorm, group-interleaved
GQA ``wqkv`` (per KV group ``[q_0..q_{g-1}, k, v]``), RoPE, softmax attention, SwiGLU MLP
``w2(silu(w1 x) ⊙ w3 x)``. ``wqkv``, ``wo``, ``w1``, ``w3``, ``w2`` are ``vlmkern.nn.PLoRA`` (rank 256, alpha
256 in the release) and take ``im_mask``. Keys as the original: ``attention.{wqkv,wo}.{weight,bias?,
Plora_A.weight,Plora_B.weight}``, ``feed_forward.{w1,w2,w3}.*``, ``attention_norm.weight``, ``ffn_norm.weight``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlmkern.nn.plora import PLoRA
from vlmkern.ops.checks import check_tensor

_ACTIVATIONS = {"silu": F.silu, "swish": F.silu, "gelu": F.gelu, "relu": F.relu}
# The original's decoder passes ``padding_mask`` on (deprecated and unused there): accepted, anything else is a typo.
_PASSED_THROUGH = frozenset({"padding_mask"})


def _check_call(hidden_size: int, hidden_states, attention_mask, position_ids, kwargs: dict) -> None:
    """Argument checks of the attention and the decoder layer, before any computation."""
    unknown = sorted(set(kwargs) - _PASSED_THROUGH)
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {unknown}; accepted besides the named ones: "
                        f"{sorted(_PASSED_THROUGH)}")
    check_tensor(hidden_states, "hidden_states", ndim=3, shape_doc="(batch, seq, hidden_size)")
    B, L, D = hidden_states.shape
    if D != hidden_size:
        raise ValueError(f"hidden_states must have hidden_size={hidden_size} features, got shape {(B, L, D)}")
    if attention_mask is not None:
        check_tensor(attention_mask, "attention_mask")
        if tuple(attention_mask.shape) != (B, 1, L, L):
            raise ValueError(f"attention_mask must have shape (batch, 1, seq, seq) = {(B, 1, L, L)}, "
                             f"got {tuple(attention_mask.shape)}")
    if position_ids is not None:
        check_tensor(position_ids, "position_ids")
        rows = position_ids.shape[0] if position_ids.dim() == 2 else -1
        # comparisons, not ``in (1, B)``: a traced symbolic size is not found in a tuple by ``in``
        if position_ids.dim() != 2 or position_ids.shape[1] != L or (rows != 1 and rows != B):
            raise ValueError(f"position_ids must have shape (batch or 1, seq) with batch={B}, seq={L}, "
                             f"got {tuple(position_ids.shape)}")


def _plora_kwargs(lora_r: int, lora_alpha: float, lora_dropout: float, lora_len: int) -> dict:
    return dict(lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, lora_len=lora_len)


class InternLM2RMSNorm(nn.Module):
    """``weight * (x / sqrt(mean(x²) + eps))``, normalised in fp32 and cast back before the weight."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: Tensor) -> Tensor:
        dtype = hidden_states.dtype
        h = hidden_states.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(dtype)


class InternLM2RotaryEmbedding(nn.Module):
    """NeoX-style RoPE with base ``rope_theta``; ``inv_freq`` is not persistent (not in the checkpoint).

    cos / sin come from ``position_ids`` directly (fp32 angles, then cast): the original's table values for the
    same integer positions. The frequencies are recomputed in fp32 per call, not read from ``inv_freq``: a
    model cast to bf16 (``.to(torch.bfloat16)``) casts that buffer too, and bf16 frequencies put the angles of
    position 512 off by radians (the original builds its table in fp32 at construction and only casts the
    values). Dynamic NTK scaling (positions past ``max_position_embeddings``) is not applied.
    """

    def __init__(self, dim: int, max_position_embeddings: int = 2048, base: float = 10000, device=None):
        super().__init__()
        self.dim = dim
        self.max_position_embeddings = max_position_embeddings
        self.base = base
        self.register_buffer("inv_freq", self._fp32_inv_freq(device), persistent=False)   # as the original's

    def _fp32_inv_freq(self, device) -> Tensor:
        return 1.0 / (self.base ** (torch.arange(0, self.dim, 2, device=device).float() / self.dim))

    def forward(self, position_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        freqs = position_ids.to(torch.float32)[..., None] * self._fp32_inv_freq(position_ids.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class InternLM2Attention(nn.Module):
    """Self-attention with PLoRA ``wqkv`` / ``wo``; ``forward(..., im_mask)`` as the original (eager)."""

    def __init__(self, config, lora_r: int = 256, lora_alpha: float = 256, lora_dropout: float = 0.05,
                 lora_len: int = 1225):
        super().__init__()
        self.config = config
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = self.hidden_size // self.num_heads
        self.num_key_value_heads = getattr(config, "num_key_value_heads", self.num_heads)
        if self.head_dim * self.num_heads != self.hidden_size:
            raise ValueError(f"hidden_size={self.hidden_size} must be divisible by "
                             f"num_attention_heads={self.num_heads}")
        if self.num_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_heads} must be a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.max_position_embeddings = getattr(config, "max_position_embeddings", 2048)
        bias = getattr(config, "bias", False)
        kw = _plora_kwargs(lora_r, lora_alpha, lora_dropout, lora_len)
        self.wqkv = PLoRA(self.hidden_size, (self.num_heads + 2 * self.num_key_value_heads) * self.head_dim,
                          bias=bias, **kw)
        self.wo = PLoRA(self.num_heads * self.head_dim, self.hidden_size, bias=bias, **kw)
        self.rotary_emb = InternLM2RotaryEmbedding(self.head_dim, self.max_position_embeddings,
                                                   base=getattr(config, "rope_theta", 10000))

    def forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None,
                position_ids: Optional[Tensor] = None, past_key_value=None, output_attentions: bool = False,
                use_cache: bool = False, im_mask: Optional[Tensor] = None, **kwargs):
        """``hidden_states (B, L, D)``, additive ``attention_mask (B, 1, L, L)``, ``im_mask`` bool ``(B, L)``.

        Returns ``(attn_output, attn_weights or None, (k, v) if use_cache else None)``.
        """
        _check_call(self.hidden_size, hidden_states, attention_mask, position_ids, kwargs)
        if past_key_value is not None:
            raise NotImplementedError("InternLM2Attention implements the training / prefill path: "
                                      "past_key_value must be None")
        B, L, _ = hidden_states.shape
        G, d = self.num_key_value_groups, self.head_dim
        qkv = self.wqkv(hidden_states, im_mask).view(B, L, self.num_key_value_heads, G + 2, d)
        q = qkv[..., :G, :].reshape(B, L, self.num_heads, d).transpose(1, 2)
        k = qkv[..., -2, :].transpose(1, 2)
        v = qkv[..., -1, :].transpose(1, 2)
        if position_ids is None:
            position_ids = torch.arange(L, device=hidden_states.device)[None].expand(B, L)
        cos, sin = self.rotary_emb(position_ids, q.dtype)
        cos, sin = cos[:, None], sin[:, None]
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        present = (k, v) if use_cache else None
        kr = k[:, :, None].expand(B, self.num_key_value_heads, G, L, d).reshape(B, self.num_heads, L, d)
        vr = v[:, :, None].expand(B, self.num_key_value_heads, G, L, d).reshape(B, self.num_heads, L, d)
        mask = attention_mask
        if mask is not None and mask.dtype != q.dtype:
            # e.g. an fp32 mask (its finfo.min) with a bf16 model: the cast would make it -inf, and a row with no
            # visible key NaN-free only by accident; the original adds the fp32 mask (its sum promotes to fp32)
            mask = mask.to(q.dtype).clamp_min(torch.finfo(q.dtype).min)
        weights = None
        if output_attentions:  # explicit scores, fp32 softmax, as the original's eager path
            scores = torch.matmul(q, kr.transpose(2, 3)) / math.sqrt(d)
            if mask is not None:
                scores = scores + mask
            weights = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
            ctx = torch.matmul(weights, vr)
        else:
            ctx = F.scaled_dot_product_attention(q, kr, vr, attn_mask=mask)
        ctx = ctx.transpose(1, 2).reshape(B, L, self.hidden_size)
        return self.wo(ctx, im_mask), weights, present


class InternLM2MLP(nn.Module):
    """``w2(act(w1(x, m)) ⊙ w3(x, m), m)`` with PLoRA linears (no biases)."""

    def __init__(self, config, lora_r: int = 256, lora_alpha: float = 256, lora_dropout: float = 0.05,
                 lora_len: int = 1225):
        super().__init__()
        name = getattr(config, "hidden_act", "silu")
        if name not in _ACTIVATIONS:
            raise ValueError(f"config.hidden_act must be one of {sorted(_ACTIVATIONS)}, got {name!r}")
        self.act_fn = _ACTIVATIONS[name]
        kw = _plora_kwargs(lora_r, lora_alpha, lora_dropout, lora_len)
        self.w1 = PLoRA(config.hidden_size, config.intermediate_size, bias=False, **kw)
        self.w3 = PLoRA(config.hidden_size, config.intermediate_size, bias=False, **kw)
        self.w2 = PLoRA(config.intermediate_size, config.hidden_size, bias=False, **kw)

    def forward(self, x: Tensor, im_mask: Optional[Tensor] = None) -> Tensor:
        return self.w2(self.act_fn(self.w1(x, im_mask)) * self.w3(x, im_mask), im_mask)


class InternLM2DecoderLayer(nn.Module):
    """``h += Attn(RMS(h), m)``; ``h += MLP(RMS(h), m)``. Config: ``hidden_size``, ``intermediate_size``,
    ``num_attention_heads``, ``num_key_value_heads``, ``rms_norm_eps``, ``bias``, ``hidden_act``,
    ``rope_theta``, ``max_position_embeddings`` (as ``InternLM2Config``). LoRA hyper-parameters default to
    the release's (r = alpha = 256, dropout 0.05, lora_len 1225).
    """

    def __init__(self, config, lora_r: int = 256, lora_alpha: float = 256, lora_dropout: float = 0.05,
                 lora_len: int = 1225):
        super().__init__()
        self.hidden_size = config.hidden_size
        kw = dict(lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, lora_len=lora_len)
        self.attention = InternLM2Attention(config, **kw)
        self.feed_forward = InternLM2MLP(config, **kw)
        eps = getattr(config, "rms_norm_eps", 1e-6)
        self.attention_norm = InternLM2RMSNorm(config.hidden_size, eps=eps)
        self.ffn_norm = InternLM2RMSNorm(config.hidden_size, eps=eps)

    def forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None,
                position_ids: Optional[Tensor] = None, past_key_value=None, output_attentions: bool = False,
                use_cache: bool = False, im_mask: Optional[Tensor] = None, **kwargs):
        """Returns ``(hidden_states,)`` + ``(attn_weights,)`` if output_attentions + ``(present,)`` if use_cache."""
        _check_call(self.hidden_size, hidden_states, attention_mask, position_ids, kwargs)
        residual = hidden_states
        h, weights, present = self.attention(self.attention_norm(hidden_states), attention_mask, position_ids,
                                             past_key_value, output_attentions, use_cache, im_mask=im_mask)
        h = residual + h
        h = h + self.feed_forward(self.ffn_norm(h), im_mask)
        outputs = (h,)
        if output_attentions:
            outputs += (weights,)
        if use_cache:
            outputs += (present,)
        return outputs


__all__ = ["InternLM2Attention", "InternLM2DecoderLayer", "InternLM2MLP", "InternLM2RMSNorm",
           "InternLM2RotaryEmbedding"]
