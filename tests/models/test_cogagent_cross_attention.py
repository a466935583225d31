"""CogAgent high-resolution ``CrossAttention`` drop-in: parity with the port of the original
(``modeling_cogagent.py``: ``CrossAttention`` + ``attention_fn``; :mod:`vlmkern.reference.originals.cogagent`),
outputs and gradients, cached cross K/V, masks, bad input."""
import math
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vlmkern.models.cogagent import CrossAttention
from vlmkern.reference.originals import cogagent as original
from vlmkern.testing import assert_close

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _pair(cfg, device, dtype):
    orig = original.CrossAttention(cfg)
    with torch.no_grad():
        for p in orig.parameters():
            p.copy_(torch.randn_like(p) * 2 / math.sqrt(p.shape[1]))
    ours = CrossAttention(cfg)
    ours.load_state_dict(orig.state_dict(), strict=True)
    return orig.to(device, dtype), ours.to(device, dtype)


def _run(module, h, e, g, mask):
    module.zero_grad(set_to_none=True)
    h = h.detach().clone().requires_grad_(True)
    e = e.detach().clone().requires_grad_(True)
    out, _, _ = module(h, e, attention_mask=mask)
    out.backward(g.to(out.dtype))
    grads = {"hidden_states": h.grad, "encoder_outputs": e.grad}
    grads.update({n: p.grad for n, p in module.named_parameters()})
    return out.detach(), grads


def _check(device, dtype, B, Lq, Lk, cfg=None, mask="zeros"):
    cfg = cfg or original.make_config()
    orig, ours = _pair(cfg, device, dtype)
    exact = original.CrossAttention(cfg).to(device, torch.float64)
    exact.load_state_dict(orig.state_dict())
    h = torch.randn(B, Lq, cfg.hidden_size, device=device)
    e = torch.randn(B, Lk, cfg.cross_hidden_size, device=device)
    g = torch.randn(B, Lq, cfg.hidden_size, device=device)
    m = torch.zeros(B, 1, 1, 1, device=device) if mask == "zeros" else mask
    mm = (lambda dt: None if m is None else m.to(dt))
    out, go = _run(ours, h.to(dtype), e.to(dtype), g, mm(dtype))
    # the original needs a mask tensor; None means "attend to everything" = its default zeros(B,1,1,1)
    m0 = torch.zeros(B, 1, 1, 1, device=device) if m is None else m
    base, gb = _run(orig, h.to(dtype), e.to(dtype), g, m0.to(dtype))
    ref, gr = _run(exact, h.double(), e.double(), g.double(), m0.double())
    assert_close(out, base, ref, dtype=dtype, name="attn_output")
    for name in gr:
        assert_close(go[name], gb[name], gr[name], kind="grad", dtype=dtype, name=f"d{name}")


# ---------------------------------------------------------------------------------------------- tests
def test_state_dict_names_and_head_dim():
    m = CrossAttention(original.make_config(hidden=4096, heads=32, head_dim=32))
    assert set(m.state_dict()) == {"query.weight", "key_value.weight", "dense.weight"}
    assert m.cross_head_dim == 32
    assert m.key_value.weight.shape == (2048, 1024) and m.query.weight.shape == (1024, 4096)


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,Lq,Lk", [(2, 5, 37), (1, 1, 64), (1, 17, 257)])
def test_matches_original_triton(backend, device, dtype, B, Lq, Lk):
    _check(device, dtype, B, Lq, Lk)


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_mask_none_equals_default_zeros(backend, device):
    _check(device, torch.float32, 2, 3, 20, mask=None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_original_6400_image_tokens(dtype):
    """The real key count (80 x 80) through the reference attention."""
    _check("cpu", dtype, 1, 7, 6400, cfg=original.make_config(hidden=48, heads=2))


def test_non_trivial_masks_follow_the_original():
    B, Lq, Lk = 2, 4, 9
    pad = torch.zeros(B, 1, 1, Lk)
    pad[0, ..., 5:] = torch.finfo(torch.float32).min          # key padding: explicit fp32-softmax path
    _check("cpu", torch.float32, B, Lq, Lk, mask=pad)
    tri = torch.zeros(B, 1, Lq, Lk)
    tri.masked_fill_(torch.ones(Lq, Lk).tril() == 0, -10000.0)  # exactly lower-triangular: SDPA causal
    _check("cpu", torch.float32, B, Lq, Lk, mask=tri)


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_cached_cross_kv_reused_in_decode(backend, device):
    """use_cache returns the (B, H, Lk, d) cross K/V; a decode step reuses them without calling key_value."""
    orig, ours = _pair(original.make_config(), device, torch.float32)
    h = torch.randn(2, 6, 64, device=device)
    e = torch.randn(2, 33, 64, device=device)
    mask = torch.zeros(2, 1, 1, 1, device=device)
    with torch.no_grad():
        out, _, kv = ours(h, e, mask, use_cache=True)
        out_o, _, kv_o = orig(h, e, mask, use_cache=True)
        torch.testing.assert_close(out, out_o, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(kv[0], kv_o[0])
        torch.testing.assert_close(kv[1], kv_o[1])
        ahead = ours.cross_kv(e)
        torch.testing.assert_close(ahead[0], kv[0])
        calls = []
        hook = ours.key_value.register_forward_hook(lambda *a: calls.append(1))
        step = torch.randn(2, 1, 64, device=device)
        out1, _, kv1 = ours(step, None, mask, past_key_value=kv, use_cache=True)
        hook.remove()
        assert not calls and kv1[0] is kv[0]
        ref1, _, _ = orig(step, e, mask, past_key_value=kv_o, use_cache=True)
        torch.testing.assert_close(out1, ref1, atol=1e-4, rtol=1e-4)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(B=st.integers(1, 2), Lq=st.integers(1, 20), Lk=st.integers(1, 300), heads=st.sampled_from([1, 2, 4]),
       head_dim=st.sampled_from([8, 32]))
def test_hypothesis_shapes(B, Lq, Lk, heads, head_dim):
    _check("cpu", torch.float32, B, Lq, Lk, cfg=original.make_config(hidden=32, heads=heads, head_dim=head_dim))


def test_bad_input():
    m = CrossAttention(original.make_config())
    with pytest.raises(ValueError, match="hidden_size is 64"):
        m(torch.zeros(1, 2, 63), torch.zeros(1, 5, 64))
    with pytest.raises(ValueError, match="cross_hidden_size is 64"):
        m(torch.zeros(1, 2, 64), torch.zeros(1, 5, 65))
    with pytest.raises(ValueError, match="batch"):
        m(torch.zeros(2, 2, 64), torch.zeros(3, 5, 64))
    with pytest.raises(TypeError, match="hidden_states has dtype torch.bfloat16 but the module's weights are"):
        m(torch.zeros(1, 2, 64, dtype=torch.bfloat16), torch.zeros(1, 5, 64))
    with pytest.raises(TypeError, match="encoder_outputs has dtype torch.float64"):
        m(torch.zeros(1, 2, 64), torch.zeros(1, 5, 64, dtype=torch.float64))
    with pytest.raises(ValueError, match="encoder_outputs is required"):
        m(torch.zeros(1, 2, 64), None)
    with pytest.raises(ValueError, match="past_key_value key_states"):
        m(torch.zeros(1, 2, 64), None, past_key_value=(torch.zeros(1, 2, 5, 16), torch.zeros(1, 2, 5, 16)))
    with pytest.raises(ValueError, match="3-D"):
        m(torch.zeros(2, 64), torch.zeros(1, 5, 64))
    with pytest.raises(ValueError, match="attention_mask is on meta"):   # not read as "attend to every key"
        m(torch.zeros(1, 2, 64), torch.zeros(1, 5, 64), attention_mask=torch.zeros(1, 1, 1, 5, device="meta"))
    with pytest.raises(ValueError, match="divisible"):
        CrossAttention(SimpleNamespace(hidden_size=64, cross_hidden_size=64, cross_compute_hidden_size=60,
                                       num_attention_heads=8))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matches_original_real_shape_gpu(dtype):
    _check("cuda", dtype, 1, 257, 6400, cfg=original.make_config(hidden=4096, heads=32, head_dim=32))


def test_one_image_for_every_row():
    """A batch-1 ``encoder_outputs`` (or cached K/V) with a batch-B ``hidden_states``: broadcast, as the
    original's SDPA does; the returned cache stays batch 1."""
    torch.manual_seed(0)
    m = CrossAttention(original.make_config())
    h, enc = torch.randn(3, 4, 64), torch.randn(1, 7, 64)
    with torch.no_grad():
        out, _, cache = m(h, enc, use_cache=True)
        want = m(h, enc.expand(3, -1, -1))[0]
        again = m(h, None, past_key_value=cache)[0]
    assert cache[0].shape[0] == 1
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(again, want)
