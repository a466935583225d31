"""vlmkern.ops.cross_attention: learned queries -> image tokens (Q-Former cross-attention), with key padding.

Image-token counts of the real models (257 for ViT-g at 224 px, 677 at 364 px) are not multiples of any
block size: the last key block is partial. The oracle is plain ``softmax(q k^T * scale + M) v`` with
``M`` the HF ``invert_attention_mask`` additive mask, in float64 (reference) and the input dtype (baseline).
"""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vlmkern.ops import attention as attn_ops
from vlmkern.ops.attention import _torch as attn_torch
from vlmkern.ops.attention import cross_attention
from vlmkern.reference import attention as ref_attention
from vlmkern.testing import assert_close, assert_compiled_matches_eager, check_against

TRITON = pytest.mark.parametrize("backend", ["triton"], indirect=True)


def additive_key_mask(key_padding_mask, dtype=torch.float64):
    """HF ``invert_attention_mask``: (1 - m) * finfo(dtype).min, shape (B, 1, 1, Lk)."""
    m = key_padding_mask.to(dtype)[:, None, None, :]
    return (1.0 - m) * torch.finfo(dtype).min


def plain_attention(q, k, v, key_padding_mask=None, scale=None):
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if key_padding_mask is not None:
        scores = scores + additive_key_mask(key_padding_mask.to(q.device), q.dtype)
    return torch.matmul(torch.softmax(scores, dim=-1), v)


def make_inputs(B, H, Lq, Lk, d, device="cpu"):
    return (torch.randn(B, H, Lq, d, device=device), torch.randn(B, H, Lk, d, device=device),
            torch.randn(B, H, Lk, d, device=device))


# ---------------------------------------------------------------------------------------- kernel
@TRITON
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_257_image_tokens(backend, device, dtype):
    """BLIP-2 / InstructBLIP at 224 px: 32 queries x 257 image tokens (CLS kept)."""
    q, k, v = make_inputs(1, 2, 32, 257, 32, device)
    check_against(lambda q, k, v: cross_attention(q, k, v), lambda q, k, v: plain_attention(q, k, v),
                  q, k, v, dtype=dtype)


@TRITON
def test_677_image_tokens_with_padding(backend, device):
    """364-px checkpoints: 677 image tokens; padding keys spread over several blocks, 64 queries."""
    B, Lk = 2, 677
    q, k, v = make_inputs(B, 1, 64, Lk, 32, device)
    kpm = torch.ones(B, Lk, dtype=torch.long)
    kpm[1, 300:] = 0
    kpm[0, ::7] = 0
    check_against(lambda q, k, v: cross_attention(q, k, v, key_padding_mask=kpm.to(device)),
                  lambda q, k, v: plain_attention(q, k, v, kpm), q, k, v, dtype=torch.float16)


@TRITON
@pytest.mark.parametrize("d", [64, 128])
def test_head_dims(backend, device, d):
    q, k, v = make_inputs(1, 1, 32, 70, d, device)
    kpm = (torch.arange(70) < 66)[None]
    check_against(lambda q, k, v: cross_attention(q, k, v, key_padding_mask=kpm.to(device)),
                  lambda q, k, v: plain_attention(q, k, v, kpm), q, k, v, dtype=torch.bfloat16)


@TRITON
def test_non_contiguous_fused_kv(backend, device):
    """k, v as views of one ``(B, Lk, 2, H, d)`` projection, q a transposed ``(B, Lq, H, d)``."""
    B, H, Lq, Lk, d = 2, 2, 32, 45, 32
    kpm = (torch.arange(Lk)[None, :] < torch.tensor([[45], [30]])).to(torch.int32)

    def ours(q, k, v):
        kv = torch.stack([k, v], 0).permute(1, 3, 0, 2, 4).contiguous()       # (B, Lk, 2, H, d)
        ks, vs = kv.permute(2, 0, 3, 1, 4).unbind(0)
        qs = q.transpose(1, 2).contiguous().transpose(1, 2)                   # (B, H, Lq, d) strided
        assert not (ks.is_contiguous() or qs.is_contiguous())
        return cross_attention(qs, ks, vs, key_padding_mask=kpm.to(device))

    q, k, v = make_inputs(B, H, Lq, Lk, d, device)
    check_against(ours, lambda q, k, v: plain_attention(q, k, v, kpm), q, k, v, dtype=torch.float32)


@TRITON
def test_all_keys_padded_returns_zeros(backend, device):
    q, k, v = [t.requires_grad_() for t in make_inputs(2, 1, 16, 20, 32, device)]
    kpm = torch.ones(2, 20, dtype=torch.bool)
    kpm[1] = False
    out = cross_attention(q, k, v, key_padding_mask=kpm.to(device))
    assert torch.isfinite(out).all() and torch.equal(out[1], torch.zeros_like(out[1]))
    grads = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert all(torch.isfinite(g).all() and torch.equal(g[1], torch.zeros_like(g[1])) for g in grads)
    ref = ref_attention.cross_attention(q.double(), k.double(), v.double(), key_padding_mask=kpm.to(device))
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5)


@TRITON
def test_zero_image_tokens(backend, device):
    q, k, v = [t.requires_grad_() for t in make_inputs(2, 2, 32, 0, 32, device)]
    out = cross_attention(q, k, v, key_padding_mask=torch.ones(2, 0, dtype=torch.bool, device=device))
    assert out.shape == q.shape and torch.equal(out, torch.zeros_like(out))
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert torch.equal(dq, torch.zeros_like(dq)) and dk.shape == k.shape and dv.shape == v.shape


@TRITON
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_shapes(backend, device, data):
    B = data.draw(st.integers(1, 2), "B")
    H = data.draw(st.integers(1, 2), "H")
    Lq = data.draw(st.integers(1, 70), "Lq")
    Lk = data.draw(st.integers(1, 140), "Lk")
    d = data.draw(st.sampled_from([32, 64]), "d")
    dtype = data.draw(st.sampled_from([torch.float32, torch.float16]), "dtype")
    use_mask = data.draw(st.booleans(), "use_mask")
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2 ** 16), "seed"))
    kpm = (torch.rand(B, Lk, generator=g) < 0.8).to(device) if use_mask else None
    q = torch.randn(B, H, Lq, d, generator=g).to(device)
    k, v = (torch.randn(B, H, Lk, d, generator=g).to(device) for _ in range(2))
    check_against(lambda q, k, v: cross_attention(q, k, v, key_padding_mask=kpm),
                  lambda q, k, v: ref_attention.cross_attention(q, k, v, key_padding_mask=kpm),
                  q, k, v, dtype=dtype)


# ------------------------------------------------------------------------ reference backend, misc
@pytest.mark.parametrize("backend", ["reference"], indirect=True)
def test_reference_backend_gradients(backend):
    q, k, v = [t.double().requires_grad_() for t in make_inputs(2, 3, 5, 11, 16)]
    kpm = torch.ones(2, 11, dtype=torch.bool)
    kpm[0, 3:] = False
    kpm[1] = False
    out = cross_attention(q, k, v, key_padding_mask=kpm, scale=0.5)
    ref = ref_attention.cross_attention(q, k, v, key_padding_mask=kpm, scale=0.5)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", ["reference", "triton"], indirect=True)
def test_opcheck(backend, device):
    q, k, v = (t.requires_grad_() for t in make_inputs(2, 2, 16, 40, 32, device))
    kpm = (torch.arange(40)[None, :] < torch.tensor([[40], [13]])).to(device)
    torch.library.opcheck(attn_ops._cross_attention_op, (q, k, v, kpm, 0.125, 0.0, None))
    torch.library.opcheck(attn_ops._cross_attention_op, (q, k, v, None, 0.125, 0.0, None))


@pytest.mark.parametrize("backend", ["reference", "triton"], indirect=True)
def test_torch_compile_fullgraph(backend, device):
    q, k, v = (t.requires_grad_() for t in make_inputs(2, 2, 16, 40, 32, device))
    kpm = (torch.arange(40)[None, :] < torch.tensor([[40], [13]])).to(device)

    def f(q, k, v, kpm):
        return cross_attention(q, k, v, key_padding_mask=kpm).square().sum()

    assert_compiled_matches_eager(f, (q, k, v), kpm)


def test_bad_input():
    q, k, v = make_inputs(2, 2, 8, 20, 32)
    with pytest.raises(ValueError, match="k must be 4-D"):
        cross_attention(q, k[0], v)
    with pytest.raises(ValueError, match="heads must match"):
        cross_attention(q, k[:, :1], v[:, :1])
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        cross_attention(q, k, v[:, :, :19])
    with pytest.raises(ValueError, match="head_dim"):
        cross_attention(q, k[..., :16], v[..., :16])
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(batch, 20\)"):
        cross_attention(q, k, v, key_padding_mask=torch.ones(2, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="key_padding_mask must be 2-D"):
        cross_attention(q, k, v, key_padding_mask=torch.ones(2, 1, 1, 20, dtype=torch.bool))
    with pytest.raises(TypeError, match="key_padding_mask must have dtype"):
        cross_attention(q, k, v, key_padding_mask=torch.zeros(2, 20))
    with pytest.raises(TypeError, match="share one dtype"):
        cross_attention(q.bfloat16(), k, v)
    with pytest.raises(ValueError, match="all inputs must share one device"):
        cross_attention(q, k.to("meta"), v.to("meta"))
    with pytest.raises(ValueError, match="key_padding_mask is on meta"):
        cross_attention(q, k, v, key_padding_mask=torch.ones(2, 20, dtype=torch.bool, device="meta"))
    with pytest.raises(TypeError, match="scale"):
        cross_attention(q, k, v, scale="0.1")


@pytest.mark.parametrize("case", ["long keys", "long keys padded", "strided", "empty row", "small contiguous"])
def test_eager_cpu_paths(case, sdpa_calls):
    """Eager CPU calls run torch's flash kernel (mask as an additive bias) for long keys or strided views of the
    projections, the explicit math for small contiguous inputs and for a batch whose keys are all padding (which
    returns zeros): every path agrees with the fp64 reference, forward and gradients."""
    torch.manual_seed(0)
    lq, lk = (256, attn_torch._CPU_FLASH_MIN_SCORES // 256 + 3) if case.startswith("long") else (8, 37)
    q, k, v = (torch.randn(2, 2, n, 16) for n in (lq, lk, lk))
    if case in ("strided", "empty row"):           # (B, L, H*d) projections viewed as heads: not contiguous
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    mask = None
    if case in ("long keys padded", "empty row"):
        mask = torch.ones(2, lk, dtype=torch.bool)
        mask[0, -7:] = False
        if case == "empty row":
            mask[1] = False
    out = cross_attention(q, k, v, key_padding_mask=mask)
    assert len(sdpa_calls) == (1 if case in ("long keys", "long keys padded", "strided") else 0)
    exact = ref_attention.cross_attention(*(t.double() for t in (q, k, v)), key_padding_mask=mask)
    torch.testing.assert_close(out.double(), exact, rtol=1e-4, atol=1e-5)
    g = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, (q, k, v), g),
                         torch.autograd.grad(exact, (q, k, v), g.double())):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5)
