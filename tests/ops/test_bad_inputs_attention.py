"""Declared bad-input matrix of the attention, window-attention, patch-embedding and patchify families.

Every row is ``(target, class, build, expect, match)``: ``build()`` makes the call; ``expect`` is the exception
type that must be raised (before any launch) with ``match`` in its message (the argument's name), or
``DOCUMENTED`` when the call must return the documented result, which ``match`` then checks (a callable taking
the result). Each row runs on the default backend and with ``VLMKERN_BACKEND=triton`` (the interpreter here).
``python3 tests/ops/test_bad_inputs_attention.py`` prints the number of rows and classes per op and module.

Classes: dtype, rank, shape, zero-size, device, meta (shapes, as torch ops give), non-finite scalar, non-finite
tensor, out-of-range (ids, masks, sizes), int32 (offsets past ``2**31 - 1``, decided from meta shapes and
strides without allocating), keyword.
"""
from __future__ import annotations

import collections
import importlib
import math
from types import SimpleNamespace

import pytest
import torch

from vlmkern import ops
from vlmkern.ops.dispatch import BackendNotSupported
from vlmkern.ops.window_attention import patch_info_mining

# vlmkern.ops re-exports the functions under the modules' names: take the modules themselves
attn_ops = importlib.import_module("vlmkern.ops.attention")
pe_ops = importlib.import_module("vlmkern.ops.patch_embed")
wa_ops = importlib.import_module("vlmkern.ops.window_attention")

DOCUMENTED = "documented"
F64 = "float64"   # documented result on the default backend; forced Triton refuses, naming float64
META = torch.device("meta")
BIG = 2 ** 31


# ------------------------------------------------------------------------------------------ helpers
def _qkv(B=2, H=2, L=5, d=32, **kw):
    return [torch.randn(B, H, L, d, **kw) for _ in range(3)]


def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, device=META, dtype=dtype)


def _huge_rows(d=32):
    """(1, 1, 2**26 + 1, 32) meta q: one (b, h) slice spans 2**31 + 32 elements."""
    return _meta(1, 1, 2 ** 26 + 1, d)


def _shape(*shape):
    return lambda out: tuple(out.shape) == shape and out.device.type == "meta"


def _meta_backward(fn, *tensors):
    """Forward and backward on meta tensors: outputs and gradients keep their shapes."""
    leaves = [t.requires_grad_(True) for t in tensors]
    out = fn(*leaves)
    out.sum().backward()
    return all(t.grad is not None and t.grad.shape == t.shape and t.grad.is_meta for t in leaves) and out.is_meta


def _reasons_mention(dispatch, needle, *args):
    return lambda: any(needle in r for r in dispatch.backends["triton"](*args))


def _rows_isolated(out, ref, bad_rows):
    """Non-finite input in ``bad_rows`` (a boolean index over dim -2) leaves every other row as without it."""
    good = ~bad_rows
    return bool(torch.isfinite(out[..., good, :]).all()) and torch.allclose(out[..., good, :], ref[..., good, :],
                                                                             atol=1e-5, rtol=1e-5)


def _nonfinite_q_row(fn):
    q, k, v = _qkv()
    ref = fn(q, k, v)
    q = q.clone()
    q[:, :, 1] = float("inf")
    bad = torch.zeros(q.shape[2], dtype=torch.bool)
    bad[1] = True
    return _rows_isolated(fn(q, k, v), ref, bad)


def _qf(q, k, v, **kw):
    return ops.qformer_attention(q, k, v, **{"num_query": 2, "mode": "unimodal", **kw})


def _xa(q, k, v, **kw):
    return ops.cross_attention(q, k, v, **kw)


# ---------------------------------------------------------------------------------------- attention
def _attention_rows(name, fn, mask_kw, mask_len):
    """Rows shared by ``qformer_attention`` (``fn`` = ``_qf``) and ``cross_attention`` (``_xa``)."""
    dispatch = attn_ops.QFORMER_ATTENTION if name == "qformer_attention" else attn_ops.CROSS_ATTENTION
    bool_mask = lambda: torch.ones(2, mask_len, dtype=torch.bool)  # noqa: E731
    return [
        (name, "dtype", lambda: fn(*_qkv()[:2], _qkv()[2].half()), TypeError, "q, k and v must share one dtype"),
        (name, "dtype", lambda: fn(*[t.int() for t in _qkv()]), TypeError, "q must have dtype"),
        (name, "dtype", lambda: fn(*_qkv(), **{mask_kw: torch.ones(2, mask_len)}), TypeError, f"{mask_kw} must have dtype"),
        (name, "dtype", lambda: fn(*_qkv(dtype=torch.float64)), F64,
         lambda out: out.dtype == torch.float64),
        (name, "rank", lambda: fn(torch.randn(2, 5, 32), *_qkv()[1:]), ValueError, "q must be 4-D"),
        (name, "rank", lambda: fn(*_qkv(), **{mask_kw: torch.ones(2, 1, mask_len, dtype=torch.bool)}), ValueError,
         f"{mask_kw} must be 2-D"),
        (name, "shape", lambda: fn(torch.randn(2, 5, 2, 32), *_qkv()[1:]), ValueError, "(B, H, L, d)"),
        (name, "shape", lambda: fn(*_qkv()[:2], torch.randn(2, 2, 4, 32)), ValueError, "k and v must have the same"),
        (name, "shape", lambda: fn(*_qkv(), **{mask_kw: torch.ones(3, mask_len, dtype=torch.bool)}), ValueError,
         f"{mask_kw} must have shape"),
        (name, "zero-size", lambda: fn(*_qkv(d=0)), DOCUMENTED, lambda out: tuple(out.shape) == (2, 2, 5, 0)),
        (name, "zero-size", lambda: fn(*_qkv(B=0)), DOCUMENTED, lambda out: tuple(out.shape) == (0, 2, 5, 32)),
        (name, "device", lambda: fn(*_qkv()[:2], _meta(2, 2, 5, 32)), ValueError, "v is on meta"),
        (name, "device", lambda: fn(*_qkv(), **{mask_kw: bool_mask().to(META)}), ValueError, f"{mask_kw} is on meta"),
        (name, "meta", lambda: fn(*[_meta(2, 2, 5, 32) for _ in range(3)],
                                  **{mask_kw: bool_mask().to(META)}), DOCUMENTED, _shape(2, 2, 5, 32)),
        (name, "meta", lambda: _meta_backward(fn, *[_meta(2, 2, 5, 32) for _ in range(3)]), DOCUMENTED, bool),
        (name, "non-finite scalar", lambda: fn(*_qkv(), scale=float("nan")), TypeError, "scale"),
        (name, "non-finite scalar", lambda: fn(*_qkv(), scale=float("inf")), TypeError, "scale"),
        (name, "non-finite tensor", lambda: _nonfinite_q_row(fn), DOCUMENTED, bool),
        (name, "out-of-range", lambda: _any_nonzero_is_real(fn, mask_kw, mask_len), DOCUMENTED, bool),
        (name, "int32", _reasons_mention(dispatch, "int32", _huge_rows(), _meta(1, 1, 8, 32), _meta(1, 1, 8, 32)),
         DOCUMENTED, bool),
        (name, "int32", _reasons_mention(dispatch, "int32", _meta(1, 1, 8, 32),
                                         _meta(1, 1, 8, 32).as_strided((1, 1, 8, 32), (0, 0, BIG // 4, 1)),
                                         _meta(1, 1, 8, 32)), DOCUMENTED, bool),
        (name, "int32", _reasons_mention(dispatch, "result or gradients", _meta(1, 1, 1, 32).expand(1, 1, 2 ** 26 + 1, 32),
                                         *[_meta(1, 1, 1, 32).expand(1, 1, 2 ** 26 + 1, 32)] * 2), DOCUMENTED, bool),
        (name, "int32", lambda: fn(_huge_rows(), *[_meta(1, 1, 2 ** 26 + 1, 32)] * 2), DOCUMENTED,
         _shape(1, 1, 2 ** 26 + 1, 32)),
        # B * H is the grid's second axis, which CUDA caps at 65535: more goes to the reference (a named reason;
        # meta tensors: the result's shape, no values)
        (name, "grid", lambda: not _reasons_mention(dispatch, "grid axis", *[_meta(2047, 32, 8, 32)] * 3)(),
         DOCUMENTED, bool),
        (name, "grid", _reasons_mention(dispatch, "grid axis", *[_meta(5462, 12, 8, 32)] * 3), DOCUMENTED, bool),
        (name, "grid", lambda: fn(*[_meta(5462, 12, 8, 32)] * 3), DOCUMENTED, _shape(5462, 12, 8, 32)),
        (name, "keyword", lambda: fn(*_qkv(), attn_mask=bool_mask()), TypeError, "attn_mask"),
    ]


def _any_nonzero_is_real(fn, mask_kw, mask_len):
    """Mask values other than 0/1 (7, -1): nonzero = real key, as documented."""
    qkv = _qkv()
    mask = torch.tensor([[1] * mask_len, [0] + [1] * (mask_len - 1)])
    odd = mask * torch.tensor([7, -1])[:, None]
    return torch.equal(fn(*qkv, **{mask_kw: odd}), fn(*qkv, **{mask_kw: mask.bool()}))


def _qformer_only_rows():
    n = "qformer_attention"
    return [
        (n, "out-of-range", lambda: _qf(*_qkv(), num_query=6), ValueError, "num_query"),
        (n, "out-of-range", lambda: _qf(*_qkv(), num_query=-1), ValueError, "num_query"),
        (n, "out-of-range", lambda: _qf(*_qkv(), mode="causal"), ValueError, "mode"),
        (n, "shape", lambda: _qf(torch.randn(2, 2, 4, 32), *_qkv()[1:]), ValueError, "Lq"),
        (n, "dtype", lambda: _qf(*_qkv(), num_query=2.0), TypeError, "num_query"),
        (n, "keyword", lambda: ops.qformer_attention(*_qkv(), num_query=2), TypeError, "mode"),
    ]


# ------------------------------------------------------------------------------------ window attention
def _wa_inputs(B=1, N=4, C=8, side=4, **kw):
    return torch.randn(B, N, C, **kw), torch.randn(B, C, side, side, **kw)


def _wa_nonfinite():
    u, h = _wa_inputs()
    ref, _ = ops.window_attention(u, h)
    u = u.clone()
    u[0, 1, 3] = float("inf")
    s, p = ops.window_attention(u, h)
    bad = torch.zeros(4, dtype=torch.bool)
    bad[1] = True
    return bool(torch.isfinite(p).all()) and _rows_isolated(s, ref, bad)


def _window_rows():
    n = "window_attention"
    wa = ops.window_attention
    return [
        (n, "dtype", lambda: wa(torch.zeros(1, 4, 8, dtype=torch.int32), torch.zeros(1, 8, 4, 4)), TypeError, "u must"),
        (n, "dtype", lambda: wa(*_wa_inputs(dtype=torch.float64)), F64, lambda r: r[0].dtype == torch.float64),
        (n, "rank", lambda: wa(torch.zeros(4, 8), torch.zeros(1, 8, 4, 4)), ValueError, "u must be 3-D"),
        (n, "rank", lambda: wa(torch.zeros(1, 4, 8), torch.zeros(8, 4, 4)), ValueError, "images_aux must be 4-D"),
        (n, "shape", lambda: wa(torch.zeros(1, 4, 8), torch.zeros(1, 6, 4, 4)), ValueError, "images_aux has 6 channels"),
        (n, "shape", lambda: wa(torch.zeros(1, 4, 8), torch.zeros(2, 8, 4, 4)), ValueError, "batch"),
        (n, "zero-size", lambda: wa(torch.zeros(1, 4, 0), torch.zeros(1, 0, 4, 4)), ValueError, "at least one channel"),
        (n, "zero-size", lambda: wa(*_wa_inputs(B=0)), DOCUMENTED, lambda r: tuple(r[0].shape) == (0, 4, 8)),
        (n, "device", lambda: wa(torch.zeros(1, 4, 8), _meta(1, 8, 4, 4)), ValueError, "images_aux is on meta"),
        (n, "meta", lambda: wa(_meta(2, 4, 8), _meta(2, 8, 6, 6)), DOCUMENTED,
         lambda r: tuple(r[0].shape) == (2, 4, 8) and tuple(r[1].shape) == (2, 4, 9) and r[0].is_meta),
        (n, "meta", lambda: _meta_backward(lambda u, h: wa(u, h)[0], _meta(2, 4, 8), _meta(2, 8, 6, 6)),
         DOCUMENTED, bool),
        (n, "non-finite scalar", lambda: wa(*_wa_inputs(), eps=float("nan")), TypeError, "eps"),
        (n, "non-finite scalar", lambda: wa(*_wa_inputs(), eps=-1e-5), ValueError, "eps"),
        (n, "non-finite tensor", _wa_nonfinite, DOCUMENTED, bool),
        (n, "out-of-range", lambda: wa(torch.zeros(1, 5, 8), torch.zeros(1, 8, 4, 4)), ValueError, "perfect square"),
        (n, "out-of-range", lambda: wa(torch.zeros(1, 4, 8), torch.zeros(1, 8, 5, 5)), ValueError, "divisible"),
        (n, "int32", _reasons_mention(wa_ops.WINDOW_ATTENTION, "int32", _meta(1, 4, 8),
                                      _meta(1, 8, 2 ** 14, 2 ** 14)), DOCUMENTED, bool),
        (n, "int32", lambda: wa(_meta(1, 4, 8), _meta(1, 8, 2 ** 14, 2 ** 14))[0], DOCUMENTED, _shape(1, 4, 8)),
        (n, "grid", _reasons_mention(wa_ops.WINDOW_ATTENTION, "grid axis", _meta(65536, 4, 8), _meta(65536, 8, 4, 4)),
         DOCUMENTED, bool),
        (n, "keyword", lambda: wa(*_wa_inputs(), epsilon=1e-5), TypeError, "epsilon"),
    ]


# ------------------------------------------------------------------------------------ patch info mining
def _proj(c_in, c_out, device="cpu", dtype=torch.float32):
    return tuple(t.to(device, dtype) for t in (1 + 0.1 * torch.randn(c_in), 0.1 * torch.randn(c_in),
                                                torch.randn(c_out, c_in) / math.sqrt(c_in), 0.1 * torch.randn(c_out)))


def _pim_args(C=8, C_aux=6, side=4, device="cpu", dtype=torch.float32):
    images = torch.randn(1, 4, C).to(device, dtype)
    aux = torch.randn(1, C_aux, side, side).to(device, dtype)
    return images, aux, _proj(C, C, device, dtype), _proj(C_aux, C, device, dtype), _proj(C_aux, C, device, dtype)


def _with(params, i, value):
    return tuple(value if j == i else t for j, t in enumerate(params))


def _pim_inf_key_bias():
    """An infinite key bias: the original (nan_to_num before its softmax) stays finite; so must we."""
    from vlmkern.reference.window_attention import patch_info_mining as original
    images, aux, q, k, v = _pim_args()
    k = _with(k, 3, torch.full((8,), float("inf")))
    ref = original(images.double(), aux.double(), *[tuple(t.double() for t in p) for p in (q, k, v)])
    out = patch_info_mining(images, aux, q, k, v)
    return bool(torch.isfinite(ref).all()) and torch.allclose(out.double(), ref, atol=1e-4, rtol=1e-4)


def _pim_rows():
    n = "patch_info_mining"
    pim = patch_info_mining
    return [
        (n, "dtype", lambda: pim(*_pim_args()[:2], *[_with(p, 2, p[2].half()) if i == 1 else p
                                                     for i, p in enumerate(_pim_args()[2:])]), TypeError,
         "key_params weight has dtype"),
        (n, "dtype", lambda: pim(_pim_args()[0].int(), *_pim_args()[1:]), TypeError, "images must have dtype"),
        (n, "dtype", lambda: pim(*_pim_args(dtype=torch.float64)), F64, lambda r: r.dtype == torch.float64),
        (n, "rank", lambda: pim(torch.zeros(4, 8), *_pim_args()[1:]), ValueError, "images must be 3-D"),
        (n, "shape", lambda: pim(*_pim_args()[:3], _with(_pim_args()[3], 2, torch.zeros(8, 5)), _pim_args()[4]),
         ValueError, "key_params weight must have shape"),
        (n, "shape", lambda: pim(*_pim_args()[:4], _pim_args()[3][:3]), TypeError, "value_params must be"),
        (n, "zero-size", lambda: pim(*_pim_args()[:2], _with(_with(_pim_args()[2], 2, torch.zeros(0, 8)), 3,
                                                             torch.zeros(0)), *_pim_args()[3:]), ValueError,
         "at least one output feature"),
        (n, "device", lambda: pim(*_pim_args()[:3], _with(_pim_args()[3], 2, _meta(8, 6)), _pim_args()[4]),
         ValueError, "key_params weight is on meta"),
        (n, "meta", lambda: pim(*_pim_args(device="meta")), DOCUMENTED, _shape(1, 4, 8)),
        (n, "non-finite scalar", lambda: pim(*_pim_args(), eps=(1e-5, float("nan"), float("nan"))), TypeError,
         "eps[1]"),
        (n, "non-finite scalar", lambda: pim(*_pim_args(), eps=(-1.0, 1e-5, 1e-5)), ValueError, "eps[0]"),
        (n, "non-finite tensor", _pim_inf_key_bias, DOCUMENTED, bool),
        (n, "out-of-range", lambda: pim(*_pim_args(), eps=(1e-5, 1e-5)), TypeError, "eps must be a tuple of 3"),
        (n, "out-of-range", lambda: pim(*_pim_args(), eps=(1e-5, 1e-5, 1e-6)), ValueError, "eps"),
        (n, "out-of-range", lambda: pim(torch.zeros(1, 5, 8), *_pim_args()[1:]), ValueError, "images must hold a number"),
        (n, "int32", lambda: pim(*_pim_args(device="meta")[:1], _meta(1, 6, 2 ** 15, 2 ** 15),
                                 *_pim_args(device="meta")[2:]), DOCUMENTED, _shape(1, 4, 8)),
        (n, "keyword", lambda: pim(*_pim_args(), eps_k=1e-5), TypeError, "eps_k"),
    ]


# ---------------------------------------------------------------------------------- patch embed / patchify
def _px(B=1, C=3, H=8, W=8, dtype=torch.uint8, device="cpu"):
    if device == "meta":
        return _meta(B, C, H, W, dtype=dtype)
    return torch.randint(0, 256, (B, C, H, W)).to(dtype)


def _w(C=3, p=4, out=8, **kw):
    return torch.randn(out, C * p * p, **kw) * 0.05


def _pe(px=None, w=None, **kw):
    return ops.patch_embed(_px() if px is None else px, _w() if w is None else w, **{"patch_size": 4, **kw})


def _pe_nonfinite():
    px, w = _px(dtype=torch.float32), _w()
    ref = _pe(px, w)
    px[0, 0, 0, 0] = float("inf")                      # only patch 0 of 4 sees it
    bad = torch.tensor([True, False, False, False])
    out = _pe(px, w)
    return bool((~torch.isfinite(out[0, 0])).any()) and _rows_isolated(out, ref, bad)


def _pe_rows():
    n = "patch_embed"
    return [
        (n, "dtype", lambda: _pe(_px(dtype=torch.int32)), TypeError, "pixels must have dtype"),
        (n, "dtype", lambda: _pe(w=_w().int()), TypeError, "weight must have dtype"),
        (n, "dtype", lambda: _pe(w=_w(dtype=torch.float64)), F64, lambda r: r.dtype == torch.float64),
        (n, "dtype", lambda: ops.patch_embed(_px(), _w(), torch.zeros(8, dtype=torch.float16), patch_size=4),
         TypeError, "bias dtype"),
        (n, "rank", lambda: _pe(_px()[0]), ValueError, "pixels must be 4-D"),
        (n, "rank", lambda: _pe(w=_w()[0]), ValueError, "weight must be 2-D"),
        (n, "shape", lambda: _pe(w=_w(C=4)), ValueError, "weight must have C*patch_size**2 = 48 columns"),
        (n, "shape", lambda: ops.patch_embed(_px(), _w(), torch.zeros(7), patch_size=4), ValueError, "bias must have"),
        (n, "zero-size", lambda: _pe(_px(B=0)), DOCUMENTED, lambda r: tuple(r.shape) == (0, 4, 8)),   # nn.Linear's
        (n, "zero-size", lambda: _pe(w=_w(out=0)), DOCUMENTED, lambda r: tuple(r.shape) == (1, 4, 0)),
        (n, "device", lambda: _pe(w=_w().to(META)), ValueError, "weight is on meta"),
        (n, "meta", lambda: _pe(_px(device="meta"), _w().to(META)), DOCUMENTED, _shape(1, 4, 8)),
        (n, "meta", lambda: _meta_backward(lambda px, w: _pe(px, w), _px(dtype=torch.float32, device="meta"),
                                           _w().to(META)), DOCUMENTED, bool),
        (n, "non-finite scalar", lambda: _pe(rescale=float("nan")), TypeError, "rescale"),
        (n, "non-finite scalar", lambda: _pe(pad_value=float("inf")), TypeError, "pad_value"),
        (n, "non-finite scalar", lambda: _pe(mean=float("nan")), ValueError, "mean must be finite"),
        (n, "non-finite scalar", lambda: _pe(std=0.0), ValueError, "std must be non-zero"),
        (n, "non-finite tensor", _pe_nonfinite, DOCUMENTED, bool),
        (n, "out-of-range", lambda: _pe(patch_size=0), ValueError, "patch_size"),
        (n, "out-of-range", lambda: _pe(mean=[0.5, 0.5]), ValueError, "mean must be a float or a sequence of 3"),
        (n, "int32", _reasons_mention(pe_ops.PATCH_EMBED, "int32", _px(1, 3, 2 ** 15, 2 ** 15, device="meta"),
                                      _w().to(META)), DOCUMENTED, bool),
        (n, "int32", lambda: _pe(_px(1, 3, 2 ** 15, 2 ** 15, device="meta"), _w().to(META)), DOCUMENTED,
         _shape(1, 2 ** 26, 8)),
        (n, "keyword", lambda: _pe(patch=4), TypeError, "patch"),
    ]


def _pf(px=None, **kw):
    return ops.patchify(_px() if px is None else px, **{"patch_size": 4, **kw})


def _pf_nonfinite():
    px = _px(dtype=torch.float32)
    ref = _pf(px)
    px[0, 0, 0, 0] = float("nan")
    bad = torch.tensor([True, False, False, False])
    return _rows_isolated(_pf(px), ref, bad)


def _pf_rows():
    n = "patchify"
    return [
        (n, "dtype", lambda: _pf(_px(dtype=torch.int64)), TypeError, "pixels must have dtype"),
        (n, "dtype", lambda: _pf(out_dtype=torch.int32), TypeError, "out_dtype"),
        (n, "dtype", lambda: _pf(_px(dtype=torch.float64), out_dtype=torch.float64), DOCUMENTED,
         lambda r: r.dtype == torch.float64),
        (n, "rank", lambda: _pf(_px()[0]), ValueError, "pixels must be 4-D"),
        (n, "shape", lambda: _pf(std=[0.5, 0.5]), ValueError, "std must be a float or a sequence of 3"),
        (n, "zero-size", lambda: _pf(_px(W=0)), ValueError, "non-empty image"),
        (n, "zero-size", lambda: _pf(_px(C=0)), ValueError, "at least one channel"),
        (n, "device", lambda: _pf(mean=torch.full((3,), 0.5, device=META)), ValueError, "mean"),
        (n, "meta", lambda: _pf(_px(device="meta")), DOCUMENTED, _shape(1, 4, 48)),
        (n, "non-finite scalar", lambda: _pf(rescale=float("inf")), TypeError, "rescale"),
        (n, "non-finite scalar", lambda: _pf(pad_value=float("nan")), TypeError, "pad_value"),
        (n, "non-finite tensor", _pf_nonfinite, DOCUMENTED, bool),
        (n, "out-of-range", lambda: _pf(patch_size=-2), ValueError, "patch_size"),
        (n, "out-of-range", lambda: _pf(patch_size=True), ValueError, "patch_size"),
        # The C++/CUDA kernels and the reference index in 64 bits: a huge image only has to give its shape.
        (n, "int32", lambda: _pf(_px(1, 3, 2 ** 15, 2 ** 15, device="meta")), DOCUMENTED, _shape(1, 2 ** 26, 48)),
        (n, "keyword", lambda: _pf(dtype=torch.float16), TypeError, "dtype"),
    ]


OP_ROWS = (_attention_rows("qformer_attention", _qf, "text_mask", 3) + _qformer_only_rows()
           + _attention_rows("cross_attention", _xa, "key_padding_mask", 5)
           + _window_rows() + _pim_rows() + _pe_rows() + _pf_rows())


def _ids(rows):
    seen = collections.Counter()
    out = []
    for target, cls, *_ in rows:
        seen[(target, cls)] += 1
        out.append(f"{target}-{cls}-{seen[(target, cls)]}")
    return out


def run_row(build, expect, match, backend="auto"):
    if expect == F64 and backend == "triton":
        expect, match = BackendNotSupported, "float64 is not supported by the kernels"
    if expect in (DOCUMENTED, F64):
        result = build()
        assert match(result), "the documented result was not returned"
        return
    with pytest.raises(expect) as info:
        build()
    assert match in str(info.value), f"{str(info.value)!r} does not name {match!r}"


@pytest.mark.parametrize("backend", ["auto", "triton"], indirect=True)
@pytest.mark.parametrize("target,cls,build,expect,match", OP_ROWS, ids=_ids(OP_ROWS))
def test_op_bad_input(backend, target, cls, build, expect, match):
    if target == "patchify" and backend == "triton":
        pytest.skip("patchify has no Triton backend (the default run covers its C++ and reference backends)")
    run_row(build, expect, match, backend)


def counts(rows) -> dict[str, tuple[int, int]]:
    """Per target: (rows, distinct classes)."""
    by = collections.defaultdict(list)
    for target, cls, *_ in rows:
        by[target].append(cls)
    return {t: (len(c), len(set(c))) for t, c in by.items()}


def test_every_op_has_ten_classes():
    for target, (_, classes) in counts(OP_ROWS).items():
        assert classes >= 10, f"{target}: {classes} classes"


# ============================================================================================= modules
def _blip2_config():
    from transformers import Blip2QFormerConfig
    cfg = Blip2QFormerConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128,
                             encoder_hidden_size=48, max_position_embeddings=32, vocab_size=100,
                             use_qformer_text_input=True)
    cfg._attn_implementation = "eager"
    return cfg


def _blip2(device="cpu"):
    from vlmkern.models.blip2 import Blip2QFormerModel
    with torch.device(device):
        return Blip2QFormerModel(_blip2_config()).eval()


def _blip2_args(B=3, device="cpu", Lk=17):
    mk = (lambda *s, dtype=torch.float32: _meta(*s, dtype=dtype)) if device == "meta" else \
        (lambda *s, dtype=torch.float32: torch.randn(*s).to(dtype))
    mask = torch.ones(B, 13, dtype=torch.long, device=device)
    return dict(query_embeds=mk(B, 13, 64), query_length=8, attention_mask=mask, encoder_hidden_states=mk(B, Lk, 48))


def _call(model, **kw):
    return model(**kw).last_hidden_state


def _batch_isolated(model_fn, args: dict, key: str):
    """NaN in batch row 1 of ``args[key]`` leaves rows 0 and 2 as they were."""
    ref = model_fn(**args)
    bad = dict(args)
    bad[key] = args[key].clone()
    bad[key][1] = float("nan")
    out = model_fn(**bad)
    keep = torch.tensor([0, 2])
    return bool(torch.isfinite(out[keep]).all()) and torch.allclose(out[keep], ref[keep], atol=1e-5)


def _model_isolated(model, args, key):
    with torch.no_grad():
        return _batch_isolated(lambda **k: _call(model, **k), args, key)


def _blip2_rows():
    n = "Blip2QFormerModel"
    m = lambda: _blip2()  # noqa: E731
    a = _blip2_args
    with_ = lambda **kw: {**a(), **kw}  # noqa: E731
    return [
        (n, "dtype", lambda: _call(m(), **with_(query_embeds=torch.zeros(3, 13, 64, dtype=torch.int32))), TypeError,
         "query_embeds must have dtype"),
        (n, "dtype", lambda: _call(m(), **with_(encoder_batch_index=torch.zeros(3))), TypeError,
         "encoder_batch_index must have dtype"),
        (n, "rank", lambda: _call(m(), **with_(query_embeds=torch.zeros(13, 64))), ValueError, "query_embeds must be 3-D"),
        (n, "shape", lambda: _call(m(), **with_(query_embeds=torch.zeros(3, 13, 63))), ValueError, "hidden_size=64"),
        (n, "shape", lambda: _call(m(), **with_(attention_mask=torch.ones(3, 12))), ValueError, "attention_mask must"),
        (n, "shape", lambda: _call(m(), **with_(encoder_hidden_states=torch.zeros(3, 17, 40))), ValueError,
         "encoder_hidden_size"),
        (n, "zero-size", lambda: _call(m(), **a(B=0)), DOCUMENTED, lambda r: tuple(r.shape) == (0, 13, 64)),
        (n, "device", lambda: _call(m(), **with_(encoder_hidden_states=_meta(3, 17, 48))), ValueError,
         "encoder_hidden_states is on meta"),
        (n, "device", lambda: _call(m(), **with_(attention_mask=torch.ones(3, 13, device=META))), ValueError,
         "attention_mask is on meta"),
        (n, "meta", lambda: _call(_blip2("meta"), **a(device="meta")), DOCUMENTED, _shape(3, 13, 64)),
        (n, "non-finite scalar", lambda: _call(m(), **with_(query_length=float("nan"))), TypeError, "query_length"),
        (n, "non-finite tensor", lambda: _model_isolated(m(), a(), "query_embeds"),
         DOCUMENTED, bool),
        (n, "out-of-range", lambda: _call(m(), **with_(encoder_hidden_states=torch.zeros(2, 17, 48),
                                                       encoder_batch_index=torch.tensor([0, 2, 1]))),
         ValueError, "encoder_batch_index must be in [0, encoder_hidden_states.shape[0] = 2)"),
        (n, "out-of-range", lambda: _call(m(), **with_(query_length=-1)), ValueError, "query_length"),
        (n, "int32", lambda: _call(_blip2("meta"), **a(B=1, device="meta", Lk=2 ** 26 + 1)), DOCUMENTED,
         _shape(1, 13, 64)),
        (n, "keyword", lambda: _call(m(), **with_(encoder_mask=torch.ones(3, 17))), TypeError, "encoder_mask"),
    ]


def _iblip(device="cpu"):
    from transformers import InstructBlipQFormerConfig
    from vlmkern.models.instructblip import InstructBlipQFormerModel
    cfg = InstructBlipQFormerConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=128, encoder_hidden_size=48, max_position_embeddings=32,
                                    vocab_size=100)
    cfg._attn_implementation = "eager"
    with torch.device(device):
        return InstructBlipQFormerModel(cfg).eval()


def _iblip_args(B=3, device="cpu", Lk=17):
    mk = (lambda *s: _meta(*s)) if device == "meta" else (lambda *s: torch.randn(*s))
    ids = _meta(B, 5, dtype=torch.long) if device == "meta" else torch.randint(1, 100, (B, 5))
    return dict(input_ids=ids, attention_mask=torch.ones(B, 13, dtype=torch.long, device=device),
                query_embeds=mk(B, 8, 64), encoder_hidden_states=mk(B, Lk, 48))


def _iblip_rows():
    n = "InstructBlipQFormerModel"
    m = lambda: _iblip()  # noqa: E731
    a = _iblip_args
    with_ = lambda **kw: {**a(), **kw}  # noqa: E731
    return [
        (n, "dtype", lambda: _call(m(), **with_(input_ids=torch.zeros(3, 5))), TypeError, "input_ids must have dtype"),
        (n, "dtype", lambda: _call(m(), **with_(encoder_hidden_states=torch.zeros(3, 17, 48, dtype=torch.int32))),
         TypeError, "encoder_hidden_states must have dtype"),
        (n, "rank", lambda: _call(m(), **with_(input_ids=torch.zeros(3, 5, 1, dtype=torch.long))), ValueError,
         "input_ids must be 2-D"),
        (n, "shape", lambda: _call(m(), **with_(query_embeds=torch.zeros(2, 8, 64))), ValueError, "batch"),
        (n, "shape", lambda: _call(m(), **with_(attention_mask=torch.ones(3, 5))), ValueError, "attention_mask"),
        (n, "zero-size", lambda: _call(m(), **a(B=0)), DOCUMENTED, lambda r: tuple(r.shape) == (0, 13, 64)),
        (n, "device", lambda: _call(m(), **with_(encoder_hidden_states=_meta(3, 17, 48))), ValueError,
         "encoder_hidden_states is on meta"),
        (n, "meta", lambda: _call(_iblip("meta"), **a(device="meta")), DOCUMENTED, _shape(3, 13, 64)),
        (n, "non-finite tensor", lambda: _model_isolated(m(), a(), "encoder_hidden_states"),
         DOCUMENTED, bool),
        (n, "out-of-range", lambda: _call(m(), **with_(input_ids=torch.full((3, 5), 100))), ValueError,
         "input_ids must be in [0, config.vocab_size = 100)"),
        (n, "out-of-range", lambda: _call(m(), **with_(position_ids=torch.arange(30, 35)[None])), ValueError,
         "position_ids must be in [0, config.max_position_embeddings = 32)"),
        (n, "int32", lambda: _call(_iblip("meta"), **a(B=1, device="meta", Lk=2 ** 26 + 1)), DOCUMENTED,
         _shape(1, 13, 64)),
        (n, "keyword", lambda: _call(m(), **with_(text_mask=torch.ones(3, 5))), TypeError, "text_mask"),
        (n, "non-finite scalar", lambda: _call(m(), **{**a(), "input_ids": None, "attention_mask": None,
                                                       "query_embeds": None}), ValueError, "query_embeds"),
    ]


def _resampler(device="cpu"):
    from vlmkern.models.qwen_vl import Resampler
    with torch.device(device):
        return Resampler(2, 64, 2, 32)


def _resampler_isolated():
    r, x = _resampler(), torch.randn(3, 16, 32)
    with torch.no_grad():
        return _batch_isolated(lambda x: r(x), {"x": x}, "x")


def _resampler_rows():
    n = "Resampler"
    r = _resampler
    return [
        (n, "dtype", lambda: r()(torch.zeros(2, 16, 32, dtype=torch.long)), TypeError, "x must be a floating-point"),
        (n, "rank", lambda: r()(torch.zeros(16, 32)), ValueError, "x must be 3-D"),
        (n, "shape", lambda: r()(torch.zeros(2, 16, 31)), ValueError, "kv_dim=32"),
        (n, "zero-size", lambda: r()(torch.zeros(0, 16, 32)), DOCUMENTED, lambda y: tuple(y.shape) == (0, 4, 64)),
        (n, "zero-size", lambda: r()(torch.zeros(2, 0, 32)), ValueError, "square grid"),
        (n, "device", lambda: r()(_meta(2, 16, 32)), ValueError, "x is on meta"),
        (n, "meta", lambda: r("meta")(_meta(2, 16, 32)), DOCUMENTED, _shape(2, 4, 64)),
        (n, "non-finite tensor", _resampler_isolated, DOCUMENTED, bool),
        (n, "out-of-range", lambda: r()(torch.zeros(2, 15, 32)), ValueError, "square grid"),
        (n, "int32", lambda: r("meta")(_meta(1, 2 ** 26, 32)), DOCUMENTED, _shape(1, 4, 64)),
        (n, "keyword", lambda: r()(torch.zeros(2, 16, 32), mask=None), TypeError, "mask"),
    ]


def _mgm(device="cpu"):
    from vlmkern.models.mini_gemini import PatchInfoMining
    with torch.device(device):
        return PatchInfoMining(8, 6)


def _mgm_inputs(device="cpu", side=4):
    if device == "meta":
        return _meta(2, 4, 8), _meta(2, 6, side, side)
    return torch.randn(2, 4, 8), torch.randn(2, 6, side, side)


def _mgm_eps(i, value):
    m = _mgm()
    [m.vlm_uni_query_projector, m.vlm_uni_aux_projector, m.vlm_uni_val_projector][i][0].eps = value
    return m(*_mgm_inputs())


def _mgm_inf_key_bias():
    import torch.nn.functional as F
    m = _mgm()
    with torch.no_grad():
        m.vlm_uni_aux_projector[1].bias.fill_(float("inf"))
    images, aux = _mgm_inputs()
    out = m(images, aux)[1]
    # the original: every logit of a row is ±inf or NaN -> one value after nan_to_num -> uniform weights
    v = F.layer_norm(aux.permute(0, 2, 3, 1), (6,), m.vlm_uni_val_projector[0].weight,
                     m.vlm_uni_val_projector[0].bias, 1e-5) @ m.vlm_uni_val_projector[1].weight.T
    v = v + m.vlm_uni_val_projector[1].bias
    uniform = v.reshape(2, 2, 2, 2, 2, 8).mean((2, 4)).reshape(2, 4, 8)
    return bool(torch.isfinite(out).all()) and torch.allclose(out, uniform, atol=1e-5)


def _mgm_rows():
    n = "PatchInfoMining"
    m = _mgm
    x = _mgm_inputs
    return [
        (n, "dtype", lambda: m()(x()[0].int(), x()[1]), TypeError, "images must have dtype"),
        (n, "dtype", lambda: m()(x()[0], x()[1].double()), TypeError, "images_aux dtype"),
        (n, "rank", lambda: m()(x()[0][0], x()[1]), ValueError, "images must be 3-D"),
        (n, "shape", lambda: m()(torch.zeros(2, 4, 7), x()[1]), ValueError, "mm_hidden_size is 8"),
        (n, "zero-size", lambda: m()(torch.zeros(2, 0, 8), torch.zeros(2, 6, 0, 0)), ValueError, "perfect square"),
        (n, "device", lambda: m()(x()[0], _meta(2, 6, 4, 4)), ValueError, "images_aux is on meta"),
        (n, "meta", lambda: m("meta")(*x("meta"))[1], DOCUMENTED, _shape(2, 4, 8)),
        (n, "non-finite scalar", lambda: _mgm_eps(0, float("nan")), TypeError, "eps[0]"),
        (n, "non-finite scalar", lambda: _mgm_eps(1, -1.0), ValueError, "eps"),
        (n, "non-finite tensor", _mgm_inf_key_bias, DOCUMENTED, bool),
        (n, "out-of-range", lambda: _mgm_eps(2, 1e-3), ValueError, "eps"),
        (n, "out-of-range", lambda: m()(x()[0], torch.zeros(2, 6, 5, 5)), ValueError, "divisible"),
        (n, "int32", lambda: m("meta")(_meta(1, 4, 8), _meta(1, 6, 2 ** 15, 2 ** 15))[1], DOCUMENTED,
         _shape(1, 4, 8)),
        (n, "keyword", lambda: m()(images=x()[0], aux=x()[1]), TypeError, "aux"),
    ]


def _cog(device="cpu"):
    from vlmkern.models.cogagent import CrossAttention
    cfg = SimpleNamespace(hidden_size=64, cross_hidden_size=64, cross_compute_hidden_size=64,
                          num_attention_heads=2, max_position_embeddings=2048)
    with torch.device(device):
        return CrossAttention(cfg)


def _cog_in(B=3, Lq=5, Lk=7, device="cpu"):
    if device == "meta":
        return _meta(B, Lq, 64), _meta(B, Lk, 64)
    return torch.randn(B, Lq, 64), torch.randn(B, Lk, 64)


def _cog_isolated():
    c = _cog()
    h, e = _cog_in()
    with torch.no_grad():
        return _batch_isolated(lambda h, e: c(h, e)[0], {"h": h, "e": e}, "e")


def _cog_rows():
    n = "CogAgent CrossAttention"
    c = _cog
    x = _cog_in
    return [
        (n, "dtype", lambda: c()(x()[0].long(), x()[1]), TypeError, "hidden_states must be a floating-point"),
        (n, "dtype", lambda: c()(x()[0], x()[1].long()), TypeError, "encoder_outputs must be a floating-point"),
        (n, "rank", lambda: c()(x()[0][0], x()[1]), ValueError, "hidden_states must be a 3-D"),
        (n, "shape", lambda: c()(x()[0], torch.zeros(3, 7, 63)), ValueError, "cross_hidden_size is 64"),
        (n, "shape", lambda: c()(x()[0], torch.zeros(2, 7, 64)), ValueError, "encoder_outputs has batch 2"),
        (n, "zero-size", lambda: c()(*x(Lq=0))[0], DOCUMENTED, lambda y: tuple(y.shape) == (3, 0, 64)),
        (n, "device", lambda: c()(x()[0], _meta(3, 7, 64)), ValueError, "encoder_outputs is on meta"),
        (n, "meta", lambda: c("meta")(*x(device="meta"), attention_mask=_meta(3, 1, 1, 1))[0], DOCUMENTED,
         _shape(3, 5, 64)),
        (n, "non-finite tensor", _cog_isolated, DOCUMENTED, bool),
        (n, "out-of-range", lambda: c()(x()[0], past_key_value=(torch.zeros(3, 2, 7, 16),) * 2), ValueError,
         "past_key_value key_states"),
        (n, "out-of-range", lambda: c()(x()[0]), ValueError, "encoder_outputs is required"),
        (n, "int32", lambda: c("meta")(*x(B=1, Lk=2 ** 26 + 1, device="meta"))[0], DOCUMENTED, _shape(1, 5, 64)),
        (n, "keyword", lambda: c()(*x(), mask=None), TypeError, "mask"),
    ]


def _pel(device="cpu"):
    from vlmkern.nn.patch_embed import PatchEmbedLinear
    with torch.device(device):
        return PatchEmbedLinear(48, 8)


def _pel_isolated():
    lin, px = _pel(), _px(dtype=torch.float32)
    with torch.no_grad():
        ref = lin.forward_images(px)
        px[0, 0, 0, 0] = float("inf")
        return _rows_isolated(lin.forward_images(px), ref, torch.tensor([True, False, False, False]))


def _pel_rows():
    n = "PatchEmbedLinear"
    f = lambda px, device="cpu", **kw: _pel(device).forward_images(px, **kw)  # noqa: E731
    return [
        (n, "dtype", lambda: f(_px(dtype=torch.int32)), TypeError, "pixels must have dtype"),
        (n, "dtype", lambda: _pel()(torch.zeros(2, 4, 48, dtype=torch.long)), TypeError, "patches must be a floating"),
        (n, "rank", lambda: f(_px()[0, 0]), ValueError, "pixels must be (B, C, H, W) or (C, H, W)"),
        (n, "shape", lambda: f(_px(C=4)), ValueError, "pixels has C=4 channels"),
        (n, "shape", lambda: _pel()(torch.zeros(2, 4, 47)), ValueError, "in_features=48"),
        (n, "zero-size", lambda: f(_px(B=0)), DOCUMENTED, lambda r: tuple(r.shape) == (0, 4, 8)),   # nn.Linear's
        (n, "zero-size", lambda: f(_px(W=0)), ValueError, "non-empty images"),
        (n, "device", lambda: f(_px(device="meta")), ValueError, "is on"),
        (n, "meta", lambda: f(_px(device="meta"), "meta"), DOCUMENTED, _shape(1, 4, 8)),
        (n, "non-finite scalar", lambda: f(_px(), rescale=float("nan")), TypeError, "rescale"),
        (n, "non-finite tensor", _pel_isolated, DOCUMENTED, bool),
        (n, "out-of-range", lambda: f(_px(), patch_size=0), ValueError, "patch_size"),
        (n, "int32", lambda: f(_px(1, 3, 2 ** 15, 2 ** 15, device="meta"), "meta"), DOCUMENTED, _shape(1, 2 ** 26, 8)),
        (n, "keyword", lambda: f(_px(), patch=4), TypeError, "patch"),
    ]


def _fuyu(device="cpu", **kw):
    from vlmkern.models.fuyu import FuyuImageEmbedder
    with torch.device(device):
        return FuyuImageEmbedder(8, **{"patch_size": 4, "max_size": None, **kw})


def _fuyu_isolated():
    emb, px = _fuyu(), _px(dtype=torch.float32)
    with torch.no_grad():
        ref = emb(px).embeddings
        px[0, 0, 0, 0] = float("inf")
        out = emb(px).embeddings
    return _rows_isolated(out[None], ref[None], torch.tensor([True, False, False, False]))


def _fuyu_rows():
    n = "FuyuImageEmbedder"
    e = _fuyu
    return [
        (n, "dtype", lambda: e()(_px(dtype=torch.int32)), TypeError, "images must have dtype"),
        (n, "rank", lambda: e()(_px()[0, 0]), ValueError, "images must be (C, H, W) or (B, C, H, W)"),
        (n, "shape", lambda: e()(_px(C=4)), ValueError, "num_channels=3"),
        (n, "shape", lambda: e()([_px()[0], _px()]), ValueError, "images[1] must be one (C, H, W) image"),
        (n, "zero-size", lambda: e()([]), ValueError, "at least one image"),
        (n, "zero-size", lambda: e()(_px(H=0)), ValueError, "non-empty"),
        (n, "device", lambda: e()(_px(device="meta")), ValueError, "is on"),
        (n, "meta", lambda: e("meta")(_px(device="meta")).embeddings, DOCUMENTED, _shape(4, 8)),
        (n, "non-finite scalar", lambda: e(max_size=(float("nan"), 10)), ValueError, "max_size"),
        (n, "non-finite tensor", _fuyu_isolated, DOCUMENTED, bool),
        (n, "out-of-range", lambda: e(patch_size=0), ValueError, "patch_size"),
        (n, "out-of-range", lambda: e(resize_method="bicubic"), ValueError, "resize_method"),
        (n, "int32", lambda: e("meta")(_px(1, 3, 2 ** 15, 2 ** 15, device="meta")).embeddings, DOCUMENTED,
         _shape(2 ** 26, 8)),
        (n, "keyword", lambda: e(patch=4), TypeError, "patch"),
    ]


MODULE_ROWS = (_blip2_rows() + _iblip_rows() + _resampler_rows() + _mgm_rows() + _cog_rows() + _pel_rows()
               + _fuyu_rows())


@pytest.mark.parametrize("backend", ["auto", "triton"], indirect=True)
@pytest.mark.parametrize("target,cls,build,expect,match", MODULE_ROWS, ids=_ids(MODULE_ROWS))
def test_module_bad_input(backend, target, cls, build, expect, match):
    pytest.importorskip("transformers")
    run_row(build, expect, match, backend)


def test_every_module_has_ten_classes():
    for target, (_, classes) in counts(MODULE_ROWS).items():
        assert classes >= 10, f"{target}: {classes} classes"


if __name__ == "__main__":
    for title, rows in (("op", OP_ROWS), ("module", MODULE_ROWS)):
        for target, (n_rows, n_classes) in counts(rows).items():
            print(f"{title:6s} {target:26s} rows {n_rows:3d}  classes {n_classes:2d}")
    print(f"total rows {len(OP_ROWS) + len(MODULE_ROWS)} (each runs on 2 backends)")
