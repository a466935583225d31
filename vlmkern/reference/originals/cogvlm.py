"""Port of CogVLM's visual-expert MLP and attention (THUDM/cogvlm-chat-hf on the model hub, ``modeling_cogvlm.py``,
eager path; revision not pinned): every linear is two experts, each token computed by the one
``get_expert_mask`` picks (boolean gather / scatter, a host sync per linear), RoPE from a cached table, and
``build_position_ids`` (no padding: every patch token shares one position)."""
import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn


def get_expert_mask(token_type_ids):
    vision = torch.zeros_like(token_type_ids, dtype=torch.bool)
    vision[:, :-1] = (token_type_ids[:, :-1] == 1) & (token_type_ids[:, 1:] == 1)
    return vision, ~vision


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        from transformers.activations import ACT2FN  # the original imports it at the top; the port needs it here only
        self.hidden_size = config.hidden_size
        self.intermediate_size = config.intermediate_size
        self.gate_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=False)
        self.up_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=False)
        self.down_proj = nn.Linear(self.intermediate_size, self.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        return down_proj


class VisionExpertMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.language_mlp = MLP(config)
        self.vision_mlp = MLP(config)

    def forward(self, hidden_states, token_type_ids):
        output = torch.empty(hidden_states.shape, dtype=hidden_states.dtype, device=hidden_states.device)
        vision, language = get_expert_mask(token_type_ids)
        output[vision] = self.vision_mlp(hidden_states[vision])
        output[language] = self.language_mlp(hidden_states[language])
        return output


class RotaryEmbedding(nn.Module):
    def __init__(self, dim, base=10000):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (base ** (torch.arange(0, dim, 2) / dim)))
        self.max_seq_len_cached = 0

    def forward(self, x, seq_len):
        if seq_len > self.max_seq_len_cached:
            self.max_seq_len_cached = seq_len
            t = torch.arange(seq_len, device=x.device, dtype=self.inv_freq.dtype)
            emb = torch.cat([torch.einsum("i,j->ij", t, self.inv_freq)] * 2, dim=-1)
            self.cos_cached, self.sin_cached = emb.cos()[:, None, :].to(x.dtype), emb.sin()[:, None, :].to(x.dtype)
        return self.cos_cached[:seq_len].to(x.dtype), self.sin_cached[:seq_len].to(x.dtype)


def rotate_half(x):
    return torch.cat((-x[..., x.shape[-1] // 2:], x[..., : x.shape[-1] // 2]), dim=-1)


class VisionExpertAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = self.hidden_size // self.num_heads
        self.rotary_emb = RotaryEmbedding(self.head_dim)
        D = self.hidden_size
        self.vision_expert_query_key_value = nn.Linear(D, 3 * D, bias=False)
        self.vision_expert_dense = nn.Linear(D, D, bias=False)
        self.language_expert_query_key_value = nn.Linear(D, 3 * D, bias=False)
        self.language_expert_dense = nn.Linear(D, D, bias=False)
        self.sqrt_scale = math.sqrt(1 / math.sqrt(self.head_dim))

    def _t(self, t):
        return t.view(*t.shape[:-1], self.num_heads, self.head_dim).permute(0, 2, 1, 3)

    def forward(self, hidden_states, token_type_ids, position_ids, attention_mask=None, past_key_value=None,
                output_attentions=False):
        B, L, D = hidden_states.shape
        vision, language = get_expert_mask(token_type_ids)
        mixed = torch.empty((B, L, 3 * D), dtype=hidden_states.dtype, device=hidden_states.device)
        mixed[vision] = self.vision_expert_query_key_value(hidden_states[vision])
        mixed[language] = self.language_expert_query_key_value(hidden_states[language])
        q, k, v = (self._t(t) for t in torch.split(mixed, D, dim=-1))
        cos, sin = self.rotary_emb(v, seq_len=position_ids.max() + 1)
        cos = F.embedding(position_ids, cos.squeeze(1)).unsqueeze(1)
        sin = F.embedding(position_ids, sin.squeeze(1)).unsqueeze(1)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        w = torch.matmul(q * self.sqrt_scale, (k * self.sqrt_scale).transpose(2, 3))
        if attention_mask is not None:
            w = w + attention_mask[:, :, :, : k.shape[-2]]
        w = F.softmax(w, dim=-1)
        ctx = torch.matmul(w, v).transpose(1, 2).contiguous().reshape(B, L, D)
        out = torch.empty(ctx.shape, dtype=hidden_states.dtype, device=hidden_states.device)
        out[vision] = self.vision_expert_dense(ctx[vision])
        out[language] = self.language_expert_dense(ctx[language])
        return (out, w if output_attentions else None, past_key_value)


def build_position_ids(token_type_ids):
    """HF ``build_position_ids`` without padding: all patch tokens share one position."""
    tmp = token_type_ids.clone()
    boi_eoi = torch.zeros_like(tmp, dtype=torch.bool)
    boi_eoi[:, 1:] |= (tmp[:, 1:] == 1) & (tmp[:, :-1] == 0)
    boi_eoi[:, 0] |= tmp[:, 0] == 1
    boi_eoi[:, :-1] |= (tmp[:, :-1] == 1) & (tmp[:, 1:] == 0)
    boi_eoi[:, -1] |= tmp[:, -1] == 1
    tmp[boi_eoi] = 0
    pos = torch.zeros_like(tmp)
    pos[:, 1:] = (tmp[:, 1:] == 0) | ((tmp[:, 1:] == 1) & (tmp[:, :-1] == 0))
    return pos.cumsum(dim=-1)


def tiny_config():
    """A small config the parity checks use (hidden 64, 4 heads of 16)."""
    return SimpleNamespace(hidden_size=64, intermediate_size=96, num_attention_heads=4, hidden_act="silu",
                           max_position_embeddings=2048)


def example_inputs(device, B=2, L=29, n_vis=(19, 11)):
    """``[BOS] + [boi, patches, eoi] + text`` per sample (second sample: shorter image, more text):
    ``(token_type_ids (B, L), position_ids (B, L), causal additive mask (B, 1, L, L) fp32)``."""
    types = torch.zeros(B, L, dtype=torch.long, device=device)
    for b, n in enumerate(n_vis[:B]):
        types[b, 1:1 + n] = 1
    causal = torch.full((L, L), torch.finfo(torch.float32).min, device=device).triu(1)
    return types, build_position_ids(types), causal[None, None].expand(B, 1, L, L)
