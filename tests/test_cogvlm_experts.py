"""vlmkern.models.cogvlm visual-expert MLP / attention vs faithful ports of HF ``modeling_cogvlm.py``."""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vlmkern.models.cogvlm import VisionExpertAttention, VisionExpertMLP
from vlmkern.testing import assert_close


# ------------------------------------------------------------------ the original (HF eager path), ported
def _get_expert_mask(token_type_ids):
    vision = torch.zeros_like(token_type_ids, dtype=torch.bool)
    vision[:, :-1] = (token_type_ids[:, :-1] == 1) & (token_type_ids[:, 1:] == 1)
    return vision, ~vision


class _OrigMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class OrigVisionExpertMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.language_mlp = _OrigMLP(config)
        self.vision_mlp = _OrigMLP(config)

    def forward(self, hidden_states, token_type_ids):
        output = torch.empty(hidden_states.shape, dtype=hidden_states.dtype, device=hidden_states.device)
        vision, language = _get_expert_mask(token_type_ids)
        output[vision] = self.vision_mlp(hidden_states[vision])
        output[language] = self.language_mlp(hidden_states[language])
        return output


class _OrigRotary(nn.Module):
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


def _rotate_half(x):
    return torch.cat((-x[..., x.shape[-1] // 2:], x[..., : x.shape[-1] // 2]), dim=-1)


class OrigVisionExpertAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = self.hidden_size // self.num_heads
        self.rotary_emb = _OrigRotary(self.head_dim)
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
        vision, language = _get_expert_mask(token_type_ids)
        mixed = torch.empty((B, L, 3 * D), dtype=hidden_states.dtype, device=hidden_states.device)
        mixed[vision] = self.vision_expert_query_key_value(hidden_states[vision])
        mixed[language] = self.language_expert_query_key_value(hidden_states[language])
        q, k, v = (self._t(t) for t in torch.split(mixed, D, dim=-1))
        cos, sin = self.rotary_emb(v, seq_len=position_ids.max() + 1)
        cos = F.embedding(position_ids, cos.squeeze(1)).unsqueeze(1)
        sin = F.embedding(position_ids, sin.squeeze(1)).unsqueeze(1)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        w = torch.matmul(q * self.sqrt_scale, (k * self.sqrt_scale).transpose(2, 3))
        if attention_mask is not None:
            w = w + attention_mask[:, :, :, : k.shape[-2]]
        w = F.softmax(w, dim=-1)
        ctx = torch.matmul(w, v).transpose(1, 2).contiguous().reshape(B, L, D)
        out = torch.empty(ctx.shape, dtype=hidden_states.dtype, device=hidden_states.device)
        out[vision] = self.vision_expert_dense(ctx[vision])
        out[language] = self.language_expert_dense(ctx[language])
        return (out, w if output_attentions else None, past_key_value)


def _build_position_ids(token_type_ids):
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


# ---------------------------------------------------------------------------------------------- tests
CONFIG = SimpleNamespace(hidden_size=64, intermediate_size=96, num_attention_heads=4, hidden_act="silu",
                         max_position_embeddings=2048)


def _inputs(device, B=2, L=29, n_vis=(19, 11)):
    """``[BOS] + [boi, patches, eoi] + text`` per sample (second sample: shorter image, more text)."""
    types = torch.zeros(B, L, dtype=torch.long, device=device)
    for b, n in enumerate(n_vis[:B]):
        types[b, 1:1 + n] = 1
    causal = torch.full((L, L), torch.finfo(torch.float32).min, device=device).triu(1)
    return types, _build_position_ids(types), causal[None, None].expand(B, 1, L, L)


def _pair(cls, orig_cls, dtype, device):
    orig = orig_cls(CONFIG).to(device)
    ours = cls(CONFIG).to(device)
    ours.load_state_dict(orig.state_dict(), strict=True)
    exact = orig_cls(CONFIG).to(device).double()
    exact.load_state_dict(orig.state_dict(), strict=True)
    return ours.to(dtype), orig.to(dtype), exact


def _grads(module, x, grad, *args, **kw):
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    out = module(x, *args, **kw)
    y = out[0] if isinstance(out, tuple) else out
    y.backward(grad.to(y.dtype))
    return y.detach(), x.grad, {n: p.grad for n, p in module.named_parameters()}, out


def _compare(ours, base, exact, dtype):
    assert_close(ours[0], base[0], exact[0], name="y")
    assert_close(ours[1], base[1], exact[1], kind="grad", dtype=dtype, name="dx")
    assert set(ours[2]) == set(exact[2])
    for name in exact[2]:
        assert_close(ours[2][name], base[2][name], exact[2][name], kind="grad", dtype=dtype, name=f"d{name}")


def test_state_dict_keys_match_original():
    for cls, orig_cls in ((VisionExpertMLP, OrigVisionExpertMLP), (VisionExpertAttention, OrigVisionExpertAttention)):
        ours, orig = cls(CONFIG), orig_cls(CONFIG)
        assert set(ours.state_dict()) == set(orig.state_dict())
        orig.load_state_dict(ours.state_dict(), strict=True)
    assert {"language_mlp.gate_proj.weight", "vision_mlp.down_proj.weight"} <= set(VisionExpertMLP(CONFIG).state_dict())


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mlp_matches_original(backend, device, dtype):
    ours, orig, exact = _pair(VisionExpertMLP, OrigVisionExpertMLP, dtype, device)
    types, _, _ = _inputs(device)
    x = torch.randn(2, 29, 64, device=device)
    grad = torch.randn(2, 29, 64, device=device)
    _compare(_grads(ours, x.to(dtype), grad, types), _grads(orig, x.to(dtype), grad, types),
             _grads(exact, x.double(), grad, types), dtype)


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_matches_original(backend, device, dtype):
    ours, orig, exact = _pair(VisionExpertAttention, OrigVisionExpertAttention, dtype, device)
    types, pos, mask = _inputs(device)
    assert pos[0, :22].tolist() == [0, 1] + [2] * 17 + [3, 4, 5]  # boi, 17 patches (one position), eoi
    x = torch.randn(2, 29, 64, device=device)
    grad = torch.randn(2, 29, 64, device=device)
    o = _grads(ours, x.to(dtype), grad, types, pos, mask.to(dtype))
    assert o[3][1] is None and o[3][2] is None
    _compare(o, _grads(orig, x.to(dtype), grad, types, pos, mask.to(dtype)),
             _grads(exact, x.double(), grad, types, pos, mask.double()), dtype)


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_attention_without_mask_and_with_weights(backend, device):
    ours, orig, exact = _pair(VisionExpertAttention, OrigVisionExpertAttention, torch.float32, device)
    types, pos, _ = _inputs(device, B=1, L=9, n_vis=(5,))
    x = torch.randn(1, 9, 64, device=device)
    with torch.no_grad():
        y, w, _ = ours(x, types, pos, None, output_attentions=True)
        yo, wo, _ = orig(x, types, pos, None, output_attentions=True)
    torch.testing.assert_close(y, yo, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w, wo, rtol=1e-4, atol=1e-6)
    with pytest.raises(NotImplementedError, match="past_key_value"):
        ours(x, types, pos, None, past_key_value=object())


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_all_language_tokens_decode_like(backend, device):
    # A single token (q_len = 1) or an all-text sequence takes the language expert everywhere.
    ours, orig, _ = _pair(VisionExpertMLP, OrigVisionExpertMLP, torch.float32, device)
    for L in (1, 6):
        types = torch.zeros(2, L, dtype=torch.long, device=device)
        if L == 1:
            types[:] = 1   # even a vision-type token uses the language expert in the last position
        x = torch.randn(2, L, 64, device=device)
        with torch.no_grad():
            torch.testing.assert_close(ours(x, types), orig(x, types), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["triton", "reference"], indirect=True)
def test_compile_fullgraph(backend, device):
    torch._dynamo.reset()
    ours = VisionExpertMLP(CONFIG).to(device)
    types, _, _ = _inputs(device)
    x = torch.randn(2, 29, 64, device=device)
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    compiled(x, types).sum().backward()
    g = ours.vision_mlp.up_proj.weight.grad.clone()
    ours.zero_grad()
    ours(x, types).sum().backward()
    torch.testing.assert_close(g, ours.vision_mlp.up_proj.weight.grad, rtol=1e-4, atol=1e-5)


def test_bad_config_and_input():
    with pytest.raises(ValueError, match="hidden_act"):
        VisionExpertMLP(SimpleNamespace(hidden_size=8, intermediate_size=8, num_attention_heads=2, hidden_act="tanh"))
    with pytest.raises(ValueError, match="divisible by num_attention_heads"):
        VisionExpertAttention(SimpleNamespace(hidden_size=10, intermediate_size=8, num_attention_heads=4))
    mlp = VisionExpertMLP(CONFIG)
    with pytest.raises(ValueError, match="token_type_ids must be 2-D"):
        mlp(torch.randn(2, 5, 64), torch.zeros(10, dtype=torch.long))
    with pytest.raises(ValueError, match=r"expert_ids must have shape x.shape\[:-1\]"):
        mlp(torch.randn(2, 5, 64), torch.zeros(2, 6, dtype=torch.long))


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_cuda_no_host_sync_mlp_and_attention(backend):
    cfg = SimpleNamespace(hidden_size=256, intermediate_size=512, num_attention_heads=4)
    mlp = VisionExpertMLP(cfg).cuda().bfloat16()
    attn = VisionExpertAttention(cfg).cuda().bfloat16()
    types, pos, mask = _inputs("cuda", B=2, L=300, n_vis=(258, 100))
    x = torch.randn(2, 300, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def step():
        y = mlp(attn(x, types, pos, mask.bfloat16())[0], types)
        y.float().square().mean().backward()

    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
