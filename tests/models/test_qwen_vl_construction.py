"""Qwen-VL ``Resampler``: construction as ``visual.py`` (the numpy float32 ``pos_embed`` table bit for bit, the
``_init_weights`` pass, in the drop-in and in the port) and a hooked or wrapped ``attn`` acting as in the original
(which calls ``nn.MultiheadAttention``)."""
import math

import pytest
import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_hook

from vlmkern.models import qwen_vl
from vlmkern.models.qwen_vl import Resampler, get_2d_sincos_pos_embed
from vlmkern.reference.originals import qwen_vl as original
from vlmkern.testing import assert_no_host_sync, assert_same_run, run_module

G, D, H, KV = 3, 32, 4, 24


def _fresh(cls, kv_dim=KV, seed=0):
    torch.manual_seed(seed)
    return cls(G, D, H, kv_dim)


def _pair():
    orig = _fresh(original.Resampler)
    with torch.no_grad():  # non-trivial projections and norms so that every term matters
        for name, p in orig.named_parameters():
            if name != "pos_embed":
                p.add_(0.2 * torch.randn_like(p))
    ours = Resampler(G, D, H, KV)
    ours.load_state_dict(orig.state_dict(), strict=True)
    return ours.eval(), orig.eval()


# ------------------------------------------------------------------------------------------- construction
@pytest.mark.parametrize("dim,grid", [(32, 3), (64, 4), (1664, 7), (4096, 16), (5120, 16)])
def test_sincos_table_is_bit_identical_to_the_numpy_original(dim, grid):
    want = torch.from_numpy(original.get_2d_sincos_pos_embed(dim, grid)).float()
    got = get_2d_sincos_pos_embed(dim, grid)
    assert got.dtype == torch.float32 and torch.equal(got, want)


def test_sincos_table_without_numpy_is_the_same_float32_steps_in_torch(monkeypatch):
    want = torch.from_numpy(original.get_2d_sincos_pos_embed(4096, 16)).float()
    monkeypatch.setattr(qwen_vl, "_np", None)
    got = get_2d_sincos_pos_embed(4096, 16)
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)       # sin / cos may differ by an ulp


def test_sincos_table_follows_the_default_device():
    with torch.device("meta"):
        r = Resampler(G, D, H, KV)
    assert r.pos_embed.is_meta and not r.pos_embed.requires_grad
    with pytest.raises(ValueError, match="divisible by 4"):
        get_2d_sincos_pos_embed(30, 2)


def test_port_runs_visual_py_init_weights():
    port = _fresh(original.Resampler)
    for w in (port.kv_proj.weight, port.attn.out_proj.weight):
        assert abs(w.std().item() - 0.02) < 0.004                  # trunc_normal_(std=.02), not kaiming (~0.1)
    assert not port.attn.out_proj.bias.any() and not port.attn.in_proj_bias.any()
    for ln in (port.ln_q, port.ln_kv):
        assert torch.equal(ln.weight, torch.ones(D)) and not ln.bias.any()


@pytest.mark.parametrize("kv_dim", [KV, None])
def test_same_seed_gives_the_original_state_dict_bit_for_bit(kv_dim):
    orig, ours = _fresh(original.Resampler, kv_dim), _fresh(Resampler, kv_dim)
    want, got = orig.state_dict(), ours.state_dict()
    assert set(got) == set(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key


@pytest.mark.parametrize("L", [9, 16, 64, 100, 256, 1024])
def test_cached_position_tables_match_the_original_resize_of_a_fresh_table(L):
    orig, ours = _fresh(original.Resampler), _fresh(Resampler)
    with torch.no_grad():
        got = ours._position_table(L)
        again = ours._position_table(L)
    assert again is got                                              # cached
    assert torch.equal(got, original.get_abs_pos(orig.pos_embed, L))
    x = torch.randn(2, L, KV)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), orig(x), rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
def test_a_gpu_forward_reads_nothing_back_to_the_host():
    """On a GPU the position table is recomputed, not compared with a cached copy: a comparison's answer would
    come back to the host every call (a sync that stalls the queue)."""
    ours, orig = (m.cuda() for m in _pair())
    x = torch.randn(2, 64, KV, device="cuda")
    with torch.no_grad():
        assert_no_host_sync(lambda: ours(x))
        torch.testing.assert_close(ours(x), orig(x), rtol=1e-4, atol=1e-4)
    assert not ours._cache


# --------------------------------------------------------------------------- a hooked or wrapped attn
def test_output_changing_hook_on_attn_acts_as_in_the_original():
    ours, orig = _pair()
    calls = []

    def doubling(module, args, out):
        calls.append(module)
        return (out[0] * 2,) + tuple(out[1:])

    ours.attn.register_forward_hook(doubling)
    orig.attn.register_forward_hook(doubling)
    x = torch.randn(2, 16, KV)
    assert_same_run(run_module(ours, x), run_module(orig, x))
    assert calls == [ours.attn, orig.attn]


class ShiftedAttention(nn.MultiheadAttention):
    """A subclass standing in for ``attn`` (as an adapter or a quantised attention would): its own forward."""

    def forward(self, query, key, value, **kwargs):
        out, w = super().forward(query, key, value, **kwargs)
        return out + 0.5 * query, w


def test_a_wrapped_attn_takes_effect_as_in_the_original():
    ours, orig = _pair()
    x = torch.randn(2, 9, KV)
    with torch.no_grad():
        plain = ours(x)
    for m in (ours, orig):
        shifted = ShiftedAttention(D, H)
        shifted.load_state_dict(m.attn.state_dict())
        m.attn = shifted
    got = run_module(ours, x)
    assert_same_run(got, run_module(orig, x))
    assert not torch.allclose(got[0], plain, atol=1e-3)


def test_a_global_forward_hook_sees_the_attn_call_of_the_original():
    ours, orig = _pair()
    x = torch.randn(2, 9, KV)
    called = []
    handle = register_module_forward_hook(lambda m, a, o: called.append(type(m).__name__))
    try:
        with torch.no_grad():
            got = ours(x)
            ours_calls = list(called)
            called.clear()
            want = orig(x)
    finally:
        handle.remove()
    torch.testing.assert_close(got, want)
    assert ours_calls == called and "MultiheadAttention" in called


@pytest.mark.parametrize("change", ["dropout in training", "batch_first", "hook on out_proj"])
def test_other_attention_settings_run_the_original_computation(change):
    ours, orig = _pair()
    for m in (ours, orig):
        if change == "dropout in training":
            m.attn.dropout = 0.5
            m.train()
        elif change == "batch_first":
            m.attn.batch_first = True
        else:
            m.attn.out_proj.register_forward_hook(lambda mod, a, o: o * 2)
    x = torch.randn(3, 9, KV)
    torch.manual_seed(7)
    got = run_module(ours, x)
    torch.manual_seed(7)
    assert_same_run(got, run_module(orig, x))


def test_plain_attn_takes_the_fused_path(monkeypatch):
    ours, orig = _pair()
    x = torch.randn(2, 9, KV)
    handle = ours.attn.register_forward_hook(lambda m, a, o: None)
    with torch.no_grad():
        hooked = ours(x)
    handle.remove()

    def refuse(*args, **kwargs):
        raise AssertionError("the original computation ran for a plain attn")

    monkeypatch.setattr(Resampler, "forward_original", refuse)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), orig(x))
        torch.testing.assert_close(ours(x), hooked)
    ours.attn.register_forward_pre_hook(lambda m, a: None)
    with pytest.raises(AssertionError, match="original computation"):
        ours(x)


def test_bad_input_is_named_for_a_wrapped_attn():
    """``x``'s checks read the resampler's own parameters, not ``attn``'s (a wrapper may not expose them)."""
    ours, _ = _pair()
    ours.attn = nn.Module()
    with pytest.raises(ValueError, match="kv_dim=24"):
        ours(torch.randn(2, 9, KV + 1))
    with pytest.raises(TypeError, match="x has dtype torch.float64"):
        ours(torch.randn(2, 9, KV, dtype=torch.float64))
    assert math.isqrt(ours.num_queries) == G
