"""Port of InternLM-XComposer2's partial LoRA (InternLM/InternLM-XComposer: ``build_mlp.py`` ``PLoRA``, the same
in the IXC2-7B, -VL and -4KHD checkpoints' code on the model hub; revision not pinned) and of its InternLM2 decoder
layer (``modeling_internlm2.py``: RMSNorm, RoPE, grouped-query eager attention, SwiGLU, every linear a ``PLoRA``)."""
import math

import torch
import torch.nn.functional as F
from torch import nn

RELEASE_LORA = dict(lora_r=256, lora_alpha=256, lora_len=1225)   # the decoder layer's PLoRA arguments


class PLoRA(nn.Linear):
    """``build_mlp.PLoRA`` line for line: ``forward(x (..., in), im_mask=None) -> (..., out)``; the adapter runs on
    the gathered ``x[im_mask]`` rows (a host sync), or on ``x[:, :1]`` times 0 when no token is an image token."""

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None,
                 lora_r=8, lora_alpha=16, lora_dropout=0.05, lora_len=0, **kwargs):
        super().__init__(in_features, out_features, bias, device, dtype)
        self.lora_r = lora_r
        self.lora_alpha = lora_alpha
        self.lora_len = lora_len
        self.lora_dropout = nn.Dropout(p=lora_dropout) if lora_dropout > 0.0 else (lambda x: x)
        self.lora_scaling = self.lora_alpha / self.lora_r
        self.Plora_A = nn.Linear(in_features, self.lora_r, bias=False, device=device, dtype=dtype)
        self.Plora_B = nn.Linear(self.lora_r, out_features, bias=False, device=device, dtype=dtype)
        self.reset_parameters()

    def reset_parameters(self):
        if hasattr(self, "lora_A"):  # never true: the original's init is a no-op
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)

    def forward(self, x, im_mask=None):
        res = super().forward(x)
        if im_mask is not None:
            if torch.sum(im_mask) > 0:
                part_x = x[im_mask]
                res[im_mask] += self.Plora_B(self.Plora_A(self.lora_dropout(part_x))) * self.lora_scaling
            else:
                part_x = x[:, :1]
                res[:, :1] += self.Plora_B(self.Plora_A(self.lora_dropout(part_x))) * 0
        return res


def plora_forward(x, weight, bias, lora_a, lora_b, im_mask, scaling):
    """``PLoRA.forward`` (eval, no dropout) with the given tensors as its parameters (autograd reaches them):
    ``x (B, L, in)``, ``weight (out, in)``, ``bias (out,)`` or None, ``lora_a (r, in)``, ``lora_b (out, r)``,
    ``im_mask (B, L)`` bool -> ``(B, L, out)``."""
    m = PLoRA(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta", lora_r=lora_a.shape[0],
              lora_dropout=0.0)
    m.lora_scaling = scaling
    params = {"weight": weight, "Plora_A.weight": lora_a, "Plora_B.weight": lora_b}
    if bias is not None:
        params["bias"] = bias
    return torch.func.functional_call(m, params, (x, im_mask))


class InternLM2RMSNorm(nn.Module):
    def __init__(self, hidden_size, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


def rotate_half(x):
    return torch.cat((-x[..., x.shape[-1] // 2:], x[..., : x.shape[-1] // 2]), dim=-1)


class InternLM2DecoderLayer(nn.Module):
    """``modeling_internlm2.py`` decoder layer, eager attention, PLoRA linears. ``lora`` overrides the release's
    PLoRA arguments (``lora_r=256, lora_alpha=256, lora_len=1225``). ``forward(h (B, L, D), attention_mask
    (B, 1, L, L) additive or None, position_ids (B, L), im_mask (B, L) bool) -> (h,)``."""

    def __init__(self, c, **lora):
        super().__init__()
        self.c = c
        lora = {**RELEASE_LORA, **lora}
        H, KV, d = c.num_attention_heads, c.num_key_value_heads, c.hidden_size // c.num_attention_heads
        self.attention = nn.Module()
        self.attention.wqkv = PLoRA(c.hidden_size, (H + 2 * KV) * d, bias=c.bias, **lora)
        self.attention.wo = PLoRA(H * d, c.hidden_size, bias=c.bias, **lora)
        self.feed_forward = nn.Module()
        self.feed_forward.w1 = PLoRA(c.hidden_size, c.intermediate_size, bias=False, **lora)
        self.feed_forward.w3 = PLoRA(c.hidden_size, c.intermediate_size, bias=False, **lora)
        self.feed_forward.w2 = PLoRA(c.intermediate_size, c.hidden_size, bias=False, **lora)
        self.attention_norm = InternLM2RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.ffn_norm = InternLM2RMSNorm(c.hidden_size, c.rms_norm_eps)

    def _attention(self, x, mask, position_ids, im_mask):
        c = self.c
        B, L, _ = x.shape
        H, KV, d = c.num_attention_heads, c.num_key_value_heads, c.hidden_size // c.num_attention_heads
        G = H // KV
        qkv = self.attention.wqkv(x, im_mask).view(B, L, KV, 2 + G, d)  # 'b q (h gs d) -> b q h gs d'
        q = qkv[..., :G, :].reshape(B, L, H, d).transpose(1, 2)
        k, v = qkv[..., -2, :].transpose(1, 2), qkv[..., -1, :].transpose(1, 2)
        inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, d, 2).float().to(x.device) / d))
        freqs = torch.outer(torch.arange(L, device=x.device, dtype=inv_freq.dtype), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(x.dtype)[position_ids].unsqueeze(1), emb.sin().to(x.dtype)[position_ids].unsqueeze(1)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k = k[:, :, None].expand(B, KV, G, L, d).reshape(B, H, L, d)
        v = v[:, :, None].expand(B, KV, G, L, d).reshape(B, H, L, d)
        w = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(d)
        if mask is not None:
            w = w + mask
        w = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(w, v).transpose(1, 2).contiguous().reshape(B, L, c.hidden_size)
        return self.attention.wo(out, im_mask)

    def forward(self, h, attention_mask=None, position_ids=None, im_mask=None):
        h = h + self._attention(self.attention_norm(h), attention_mask, position_ids, im_mask)
        ff = self.feed_forward
        x = self.ffn_norm(h)
        return (h + ff.w2(F.silu(ff.w1(x, im_mask)) * ff.w3(x, im_mask), im_mask),)

