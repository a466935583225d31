"""vlmkern.ops.qformer_attention: the three Q-Former masks (LAVIS ``blip2_qformer.py``) computed inside the kernel.

Oracles are built independently of vlmkern: the masks are written out the way the originals build them
(additive ``-10000``), and attention is plain ``softmax(q k^T * scale + M) v`` in float64 (reference) and
in the input dtype (baseline for the tolerance rule).
"""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vlmkern.masks import QFormerMode, qformer_visible
from vlmkern.ops import attention as attn_ops
from vlmkern.ops.attention import qformer_attention
from vlmkern.reference import attention as ref_attention
from vlmkern.testing import assert_close, assert_compiled_matches_eager, check_against

MODES = ("bidirectional", "unimodal", "multimodal_causal")
TRITON = pytest.mark.parametrize("backend", ["triton"], indirect=True)
REFERENCE = pytest.mark.parametrize("backend", ["reference"], indirect=True)


# ------------------------------------------------------------------------------------------- oracles
def spec_mask(mode: str, nq: int, pad_t: torch.Tensor, text_rows_only: bool = False) -> torch.Tensor:
    """The masks as the originals build them: additive ``(B, 1, rows, Q+T)``, 0 keep / -10000 masked."""
    B, T = pad_t.shape
    L = nq + T
    pad = pad_t.to(torch.float64)
    if mode == "bidirectional":      # ITM / InstructBLIP: M[b, i, j] = 0 if j < Q or padT[b, j-Q] == 1
        keep = torch.cat([torch.ones(B, nq, dtype=torch.float64), pad], 1)[:, None, :].expand(B, L, L)
    elif mode == "unimodal":         # ITC as one pass: block-diagonal [[1_QQ, 0], [0, padT]]
        keep = torch.zeros(B, L, L, dtype=torch.float64)
        keep[:, :nq, :nq] = 1
        keep[:, nq:, nq:] = pad[:, None, :]
    else:                            # UniLM: rows i<Q: [1]*Q + [0]*T ; rows i>=Q: [1]*Q + causal(T)*padT
        keep = torch.zeros(B, L, L, dtype=torch.float64)
        keep[:, :, :nq] = 1
        keep[:, :nq, :nq] = 1
        keep[:, nq:, nq:] = torch.tril(torch.ones(T, T, dtype=torch.float64)) * pad[:, None, :]
        keep[:, :nq, nq:] = 0
    if text_rows_only:
        keep = keep[:, nq:]
    return ((1.0 - keep) * -10000.0)[:, None]


def itg_mask(nq: int, pad_t: torch.Tensor) -> torch.Tensor:
    """The ITG training path's mask, literally: M[b, t, j] = 0 if j < Q or (j-Q <= t and padT[b, j-Q] == 1)."""
    B, T = pad_t.shape
    t = torch.arange(T)[:, None]
    j = torch.arange(nq + T)[None, :]
    text_ok = (j - nq <= t) & torch.cat([torch.ones(B, nq, dtype=torch.bool), pad_t.bool()], 1)[:, None, :]
    keep = (j < nq) | text_ok
    return torch.where(keep, 0.0, -10000.0).to(torch.float64)[:, None]


def plain_attention(q, k, v, additive_mask, scale=None):
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale + additive_mask.to(q.dtype)
    return torch.matmul(torch.softmax(scores, dim=-1), v)


def make_inputs(B, H, nq, T, d, *, text_rows_only=False, device="cpu"):
    L = nq + T
    q = torch.randn(B, H, T if text_rows_only else L, d, device=device)
    k = torch.randn(B, H, L, d, device=device)
    v = torch.randn(B, H, L, d, device=device)
    return q, k, v


def padded(B, T, lengths):
    return (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).to(torch.long)


# ------------------------------------------------------------------------- the three masks (kernel)
@TRITON
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_masks_match_spec(backend, device, mode, dtype):
    B, H, nq, T, d = 2, 2, 32, 17, 32
    text_mask = padded(B, T, [17, 9])
    q, k, v = make_inputs(B, H, nq, T, d, device=device)
    m = spec_mask(mode, nq, text_mask)
    check_against(lambda q, k, v: qformer_attention(q, k, v, num_query=nq, mode=mode, text_mask=text_mask.to(device)),
                  lambda q, k, v: plain_attention(q, k, v, m.to(q.device)), q, k, v, dtype=dtype)


@TRITON
@pytest.mark.parametrize("mode", MODES)
def test_masks_match_spec_head_dim_64(backend, device, mode):
    B, H, nq, T, d = 2, 2, 32, 20, 64
    text_mask = padded(B, T, [3, 20]).bool()
    q, k, v = make_inputs(B, H, nq, T, d, device=device)
    m = spec_mask(mode, nq, text_mask)
    check_against(lambda q, k, v: qformer_attention(q, k, v, num_query=nq, mode=mode, text_mask=text_mask.to(device)),
                  lambda q, k, v: plain_attention(q, k, v, m.to(q.device)), q, k, v, dtype=torch.bfloat16)


@TRITON
@pytest.mark.parametrize("mode", list(QFormerMode), ids=lambda m: m.name.lower())
@pytest.mark.parametrize("nq,T,d", [(3, 6, 32), (40, 30, 128)])
@pytest.mark.parametrize("text_rows_only", [False, True])
def test_kernel_visibility_is_qformer_visible(backend, device, mode, nq, T, d, text_rows_only):
    """The kernel's ``_visible`` (with its block skipping) is ``vlmkern.masks.qformer_visible`` and the key
    padding: zero queries give uniform probabilities over the visible keys and one-hot values read them out,
    so ``out[b, h, r, j] > 0`` exactly where row ``r`` sees key ``j`` (sample 1's text is all padding)."""
    B, L = 2, nq + T
    text_mask = torch.ones(B, T, dtype=torch.bool)
    text_mask[0, 1::3] = False
    text_mask[1] = False
    rows = range(L - T, L) if text_rows_only else range(L)
    q = torch.zeros(B, 1, len(rows), d, device=device)
    k = torch.randn(B, 1, L, d, device=device)
    v = torch.eye(L, d, device=device).expand(B, 1, L, d)
    out = qformer_attention(q, k, v, num_query=nq, mode=mode, text_mask=text_mask.to(device))
    expected = torch.tensor([[[qformer_visible(mode, nq, r, j) and (j < nq or bool(text_mask[b, j - nq]))
                               for j in range(L)] for r in rows] for b in range(B)])
    assert torch.equal(out[:, 0, :, :L].cpu() > 0, expected)


@TRITON
def test_head_dim_128(backend, device):
    B, H, nq, T, d = 1, 1, 16, 24, 128
    text_mask = padded(B, T, [20])
    q, k, v = make_inputs(B, H, nq, T, d, device=device)
    m = spec_mask("multimodal_causal", nq, text_mask)
    check_against(lambda q, k, v: qformer_attention(q, k, v, num_query=nq, mode="multimodal_causal",
                                                    text_mask=text_mask.to(device)),
                  lambda q, k, v: plain_attention(q, k, v, m.to(q.device)), q, k, v, dtype=torch.float16)


@TRITON
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_itg_text_rows_against_cached_kv(backend, device, dtype):
    """ITG training: q holds the T text rows; k, v are [Q cached query keys ; T text keys]."""
    B, H, nq, T, d = 2, 2, 32, 21, 32
    text_mask = padded(B, T, [21, 11])
    q, k, v = make_inputs(B, H, nq, T, d, text_rows_only=True, device=device)
    m = itg_mask(nq, text_mask)
    assert torch.equal(m, spec_mask("multimodal_causal", nq, text_mask, text_rows_only=True))
    out = check_against(
        lambda q, k, v: qformer_attention(q, k, v, num_query=nq, mode="multimodal_causal",
                                          text_mask=text_mask.to(device)),
        lambda q, k, v: plain_attention(q, k, v, m.to(q.device)), q, k, v, dtype=dtype)
    # The text rows of the one-pass UniLM mask are the same rows.
    q_full = torch.cat([torch.randn(B, H, nq, d, device=device), q], dim=2).to(dtype)
    full = qformer_attention(q_full, k.to(dtype), v.to(dtype), num_query=nq, mode="multimodal_causal",
                             text_mask=text_mask.to(device))
    torch.testing.assert_close(full[:, :, nq:], out.detach(), rtol=0, atol=1e-6 if dtype == torch.float32 else 2e-3)


@TRITON
@pytest.mark.parametrize("mode", ["bidirectional", "multimodal_causal"])
def test_regression_total_length_64_with_mask(backend, device, mode):
    """32 queries + 32 text = 64: the row/key blocks end exactly at the query/text boundary."""
    B, H, nq, T, d = 2, 2, 32, 32, 64
    text_mask = padded(B, T, [32, 7])
    q, k, v = make_inputs(B, H, nq, T, d, device=device)
    m = spec_mask(mode, nq, text_mask)
    check_against(lambda q, k, v: qformer_attention(q, k, v, num_query=nq, mode=mode, text_mask=text_mask.to(device)),
                  lambda q, k, v: plain_attention(q, k, v, m.to(q.device)), q, k, v, dtype=torch.float16)


@TRITON
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("nq,T,text_rows_only", [(32, 33, False), (1, 70, True)])
def test_regression_causal_diagonal_at_block_start(backend, device, dtype, nq, T, text_rows_only):
    """The last key a row block needs is the first key of a new block (65 = 64 + 1; ITG rows offset by 1)."""
    B, H, d = 1, 2, 32
    text_mask = padded(B, T, [T])
    q, k, v = make_inputs(B, H, nq, T, d, text_rows_only=text_rows_only, device=device)
    m = spec_mask("multimodal_causal", nq, text_mask, text_rows_only=text_rows_only)
    check_against(lambda q, k, v: qformer_attention(q, k, v, num_query=nq, mode="multimodal_causal",
                                                    text_mask=text_mask.to(device)),
                  lambda q, k, v: plain_attention(q, k, v, m.to(q.device)), q, k, v, dtype=dtype)


@TRITON
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("mode", ["unimodal", "multimodal_causal"])
@pytest.mark.parametrize("nq", [64, 33])
def test_query_only_blocks_skip_text_blocks(backend, device, dtype, mode, nq):
    """Whole row/key blocks of queries only (InternLM-XComposer's 64; 33 = one past a 32-block), whose
    text key blocks are skipped."""
    B, H, T, d = 1, 1, 10, 32
    text_mask = padded(B, T, [7])
    q, k, v = make_inputs(B, H, nq, T, d, device=device)
    m = spec_mask(mode, nq, text_mask)
    check_against(lambda q, k, v: qformer_attention(q, k, v, num_query=nq, mode=mode, text_mask=text_mask.to(device)),
                  lambda q, k, v: plain_attention(q, k, v, m.to(q.device)), q, k, v, dtype=dtype)


@TRITON
def test_no_text_mask_and_text_only_pass(backend, device):
    B, H, d = 2, 2, 32
    # Queries only (stage-2 / LLM-feeding path): 32 queries, T = 0.
    q, k, v = make_inputs(B, H, 32, 0, d, device=device)
    check_against(lambda q, k, v: qformer_attention(q, k, v, num_query=32, mode="bidirectional"),
                  lambda q, k, v: plain_attention(q, k, v, torch.zeros((), device=q.device)), q, k, v,
                  dtype=torch.float32)
    # Text-only pass (ITC text side): num_query = 0, padding on the text keys.
    text_mask = padded(B, 19, [19, 4])
    q, k, v = make_inputs(B, H, 0, 19, d, device=device)
    m = spec_mask("unimodal", 0, text_mask)
    check_against(lambda q, k, v: qformer_attention(q, k, v, num_query=0, mode="unimodal",
                                                    text_mask=text_mask.to(device)),
                  lambda q, k, v: plain_attention(q, k, v, m.to(q.device)), q, k, v, dtype=torch.float16)


@TRITON
def test_itg_with_zero_text_tokens(backend, device):
    q, k, v = [t.requires_grad_() for t in make_inputs(2, 2, 32, 0, 32, text_rows_only=True, device=device)]
    out = qformer_attention(q, k, v, num_query=32, mode="multimodal_causal",
                            text_mask=torch.ones(2, 0, dtype=torch.long, device=device))
    assert out.shape == (2, 2, 0, 32)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert dq.shape == q.shape and torch.equal(dk, torch.zeros_like(dk)) and torch.equal(dv, torch.zeros_like(dv))


@TRITON
def test_fully_masked_rows_return_zeros(backend, device):
    """Unimodal text rows of an all-padding text see no key: zeros and zero gradients, never NaN."""
    B, H, nq, T, d = 2, 1, 16, 12, 32
    text_mask = padded(B, T, [12, 0])
    q, k, v = [t.requires_grad_() for t in make_inputs(B, H, nq, T, d, device=device)]
    out = qformer_attention(q, k, v, num_query=nq, mode="unimodal", text_mask=text_mask.to(device))
    assert torch.isfinite(out).all()
    assert torch.equal(out[1, :, nq:], torch.zeros_like(out[1, :, nq:]))
    ref = ref_attention.qformer_attention(q.double(), k.double(), v.double(), num_query=nq, mode="unimodal",
                                          text_mask=text_mask.to(device))
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert all(torch.isfinite(g).all() for g in (dq, dk, dv))
    assert torch.equal(dq[1, :, nq:], torch.zeros_like(dq[1, :, nq:]))
    assert torch.equal(dk[1, :, nq:], torch.zeros_like(dk[1, :, nq:]))   # padded keys get no gradient


@TRITON
def test_non_contiguous_fused_qkv(backend, device):
    """q, k, v as strided views of one fused projection ``(B, L, 3, H, d)``."""
    B, H, nq, T, d = 2, 2, 32, 9, 32
    text_mask = padded(B, T, [9, 5])
    qkv = torch.randn(B, nq + T, 3, H, d, device=device)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    assert not q.is_contiguous()
    m = spec_mask("multimodal_causal", nq, text_mask)

    def ours(q, k, v):  # re-create the fused layout so the kernel sees the strided views
        fused = torch.stack([q, k, v], 0).permute(1, 3, 0, 2, 4).contiguous()
        qs, ks, vs = fused.permute(2, 0, 3, 1, 4).unbind(0)
        assert qs.stride(-1) == 1 and qs.stride(-2) == 3 * H * d
        return qformer_attention(qs, ks, vs, num_query=nq, mode="multimodal_causal", text_mask=text_mask.to(device))

    check_against(ours, lambda q, k, v: plain_attention(q, k, v, m.to(q.device)), q, k, v, dtype=torch.float32)


@TRITON
def test_custom_scale(backend, device):
    B, H, nq, T, d = 1, 2, 8, 8, 32
    q, k, v = make_inputs(B, H, nq, T, d, device=device)
    m = spec_mask("bidirectional", nq, torch.ones(B, T))
    check_against(lambda q, k, v: qformer_attention(q, k, v, num_query=nq, mode="bidirectional", scale=0.3),
                  lambda q, k, v: plain_attention(q, k, v, m.to(q.device), scale=0.3), q, k, v,
                  dtype=torch.float32)


# ------------------------------------------------------------------------------ hypothesis vs fp64
@TRITON
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_shapes_and_masks(backend, device, data):
    B = data.draw(st.integers(1, 2), "B")
    H = data.draw(st.integers(1, 2), "H")
    nq = data.draw(st.integers(0, 40), "num_query")
    T = data.draw(st.integers(0, 40), "T")
    if nq + T == 0:
        T = 1
    d = data.draw(st.sampled_from([32, 64]), "d")
    mode = data.draw(st.sampled_from(MODES), "mode")
    dtype = data.draw(st.sampled_from([torch.float32, torch.float16]), "dtype")
    text_rows_only = data.draw(st.booleans(), "text_rows_only")
    use_mask = data.draw(st.booleans(), "use_mask")
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2 ** 16), "seed"))
    text_mask = (torch.rand(B, T, generator=g) < 0.7) if use_mask else None
    L = nq + T
    q = torch.randn(B, H, T if text_rows_only else L, d, generator=g).to(device)
    k, v = (torch.randn(B, H, L, d, generator=g).to(device) for _ in range(2))
    tm = text_mask.to(device) if text_mask is not None else None
    # The fp64 oracle is the vlmkern reference (exact exclusion; rows without keys -> 0).
    check_against(lambda q, k, v: qformer_attention(q, k, v, num_query=nq, mode=mode, text_mask=tm),
                  lambda q, k, v: ref_attention.qformer_attention(q, k, v, num_query=nq, mode=mode, text_mask=tm),
                  q, k, v, dtype=dtype)


# ------------------------------------------------------------------------------- reference backend
@REFERENCE
@pytest.mark.parametrize("mode", MODES)
def test_reference_backend_gradients(backend, mode):
    """The CPU path's explicit backward equals autograd through the reference."""
    B, H, nq, T, d = 2, 3, 5, 7, 16
    text_mask = padded(B, T, [7, 0])
    q, k, v = [t.double().requires_grad_() for t in make_inputs(B, H, nq, T, d)]
    out = qformer_attention(q, k, v, num_query=nq, mode=mode, text_mask=text_mask)
    ref = ref_attention.qformer_attention(q, k, v, num_query=nq, mode=mode, text_mask=text_mask)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, b)


def test_float64_and_odd_head_dim_use_reference(monkeypatch):
    monkeypatch.delenv("VLMKERN_BACKEND", raising=False)
    q, k, v = make_inputs(1, 2, 4, 3, 24)
    tm = torch.tensor([[1, 1, 0]])
    assert attn_ops.QFORMER_ATTENTION.select(q, k) == "reference"
    out = qformer_attention(q.double(), k.double(), v.double(), num_query=4, mode="multimodal_causal", text_mask=tm)
    ref = ref_attention.qformer_attention(q.double(), k.double(), v.double(), num_query=4, mode="multimodal_causal",
                                          text_mask=tm)
    torch.testing.assert_close(out, ref)


# --------------------------------------------------------------------------- opcheck and compile
def _op_args(device, dtype=torch.float32, requires_grad=True):
    q, k, v = (t.to(dtype).requires_grad_(requires_grad) for t in make_inputs(2, 2, 8, 6, 32, device=device))
    return q, k, v, padded(2, 6, [6, 2]).bool().to(device)


@pytest.mark.parametrize("backend", ["reference", "triton"], indirect=True)
def test_opcheck(backend, device):
    q, k, v, tm = _op_args(device)
    torch.library.opcheck(attn_ops._qformer_attention_op, (q, k, v, tm, 8, int(QFormerMode.UNIMODAL), 0.2, 0.0,
                                                           None))
    torch.library.opcheck(attn_ops._qformer_attention_op, (q[:, :, 8:], k, v, None, 8,
                                                           int(QFormerMode.MULTIMODAL_CAUSAL), 0.2, 0.0, None))


@pytest.mark.parametrize("backend", ["reference", "triton"], indirect=True)
def test_opcheck_backward_op(backend, device):
    """The backward op's results are dense on every backend, as its fake says (torch's CPU flash backward,
    which the reference takes for unmasked long keys, returns q / k / v-strided gradients). No double backward:
    inputs without grad."""
    q, k, v, tm = _op_args(device, requires_grad=False)
    out, lse = attn_ops._qformer_attention_op(q, k, v, tm, 8, int(QFormerMode.UNIMODAL), 0.2, 0.0, None)
    args = (torch.randn_like(out), q, k, v, out, lse, tm, 8, int(QFormerMode.UNIMODAL), 0.2, 0.0, None)
    for g in attn_ops._masked_attention_backward_op(*args):
        assert g.is_contiguous()
    torch.library.opcheck(attn_ops._masked_attention_backward_op, args)
    q, k, v = (t[:, :, :5] for t in (q, k, v))           # no mask, few keys: the flash branch where it applies
    out, lse = attn_ops._qformer_attention_op(q, k, v, None, 0, int(QFormerMode.BIDIRECTIONAL), 0.2, 0.0, None)
    args = (torch.randn_like(out), q, k, v, out, lse, None, 0, int(QFormerMode.BIDIRECTIONAL), 0.2, 0.0, None)
    torch.library.opcheck(attn_ops._masked_attention_backward_op, args)


def test_reference_takes_head_dim_zero():
    q = torch.randn(2, 2, 5, 0)
    for out in (ref_attention.cross_attention(q, q, q), ref_attention.qformer_attention(q, q, q, num_query=2,
                                                                                          mode="bidirectional")):
        assert out.shape == (2, 2, 5, 0)


@pytest.mark.parametrize("backend", ["reference", "triton"], indirect=True)
def test_torch_compile_fullgraph(backend, device):
    q, k, v, tm = _op_args(device)

    def f(q, k, v, tm):
        return qformer_attention(q, k, v, num_query=8, mode="multimodal_causal", text_mask=tm).sum()

    assert_compiled_matches_eager(f, (q, k, v), tm)


# ------------------------------------------------------------------------------------- bad input
def test_bad_input():
    q, k, v = make_inputs(2, 2, 4, 3, 32)
    tm = torch.ones(2, 3, dtype=torch.bool)
    call = qformer_attention
    with pytest.raises(ValueError, match="q must be 4-D"):
        call(q[0], k, v, num_query=4, mode="bidirectional")
    with pytest.raises(ValueError, match="heads must match"):
        call(q, k[:, :1], v[:, :1], num_query=4, mode="bidirectional")
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        call(q, k, v[:, :, :5], num_query=4, mode="bidirectional")
    with pytest.raises(ValueError, match="head_dim"):
        call(q[..., :16], k, v, num_query=4, mode="bidirectional")
    with pytest.raises(ValueError, match="batch"):
        call(q[:1], k, v, num_query=4, mode="bidirectional")
    with pytest.raises(ValueError, match=r"num_query must be in \[0, L\]"):
        call(q, k, v, num_query=8, mode="bidirectional")
    with pytest.raises(ValueError, match="num_query must be in"):
        call(q, k, v, num_query=-1, mode="bidirectional")
    with pytest.raises(TypeError, match="num_query must be an int"):
        call(q, k, v, num_query=4.0, mode="bidirectional")
    with pytest.raises(ValueError, match="mode must be one of"):
        call(q, k, v, num_query=4, mode="causal")
    with pytest.raises(ValueError, match="only the text rows"):
        call(q[:, :, :5], k, v, num_query=4, mode="multimodal_causal")
    with pytest.raises(ValueError, match=r"text_mask must have shape \(batch, 3\)"):
        call(q, k, v, num_query=4, mode="bidirectional", text_mask=torch.ones(2, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match="text_mask must be 2-D"):
        call(q, k, v, num_query=4, mode="bidirectional", text_mask=torch.ones(2, 1, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="text_mask must have dtype"):
        call(q, k, v, num_query=4, mode="bidirectional", text_mask=torch.ones(2, 3))
    with pytest.raises(TypeError, match="share one dtype"):
        call(q, k.half(), v.half(), num_query=4, mode="bidirectional")
    with pytest.raises(TypeError, match="q must have dtype"):
        call(q.int(), k, v, num_query=4, mode="bidirectional")
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        call(q.numpy(), k, v, num_query=4, mode="bidirectional")
    with pytest.raises(TypeError, match="scale"):
        call(q, k, v, num_query=4, mode="bidirectional", scale=float("nan"))
    with pytest.raises(ValueError, match="same device|all inputs must share one device"):
        call(q, k.to("meta"), v.to("meta"), num_query=4, mode="bidirectional")
    with pytest.raises(ValueError, match="text_mask is on meta"):
        call(q, k, v, num_query=4, mode="bidirectional", text_mask=tm.to("meta"))


@pytest.mark.parametrize("backend", ["reference"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["bidirectional", "unimodal", "multimodal_causal"])
def test_reference_backend_cpu_flash_path(backend, dtype, mode):
    """The CPU path (torch's fused flash kernels) against fp64, with a sample whose text is all padding."""
    B, H, nq, T, d = 3, 2, 8, 9, 32
    q, k, v = (torch.randn(B, H, nq + T, d).to(dtype) for _ in range(3))
    text_mask = torch.ones(B, T, dtype=torch.bool)
    text_mask[1, 4:] = False
    text_mask[2] = False                                   # unimodal: sample 2's text rows see no key
    grad = torch.randn(B, H, nq + T, d)

    def run(fn, *ts):
        ts = [t.detach().clone().requires_grad_(True) for t in ts]
        out = fn(*ts, num_query=nq, mode=mode, text_mask=text_mask)
        out.backward(grad.to(out.dtype))
        return [out.detach()] + [t.grad for t in ts]

    ours = run(qformer_attention, q, k, v)
    base = run(ref_attention.qformer_attention, q, k, v)
    exact = run(ref_attention.qformer_attention, q.double(), k.double(), v.double())
    for name, o, b, e in zip(("out", "dq", "dk", "dv"), ours, base, exact):
        assert torch.isfinite(o).all(), name
        assert_close(o, b, e, kind="forward" if name == "out" else "grad", dtype=dtype, name=name)


@pytest.mark.parametrize("mode", ["bidirectional", "unimodal", "multimodal_causal"])
@pytest.mark.parametrize("text_rows_only", [False, True])
def test_eager_cpu_strided_inputs_use_flash(mode, text_rows_only, sdpa_calls):
    """Eager CPU calls on strided views (as the Q-Former passes its projections) run torch's flash kernel with the
    mask as an additive bias; a batch whose text is all padding in unimodal mode (text rows with no key) takes
    the explicit path and returns zeros there. Forward and gradients against the fp64 reference."""
    torch.manual_seed(0)
    B, H, nq, T, d = 3, 2, 5, 7, 16
    lq = T if text_rows_only else nq + T
    q = torch.randn(B, lq, H, d).transpose(1, 2).requires_grad_()
    k, v = (torch.randn(B, nq + T, H, d).transpose(1, 2).requires_grad_() for _ in range(2))
    text = torch.ones(B, T, dtype=torch.long)
    text[1, 4:] = 0
    if mode == "unimodal":
        text[2] = 0                                 # no text key at all: text rows see nothing
    out = qformer_attention(q, k, v, num_query=nq, mode=mode, text_mask=text)
    assert len(sdpa_calls) == (0 if mode == "unimodal" else 1)
    exact = ref_attention.qformer_attention(*(t.double() for t in (q, k, v)), num_query=nq, mode=mode,
                                            text_mask=text)
    torch.testing.assert_close(out.double(), exact, rtol=1e-4, atol=1e-5)
    g = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, (q, k, v), g),
                         torch.autograd.grad(exact, (q, k, v), g.double())):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5)


def test_triton_builds_cover_the_declared_capabilities():
    from vlmkern.ops import attention
    from vlmkern.ops.attention import _triton
    assert _triton.HEAD_DIMS == attention.TRITON.head_dims
    assert {b.constexprs["HEAD_DIM"] for b in _triton._builds() if "HEAD_DIM" in b.constexprs} == set(_triton.HEAD_DIMS)
