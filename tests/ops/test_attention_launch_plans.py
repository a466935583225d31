"""The attention and window-attention launchers' memoised launch plans give exactly what their argument builders
give (the builders are what the offline build check compiles), for every layout, in any call order.

The kernels are not run: each launch is recorded instead, and compared with the builder called on the same
tensors. Two calls with the same shapes but other strides (or scalars) in a row must each get their own plan:
a plan keyed on too little would hand the second call the first one's strides.
"""
from __future__ import annotations

import pytest
import torch

from vlmkern.ops.attention import _triton as attn
from vlmkern.ops.window_attention import _triton as win


def _value(x):
    """What a launch argument is, for comparison: a tensor's memory and layout; a scalar's type and value."""
    if isinstance(x, torch.Tensor):
        return ("tensor", x.dtype, tuple(x.shape), x.stride(), x.data_ptr(), x.device)
    return (type(x), x)


def _launch_of(kernel, grid, args, meta, copies=()) -> tuple:
    """A launch for comparison; ``copies``: pointer arguments each side converts itself (layout compared, not
    memory)."""
    return kernel, tuple(grid), {n: _value(a)[:4] if n in copies else _value(a) for n, a in args.items()}, dict(meta)


@pytest.fixture
def recorded(monkeypatch):
    """The launches of both Triton rooms, ``(kernel, grid, args, constexprs)``, recorded instead of run."""
    launches = []
    for room in (attn, win):
        monkeypatch.setattr(room, "launch", lambda *a: launches.append(a))
    return launches


def _same(recorded, expected, copies=()) -> bool:
    return [_launch_of(*r, copies) for r in recorded] == [_launch_of(*e, copies) for e in expected]


def _qkv_layouts(dtype):
    """(q, k, v) with equal shapes in three layouts: contiguous, views of a fused QKV buffer, and (B, L, H, d)
    projections transposed to (B, H, L, d)."""
    g = torch.Generator().manual_seed(0)
    fused = torch.randn(2, 3, 12, 3, 32, generator=g, dtype=dtype)       # (B, H, L, 3, d)
    views = fused.unbind(3)
    blhd = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in views]
    return [[t.contiguous() for t in views], list(views), blhd]


def _configs(q, kernel, kpm, mode, dropout_p):
    """(config, constexprs) of ``kernel`` as the launchers derive them."""
    upcast, precision, family = attn._launch_params(q.dtype, *attn.host_dots(q.dtype))
    cfg = attn.attention_config(kernel, family, q.shape[3], dropout_p > 0)
    return cfg, attn._constexprs(q.shape[3], mode, kpm is not None, dropout_p > 0, upcast, precision, cfg)


def _expected_forward(q, k, v, kpm, num_query, mode, scale, dropout_p, rng, out, lse):
    cfg, meta = _configs(q, "fwd", kpm, mode, dropout_p)
    grid = (attn.cdiv(q.shape[2], cfg["BLOCK_M"]), q.shape[0] * q.shape[1])
    return [(attn.K._masked_attn_fwd_kernel, grid,
             attn._fwd_args(q, k, v, out, lse, kpm, num_query, scale, dropout_p, rng), meta)]


def _expected_backward(grad, q, k, v, out, lse, kpm, num_query, mode, scale, dropout_p, rng, delta, dq, dk, dv):
    B, H, Lq, d = q.shape
    inputs = (q, k, v, kpm, num_query, scale, dropout_p, rng)
    (dkdv_cfg, dkdv_meta), (dq_cfg, dq_meta) = (_configs(q, n, kpm, mode, dropout_p) for n in ("dkdv", "dq"))
    return [
        (attn.K._masked_attn_bwd_delta_kernel, (attn.cdiv(Lq, attn.DELTA_CONFIG["BLOCK_M"]), B * H),
         attn._delta_args(out, grad, delta), dict(HEAD_DIM=d, **attn.DELTA_CONFIG)),
        (attn.K._masked_attn_bwd_dkdv_kernel, (attn.cdiv(k.shape[2], dkdv_cfg["BLOCK_N"]), B * H),
         attn._dkdv_args(grad, lse, delta, dk, dv, *inputs), dkdv_meta),
        (attn.K._masked_attn_bwd_dq_kernel, (attn.cdiv(Lq, dq_cfg["BLOCK_M"]), B * H),
         attn._dq_args(grad, lse, delta, dq, *inputs), dq_meta),
    ]


# (key mask, num_query, mode, scale, dropout_p, rng): the mask row-major then column-major (same values, other
# strides), a scale and a dropout probability that only the plan's scalars carry.
_MASK = torch.tensor([[1] * 9 + [0], [1] * 4 + [0] * 6], dtype=torch.bool)     # (B, T = L - num_query)
_CALLS = [(None, 2, 0, 0.125, 0.0, None), (_MASK, 2, 2, 0.125, 0.0, None),
          (_MASK.t().contiguous().t(), 2, 2, 0.125, 0.0, None), (None, 2, 1, 0.3, 0.25, torch.tensor([5, 7])),
          (_MASK.int(), 0, 0, 0.125, 0.0, None)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_attention_plans_match_the_builders_for_every_layout(recorded, dtype):
    for q, k, v in _qkv_layouts(dtype):
        for kpm, num_query, mode, scale, dropout_p, rng in _CALLS:
            kpm = kpm if kpm is None or num_query else torch.cat([kpm, kpm[:, :2]], 1)   # (B, L) when NQ = 0
            copies = () if kpm is None or kpm.dtype == torch.bool else ("kpm_ptr",)    # an int mask is converted
            for qq in (q, q[:, :, num_query:]) if num_query else (q,):      # every row, and the text rows only
                recorded.clear()
                out, lse = attn.forward(qq, k, v, kpm, num_query, mode, scale, dropout_p, rng)
                assert _same(recorded, _expected_forward(qq, k, v, kpm, num_query, mode, scale, dropout_p, rng,
                                                         out, lse), copies)
                for grad in (torch.ones_like(out), torch.ones(1, 1, 1, 1, dtype=dtype).expand_as(out)):
                    recorded.clear()      # a dense gradient, then the stride-0 one a sum gives
                    dq, dk, dv = attn.backward(grad, qq, k, v, out, lse, kpm, num_query, mode, scale, dropout_p,
                                               rng)
                    delta = recorded[0][2]["delta_ptr"]         # allocated inside the launcher
                    assert _same(recorded, _expected_backward(grad, qq, k, v, out, lse, kpm, num_query, mode,
                                                              scale, dropout_p, rng, delta, dq, dk, dv), copies)


def test_attention_plan_is_computed_once_per_key(recorded):
    q, k, v = _qkv_layouts(torch.float32)[1]
    attn.forward(q, k, v, None, 2, 0, 0.125, 0.0, None)
    before = attn._forward_plan.cache_info()
    attn.forward(q, k, v, None, 2, 0, 0.125, 0.0, None)
    after = attn._forward_plan.cache_info()
    assert (after.hits, after.misses) == (before.hits + 1, before.misses)
    attn.forward(q, k, v, None, 2, 0, 0.25, 0.0, None)          # another scale: another plan
    assert attn._forward_plan.cache_info().misses == after.misses + 1
    assert recorded[1][2]["qk_scale"] != recorded[2][2]["qk_scale"]


def _window_inputs(layout: str, h_dtype):
    g = torch.Generator().manual_seed(1)
    u = torch.randn(2, 4, 16, generator=g)
    h = torch.randn(2, 16, 8, 8, generator=g).to(h_dtype)
    if layout == "transposed":
        u = u.transpose(1, 2).contiguous().transpose(1, 2)
        h = h.transpose(2, 3).contiguous().transpose(2, 3)
    elif layout == "strided":
        u = u.repeat_interleave(2, dim=-1)[..., ::2]
        h = h.repeat_interleave(2, dim=1)[:, ::2]
    return u, h


@pytest.mark.parametrize("h_dtype", [torch.float32, torch.float16])
def test_window_attention_plans_match_the_builders_for_every_layout(recorded, h_dtype):
    for layout in ("contiguous", "transposed", "strided", "contiguous"):
        u, h = _window_inputs(layout, h_dtype)
        for eps in (1e-5, 1e-3):
            recorded.clear()
            s, *rows = win.forward(u, h, eps)
            consts = win._constexprs(u, h)
            assert _same(recorded, [(win._window_attn_fwd_kernel, (u.shape[1], u.shape[0]),
                                     win._fwd_args(u, h, s, *rows, eps), consts)])
            ds = torch.ones(1, 1, 1).expand_as(s)
            recorded.clear()
            du, dh = win.backward(ds, u, h, *rows)
            assert _same(recorded, [(win._window_attn_bwd_kernel, (u.shape[1], u.shape[0]),
                                     win._bwd_args(ds, u, h, *rows, du, dh), consts)])
