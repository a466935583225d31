"""Port of CogAgent's high-resolution cross-attention (THUDM/cogagent-chat-hf on the model hub,
``modeling_cogagent.py``: ``CrossAttention`` + ``attention_fn``; revision not pinned). ``attention_fn`` takes SDPA
for an all-zero or lower-triangular mask and the explicit fp32-softmax path otherwise; the mask is required."""
import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn


def attention_fn(q, k, v, attention_mask, *, scaling_attention_score=True):
    mask_bool = attention_mask == 0
    is_low_triangle = (mask_bool == torch.ones_like(mask_bool, dtype=torch.float).tril()).all()
    is_full = (mask_bool > 0).all()
    if scaling_attention_score and (is_full or is_low_triangle):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=not is_full)
    if scaling_attention_score:
        q = q / math.sqrt(q.shape[-1])
    scores = torch.matmul(q, k.transpose(-1, -2)) + attention_mask
    scores = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(scores, v)


class CrossAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.cross_hidden_size = config.cross_hidden_size
        self.cross_compute_hidden_size = config.cross_compute_hidden_size
        self.num_heads = config.num_attention_heads
        self.cross_head_dim = self.cross_compute_hidden_size // self.num_heads
        self.query = nn.Linear(self.hidden_size, self.cross_compute_hidden_size, bias=False)
        self.key_value = nn.Linear(self.cross_hidden_size, self.cross_compute_hidden_size * 2, bias=False)
        self.dense = nn.Linear(self.cross_compute_hidden_size, self.hidden_size, bias=False)

    def _transpose_for_scores(self, t):
        return t.view(*t.size()[:-1], self.num_heads, self.cross_head_dim).permute(0, 2, 1, 3)

    def forward(self, hidden_states, encoder_outputs, attention_mask=None, past_key_value=None,
                output_attentions=False, use_cache=False):
        bsz, q_len, _ = hidden_states.size()
        mixed_query_layer = self.query(hidden_states)
        if past_key_value is None:
            mixed_x_layer = self.key_value(encoder_outputs)
            k, v = torch.split(mixed_x_layer, self.cross_compute_hidden_size, dim=-1)
            key_states, value_states = self._transpose_for_scores(k), self._transpose_for_scores(v)
        else:
            key_states, value_states = past_key_value
        query_states = self._transpose_for_scores(mixed_query_layer)
        past_key_value = (key_states, value_states) if use_cache else None
        ctx = attention_fn(query_states, key_states, value_states, attention_mask)
        ctx = ctx.transpose(1, 2).contiguous().reshape(bsz, q_len, self.cross_hidden_size)
        return self.dense(ctx), None, past_key_value


def make_config(hidden=64, heads=2, head_dim=32):
    """A config the original runs with: it reshapes its context to ``cross_hidden_size``, so it only runs with
    ``cross_hidden_size == cross_compute_hidden_size`` (as released). ``make_config(4096, 32, 32)``: the release's
    shapes; the default is the small one the parity checks use."""
    return SimpleNamespace(hidden_size=hidden, cross_hidden_size=heads * head_dim,
                           cross_compute_hidden_size=heads * head_dim,
                           num_attention_heads=heads, max_position_embeddings=2048)
