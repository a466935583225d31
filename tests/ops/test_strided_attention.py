"""Every tensor argument of the attention, window-attention, patch-embed and patchify ops in any layout.

Hypothesis draws tiny shapes and, per tensor argument, one layout: contiguous, transposed (last two dims
swapped in memory), strided (every other element of a larger buffer), expanded (stride 0 along dim 0) or
offset (a view that starts inside its storage). Results and gradients must equal the fp64 reference on the same
values (computed from contiguous copies), on the default backend and on ``VLMKERN_BACKEND=triton``.

The default run draws a few examples per family; under a Hypothesis profile of >= 500 examples (the ``slow``
profile) the ``slow``-marked twins run that many.
"""
from __future__ import annotations

import pytest
import torch

from vlmkern import ops, reference
from vlmkern.ops.window_attention import patch_info_mining

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

LAYOUTS = ("contiguous", "transposed", "strided", "expanded", "offset")
BACKENDS = pytest.mark.parametrize("backend", ["auto", "triton"], indirect=True)
SLOW_EXAMPLES = max(500, settings.default.max_examples)
RUN_SLOW = settings.default.max_examples >= 500   # the slow profile is loaded


def _settings(n):
    return settings(max_examples=n, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def relayout(t: torch.Tensor, kind: str) -> torch.Tensor:
    """Same values (``expanded``: dim 0 repeated) in another memory layout; differentiable."""
    if kind == "transposed" and t.dim() >= 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if kind == "strided":
        return t.repeat_interleave(2, dim=-1)[..., ::2]
    if kind == "expanded" and t.shape[0] > 0:
        return t.narrow(0, 0, 1).expand_as(t)
    if kind == "offset":
        return torch.cat([t, t], dim=0)[t.shape[0]:]
    return t


def _leaf(*shape, dtype=torch.float64):
    return torch.randn(*shape, dtype=dtype).requires_grad_(True)


def _grads_match(out, ref, leaves, ref_leaves, atol=2e-5, rtol=2e-4):
    """Forward and the gradients of ``sum(out * g)`` (one random ``g``) against the fp64 reference."""
    torch.testing.assert_close(out.detach().double(), ref.detach(), atol=atol, rtol=rtol)
    if not any(t.requires_grad for t in leaves):
        return
    g = torch.randn_like(ref)
    gl = torch.autograd.grad(out, [t for t in leaves if t.requires_grad], g.to(out.dtype), allow_unused=True)
    gr = torch.autograd.grad(ref, [t for t in ref_leaves if t.requires_grad], g, allow_unused=True)
    for a, b in zip(gl, gr):
        if b is None:
            assert a is None or not a.any()
            continue
        torch.testing.assert_close(a.double(), b, atol=atol * 5, rtol=rtol * 5)


def _pair(*shape):
    """(fp32 leaf, fp64 leaf with the same values)."""
    base = torch.randn(*shape)
    return base.clone().requires_grad_(True), base.double().requires_grad_(True)


# ----------------------------------------------------------------------------------------------- attention
@st.composite
def attention_case(draw, qformer: bool):
    B, H = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    L = draw(st.integers(1, 6))
    case = dict(B=B, H=H, L=L, layouts=[draw(st.sampled_from(LAYOUTS)) for _ in range(4)],
                masked=draw(st.booleans()))
    if qformer:
        case["num_query"] = draw(st.integers(0, L))
        case["mode"] = draw(st.sampled_from(["bidirectional", "unimodal", "multimodal_causal"]))
        case["text_rows"] = draw(st.booleans())
    else:
        case["Lq"] = draw(st.integers(1, 4))
    return case


def _check_attention(case, qformer: bool):
    B, H, L, d = case["B"], case["H"], case["L"], 32
    lq = case.get("Lq", L)
    if qformer and case["text_rows"] and case["num_query"] > 0:
        lq = L - case["num_query"]
    (q, q64), (k, k64), (v, v64) = _pair(B, H, lq, d), _pair(B, H, L, d), _pair(B, H, L, d)
    mask_len = L - case["num_query"] if qformer else L
    mask = None
    if case["masked"]:
        mask = relayout(torch.rand(B, mask_len) > 0.3, case["layouts"][3])
    lay = case["layouts"]
    args = [relayout(t, kind) for t, kind in zip((q, k, v), lay)]
    args64 = [relayout(t, kind) for t, kind in zip((q64, k64, v64), lay)]
    if qformer:
        kw = dict(num_query=case["num_query"], mode=case["mode"], text_mask=mask)
        out = ops.qformer_attention(*args, **kw)
        ref = reference.qformer_attention(*args64, **{**kw, "text_mask": None if mask is None else mask.clone()})
    else:
        out = ops.cross_attention(*args, key_padding_mask=mask)
        ref = reference.cross_attention(*args64, key_padding_mask=None if mask is None else mask.clone())
    _grads_match(out, ref, (q, k, v), (q64, k64, v64))




# ---------------------------------------------------------------------------------------- window attention
@st.composite
def window_case(draw):
    return dict(B=draw(st.integers(1, 2)), pn=draw(st.integers(1, 2)), M=draw(st.integers(1, 3)),
                C=draw(st.sampled_from([4, 8])), layouts=[draw(st.sampled_from(LAYOUTS)) for _ in range(2)])


def _check_window(case):
    B, pn, M, C = case["B"], case["pn"], case["M"], case["C"]
    (u, u64), (h, h64) = _pair(B, pn * pn, C), _pair(B, C, pn * M, pn * M)
    lu, lh = case["layouts"]
    s, p = ops.window_attention(relayout(u, lu), relayout(h, lh))
    s_ref, p_ref = reference.window_attention(relayout(u64, lu), relayout(h64, lh))
    torch.testing.assert_close(p.double(), p_ref.detach(), atol=2e-5, rtol=2e-4)
    _grads_match(s, s_ref, (u, h), (u64, h64))



@st.composite
def mining_case(draw):
    return dict(B=draw(st.integers(1, 2)), pn=draw(st.integers(1, 2)), M=draw(st.integers(1, 2)),
                C=draw(st.sampled_from([4, 8])), C_aux=draw(st.sampled_from([4, 6])),
                layouts=[draw(st.sampled_from(LAYOUTS)) for _ in range(14)])


def _check_mining(case):
    B, pn, M, C, C_aux = case["B"], case["pn"], case["M"], case["C"], case["C_aux"]
    shapes = [(B, pn * pn, C), (B, C_aux, pn * M, pn * M)]
    for c_in in (C, C_aux, C_aux):
        shapes += [(c_in,), (c_in,), (C, c_in), (C,)]
    pairs = [_pair(*s) for s in shapes]
    with torch.no_grad():
        for i in (2, 6, 10):                            # LayerNorm weights around 1
            pairs[i][0].add_(3.0)
            pairs[i][1].add_(3.0)
    ours = [relayout(a, kind) for (a, _), kind in zip(pairs, case["layouts"])]
    ref = [relayout(b, kind) for (_, b), kind in zip(pairs, case["layouts"])]
    out = patch_info_mining(ours[0], ours[1], ours[2:6], ours[6:10], ours[10:14])
    expect = reference.patch_info_mining(ref[0], ref[1], ref[2:6], ref[6:10], ref[10:14])
    _grads_match(out, expect, [a for a, _ in pairs[:2]], [b for _, b in pairs[:2]], atol=1e-4, rtol=1e-3)



# ------------------------------------------------------------------------------------ patch embed / patchify
@st.composite
def patch_case(draw):
    return dict(B=draw(st.integers(1, 2)), C=draw(st.integers(1, 3)), H=draw(st.integers(1, 9)),
                W=draw(st.integers(1, 9)), p=draw(st.integers(1, 4)), out=draw(st.integers(1, 8)),
                float_pixels=draw(st.booleans()), bias=draw(st.booleans()),
                layouts=[draw(st.sampled_from(LAYOUTS)) for _ in range(3)])


def _pixels(case):
    px = torch.randint(0, 256, (case["B"], case["C"], case["H"], case["W"]))
    return px.float() if case["float_pixels"] else px.to(torch.uint8)


def _check_patch_embed(case):
    px = _pixels(case)
    K = case["C"] * case["p"] ** 2
    (w, w64) = _pair(case["out"], K)
    (b, b64) = _pair(case["out"]) if case["bias"] else (None, None)
    lp, lw, lb = case["layouts"]
    px_leaf = px.clone().requires_grad_(case["float_pixels"])
    px64 = px.double().requires_grad_(case["float_pixels"])
    kw = dict(patch_size=case["p"])
    out = ops.patch_embed(relayout(px_leaf, lp), relayout(w, lw), None if b is None else relayout(b, lb), **kw)
    ref = reference.patch_embed(relayout(px64, lp), relayout(w64, lw), None if b64 is None else relayout(b64, lb),
                                **kw)
    leaves = [t for t in (px_leaf, w, b) if t is not None]
    ref_leaves = [t for t in (px64, w64, b64) if t is not None]
    _grads_match(out, ref, leaves, ref_leaves, atol=1e-4, rtol=1e-3)



def _check_patchify(case):
    px = relayout(_pixels(case), case["layouts"][0])
    out = ops.patchify(px, case["p"])
    torch.testing.assert_close(out, reference.patchify(px.contiguous(), case["p"], out_dtype=torch.float32),
                               atol=0, rtol=0)



# ----------------------------------------------------------------------------------------------- the runs
FAMILIES = {
    "qformer_attention": (lambda c: _check_attention(c, True), attention_case(qformer=True)),
    "cross_attention": (lambda c: _check_attention(c, False), attention_case(qformer=False)),
    "window_attention": (_check_window, window_case()),
    "patch_info_mining": (_check_mining, mining_case()),
    "patch_embed": (_check_patch_embed, patch_case()),
    "patchify": (_check_patchify, patch_case()),
}


def _run_family(family, data):
    check, strategy = FAMILIES[family]
    check(data.draw(strategy, label="case"))


@BACKENDS
@pytest.mark.parametrize("family", FAMILIES)
@_settings(3)
@given(data=st.data())
def test_any_layout(backend, family, data):
    if family == "patchify" and backend == "triton":
        pytest.skip("patchify has no Triton backend (the default run covers its C++ and reference backends)")
    _run_family(family, data)


@pytest.mark.slow
@pytest.mark.skipif(not RUN_SLOW, reason="runs under the slow Hypothesis profile (>= 500 examples)")
@BACKENDS
@pytest.mark.parametrize("family", FAMILIES)
@_settings(SLOW_EXAMPLES)
@given(data=st.data())
def test_any_layout_slow(backend, family, data):
    if family == "patchify" and backend == "triton":
        pytest.skip("patchify has no Triton backend")
    _run_family(family, data)


# --------------------------------------------------------------------------------------------- row isolation
@BACKENDS
@pytest.mark.parametrize("op", ["qformer", "cross"])
def test_masked_keys_and_other_rows_never_leak(backend, op):
    """Finite garbage in masked keys (k and v) changes nothing; changing one query row changes only that row."""
    B, H, L, d, nq = 2, 2, 6, 32, 2
    q, k, v = (torch.randn(B, H, L, d) for _ in range(3))
    mask_len = L - nq if op == "qformer" else L
    mask = torch.ones(B, mask_len, dtype=torch.bool)
    mask[0, -2:] = False
    mask[1, -1] = False

    def run(q, k, v):
        if op == "qformer":
            return ops.qformer_attention(q, k, v, num_query=nq, mode="multimodal_causal", text_mask=mask)
        return ops.cross_attention(q, k, v, key_padding_mask=mask)

    out = run(q, k, v)
    masked_keys = torch.zeros(B, L, dtype=torch.bool)
    masked_keys[:, L - mask_len:] = ~mask
    kg, vg = k.clone(), v.clone()
    kg[masked_keys[:, None, :, None].expand_as(k)] = 1e3
    vg[masked_keys[:, None, :, None].expand_as(v)] = 1e6
    torch.testing.assert_close(run(q, kg, vg), out, atol=1e-5, rtol=1e-5)
    q2 = q.clone()
    q2[:, :, 3] = 50.0
    other = torch.arange(L) != 3
    torch.testing.assert_close(run(q2, k, v)[:, :, other], out[:, :, other], atol=0, rtol=0)
