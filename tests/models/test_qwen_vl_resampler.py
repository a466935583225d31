"""Qwen-VL ``Resampler`` drop-in: parity with the faithful port of ``visual.Resampler`` (which itself calls
``nn.MultiheadAttention``; :mod:`vlmkern.reference.originals.qwen_vl`) and with its explicit math, outputs and
gradients, the cached key-side position term, and bad input."""
import math
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from vlmkern.models.qwen_vl import (Resampler, VisionTransformerTail, VisualAdapter, get_2d_sincos_pos_embed,
                                    get_abs_pos)
from vlmkern.reference.originals import qwen_vl as original
from vlmkern.testing import assert_close

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LN6 = partial(nn.LayerNorm, eps=1e-6)


def _spec_math(m, x):
    """The resampler's math, written out with explicit softmax (no nn.MultiheadAttention)."""
    D, H = m.embed_dim, m.num_heads
    d = D // H
    Xp = m.ln_kv(m.kv_proj(x))
    W, b = m.attn.in_proj_weight, m.attn.in_proj_bias
    q = F.linear(m.ln_q(m.query) + m.pos_embed, W[:D], b[:D])
    k = F.linear(Xp + original.get_abs_pos(m.pos_embed, x.shape[1]), W[D:2 * D], b[D:2 * D])
    v = F.linear(Xp, W[2 * D:], b[2 * D:])
    qh = q.view(-1, H, d).transpose(0, 1)
    kh = k.view(x.shape[0], -1, H, d).transpose(1, 2)
    vh = v.view(x.shape[0], -1, H, d).transpose(1, 2)
    a = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(d), -1)
    o = (a @ vh).transpose(1, 2).reshape(x.shape[0], -1, D)
    return m.attn.out_proj(o)


# ------------------------------------------------------------------------------------------- helpers
def _randomize(m):
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.startswith("ln_"):
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
            elif name == "pos_embed":
                continue
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / math.sqrt(p.shape[-1]))
        m.query.mul_(3.0)


def _pair(grid, D, H, kv_dim, device, dtype, norm_layer=LN6):
    orig = original.Resampler(grid, D, H, kv_dim, norm_layer)
    _randomize(orig)
    ours = Resampler(grid, D, H, kv_dim, norm_layer)
    ours.load_state_dict(orig.state_dict(), strict=True)
    return orig.to(device, dtype), ours.to(device, dtype)


def _run(module, x, grad, train_pos=False):
    module.zero_grad(set_to_none=True)
    module.pos_embed.requires_grad_(train_pos)
    x = x.detach().clone().requires_grad_(True)
    out = module(x)
    out.backward(grad.to(out.dtype))
    grads = {"x": x.grad}
    grads.update({n: p.grad for n, p in module.named_parameters() if p.requires_grad})
    return out.detach(), grads


def _check(device, dtype, grid, D, H, kv_dim, L, B=2, train_pos=False):
    orig, ours = _pair(grid, D, H, kv_dim, device, dtype)
    exact = original.Resampler(grid, D, H, kv_dim, LN6).to(device, torch.float64)
    exact.load_state_dict(orig.state_dict())
    x = torch.randn(B, L, kv_dim or D, device=device)
    g = torch.randn(B, grid * grid, D, device=device)
    out, go = _run(ours, x.to(dtype), g, train_pos)
    base, gb = _run(orig, x.to(dtype), g, train_pos)
    ref, gr = _run(exact, x.double(), g.double(), train_pos)
    assert out.shape == ref.shape == (B, grid * grid, D)
    assert_close(out, base, ref, dtype=dtype, name="out")
    assert set(go) == set(gr)
    for name in gr:
        assert_close(go[name], gb[name], gr[name], kind="grad", dtype=dtype, name=f"d{name}")


# ---------------------------------------------------------------------------------------------- tests
def test_sincos_table_matches_mae_numpy():
    for D, G in ((64, 4), (4096, 16)):  # bit for bit: visual.py's numpy float32 table
        np.testing.assert_array_equal(get_2d_sincos_pos_embed(D, G).numpy(),
                                      original.get_2d_sincos_pos_embed(D, G).astype(np.float32))


def test_state_dict_names():
    m = Resampler(4, 64, 2, 48, LN6)
    assert set(m.state_dict()) == set(original.Resampler(4, 64, 2, 48, LN6).state_dict()) == {
        "query", "pos_embed", "kv_proj.weight", "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight",
        "attn.out_proj.bias", "ln_q.weight", "ln_q.bias", "ln_kv.weight", "ln_kv.bias"}
    assert not m.pos_embed.requires_grad
    assert isinstance(Resampler(4, 64, 2, 64).kv_proj, nn.Identity)


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grid,D,H,kv_dim,L", [(2, 64, 2, 48, 9), (2, 64, 2, None, 4), (3, 128, 2, 40, 25)])
def test_matches_original_triton(backend, device, dtype, grid, D, H, kv_dim, L):
    _check(device, dtype, grid, D, H, kv_dim, L)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("L", [64, 256, 1024, 1600])
def test_matches_original_odd_grids(dtype, L):
    """Real key-grid sizes (always a bicubic resize of the 4x4 table here) through the reference attention."""
    _check("cpu", dtype, 4, 64, 2, 24, L, B=2)


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_gradients_reach_trained_pos_embed_and_query(backend, device):
    _check(device, torch.float32, 2, 64, 2, 48, 9, train_pos=True)


def test_gradients_reach_trained_pos_embed_reference_grid():
    _check("cpu", torch.float32, 4, 64, 2, 24, 64, train_pos=True)


def test_matches_spec_math_and_mha():
    orig, ours = _pair(4, 64, 4, 32, "cpu", torch.float64)
    x = torch.randn(3, 36, 32, dtype=torch.float64)
    torch.testing.assert_close(ours(x), _spec_math(orig, x))
    torch.testing.assert_close(ours(x), orig(x))
    torch.testing.assert_close(ours.forward_original(x), orig(x))


def test_attn_mask_runs_the_original_path():
    orig, ours = _pair(2, 64, 2, 32, "cpu", torch.float32)
    x = torch.randn(2, 16, 32)
    mask = torch.zeros(4, 16)
    mask[:, 3] = float("-inf")
    torch.testing.assert_close(ours(x, attn_mask=mask), orig(x, attn_mask=mask))


def test_position_bias_is_cached_and_invalidated():
    orig, ours = _pair(2, 64, 2, 32, "cpu", torch.float32)
    x = torch.randn(2, 16, 32)
    calls = []
    real = F.interpolate

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    with torch.no_grad():
        F.interpolate = counting
        try:
            out1 = ours(x)
            out2 = ours(x)
            assert len(calls) == 1, "the bicubic table must be computed once per grid and table version"
            torch.testing.assert_close(out1, out2)
            ours.pos_embed.mul_(1.5)            # fine-tuned table: new version -> recomputed
            orig.pos_embed.mul_(1.5)
            torch.testing.assert_close(ours(x), orig(x))
            assert len(calls) == 3               # ours + orig
            ours.attn.in_proj_weight.add_(0.01)  # new W_k -> new bias, same table
            orig.attn.in_proj_weight.add_(0.01)
            torch.testing.assert_close(ours(x), orig(x))
            assert len(calls) == 4
        finally:
            F.interpolate = real


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_query_side_is_batch_independent(backend, device):
    """One query projection for the whole batch: every image of a batch gives its own single-image result."""
    _, ours = _pair(2, 64, 2, 48, device, torch.float32)
    x = torch.randn(3, 9, 48, device=device)
    with torch.no_grad():
        full = ours(x)
        for i in range(3):
            torch.testing.assert_close(full[i], ours(x[i:i + 1])[0], atol=1e-5, rtol=1e-5)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(B=st.integers(1, 3), grid=st.integers(1, 4), side=st.integers(1, 9), H=st.sampled_from([1, 2, 4]),
       kv_dim=st.sampled_from([None, 16, 40]))
def test_hypothesis_shapes(B, grid, side, H, kv_dim):
    _check("cpu", torch.float32, grid, 32, H, kv_dim, side * side, B=B)


def test_tail_and_adapter():
    tail = VisionTransformerTail(64)
    assert set(tail.state_dict()) == {"ln_post.weight", "ln_post.bias", "proj"}
    x = torch.randn(2, 4, 64)
    torch.testing.assert_close(tail(x), F.layer_norm(x, (64,), tail.ln_post.weight, tail.ln_post.bias, 1e-6)
                               @ tail.proj)
    ad = VisualAdapter(width=48, output_dim=256, n_queries=4)
    keys = set(ad.state_dict())
    assert {"ln_post.weight", "proj", "attn_pool.query", "attn_pool.kv_proj.weight"} <= keys
    assert ad(torch.randn(1, 9, 48)).shape == (1, 4, 256)


@pytest.mark.parametrize("shape,match", [
    ((2, 10, 48), "square grid"),
    ((2, 0, 48), "square grid"),
    ((2, 9, 47), "kv_dim=48"),
    ((9, 48), "3-D"),
])
def test_bad_input(shape, match):
    _, ours = _pair(2, 64, 2, 48, "cpu", torch.float32)
    with pytest.raises(ValueError, match=match):
        ours(torch.randn(shape))


def test_get_abs_pos_matches_original():
    table = torch.randn(256, 32)
    for L in (256, 1024, 100, 1600):
        torch.testing.assert_close(get_abs_pos(table, L), original.get_abs_pos(table, L))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matches_original_real_shape_gpu(dtype):
    _check("cuda", dtype, 16, 4096, 32, 1664, 1024, B=2)


def test_dtype_mismatch_is_named():
    from vlmkern.models.qwen_vl import Resampler
    r = Resampler(grid_size=2, embed_dim=32, num_heads=2, kv_dim=24)
    with pytest.raises(TypeError, match="x has dtype torch.bfloat16 but the resampler's parameters are torch.float32"):
        r(torch.randn(1, 4, 24, dtype=torch.bfloat16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert r(torch.randn(1, 4, 24, dtype=torch.bfloat16)).shape == (1, 4, 32)
