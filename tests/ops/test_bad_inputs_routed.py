"""Declared bad-input matrix (issue 11) of the token-routed GEMM, projector and packing ops and their modules.

Every case names an op or module, a class of bad input, a call, and what must happen: ``Raises(type, text)``
(a ValueError / TypeError whose message names the argument, raised before any launch) or ``Gives(check)``
(a documented correct result: meta shapes, ``nn.Linear``'s zero-feature result, the float64 reference, row
isolation of non-finite values). Each case runs on the default backend and with ``VLMKERN_BACKEND=triton``
(under the interpreter without a GPU); float64 there raises ``BackendNotSupported`` naming float64, as every
forced backend does for an input it cannot take.

The image packers (LLaVA-NeXT, 4KHD) and the InternLM2 parts with PLoRA (IXC2) are in the matrix too.

``python3 tests/ops/test_bad_inputs_routed.py`` prints the number of cases and classes per op and module.
"""
from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable

import pytest
import torch

from vlmkern import ops
from vlmkern.models import cogvlm, internlm_xcomposer2 as ixc, internlm_xcomposer2_hd as ixc_hd, llava_next
from vlmkern.nn import MLPProjector, PLoRA
from vlmkern.ops.dispatch import BackendNotSupported
from vlmkern.ops.projector import gather_linear, gather_linear_gelu
from vlmkern.ops.routed_linear import EXPERT_LINEAR, PARTIAL_LORA, cogvlm_expert_ids, expert_linear, partial_lora_linear
from vlmkern.reference import packing as ref_packing, projector as ref_projector, routed_linear as ref
from vlmkern.reference.originals.internlm_xcomposer2 import plora_forward as original_plora

INF, NAN = float("inf"), float("nan")
META = "meta"


@dataclass
class Raises:
    exc: type
    text: str


@dataclass
class Gives:
    check: Callable   # check(result) raises AssertionError when the result is wrong


@dataclass
class Case:
    target: str
    klass: str
    call: Callable
    expect: Raises | Gives
    float64: bool = False   # runs the reference: refused by a forced Triton backend


CASES: list[Case] = []


def case(target, klass, call, expect, float64=False):
    CASES.append(Case(target, klass, call, expect, float64))


def m(*shape, dtype=torch.float32):
    return torch.empty(*shape, device=META, dtype=dtype)


def shape_is(*shape, device=META):
    def check(y):
        assert tuple(y.shape) == shape and y.device.type == device, (tuple(y.shape), y.device)
    return Gives(check)


def close_to(expected_fn):
    def check(y):
        torch.testing.assert_close(y.double(), expected_fn().double(), rtol=1e-5, atol=1e-5, equal_nan=True)
    return Gives(check)


def finite_rows(rows, nan_rows=()):
    """Rows ``rows`` of the (flattened) result are finite, rows ``nan_rows`` are not: row isolation."""
    def check(y):
        y2 = y.reshape(-1, y.shape[-1])
        assert torch.isfinite(y2[list(rows)]).all(), y2
        if nan_rows:
            assert not torch.isfinite(y2[list(nan_rows)]).all(-1).any(), y2
    return Gives(check)


# ----------------------------------------------------------------------------------- partial_lora_linear
def _plora(**over):
    g = torch.Generator().manual_seed(0)
    a = dict(x=torch.randn(2, 3, 8, generator=g), weight=torch.randn(5, 8, generator=g), bias=torch.randn(5, generator=g),
             lora_a=torch.randn(2, 8, generator=g), lora_b=torch.randn(5, 2, generator=g),
             im_mask=torch.tensor([[True, False, True], [False, False, True]]), scaling=2.0)
    a.update(over)
    return a


def _pl(**over):
    return lambda: partial_lora_linear(**_plora(**over))


T = "partial_lora_linear"
case(T, "flag type", lambda: partial_lora_linear(**_plora(), dropout_p=0.5, training="False"),
     Raises(TypeError, "training must be a bool"))
case(T, "dtype", _pl(x=torch.ones(2, 3, 8, dtype=torch.int32)), Raises(TypeError, "x must have dtype"))
case(T, "dtype", _pl(lora_b=torch.randn(5, 2).half()), Raises(TypeError, "lora_b dtype"))
case(T, "dtype", _pl(im_mask=torch.ones(2, 3)), Raises(TypeError, "im_mask must have dtype bool"))
case(T, "float64", lambda: partial_lora_linear(**{k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v
                                                for k, v in _plora().items()}),
     close_to(lambda: ref.partial_lora_linear(**{k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v
                                                 for k, v in _plora().items()})), float64=True)
case(T, "rank", _pl(x=torch.tensor(1.0)), Raises(ValueError, "x must have at least 1 dimension"))
case(T, "rank", _pl(weight=torch.randn(5, 8, 1)), Raises(ValueError, "weight must be 2-D"))
case(T, "rank", _pl(lora_a=torch.randn(8)), Raises(ValueError, "lora_a must be 2-D"))
case(T, "shape", _pl(x=torch.randn(2, 3, 9)), Raises(ValueError, "in_features=8"))
case(T, "shape", _pl(lora_b=torch.randn(5, 3)), Raises(ValueError, "lora_b must have shape"))
case(T, "shape", _pl(bias=torch.randn(6)), Raises(ValueError, "bias must have out_features=5"))
case(T, "shape", _pl(im_mask=torch.ones(2, 4, dtype=torch.bool)), Raises(ValueError, "im_mask must have shape"))
case(T, "zero-size", _pl(lora_a=torch.randn(0, 8), lora_b=torch.randn(5, 0)), Raises(ValueError, "lora_a must have rank"))
case(T, "zero-size", _pl(x=torch.randn(0, 3, 8), im_mask=torch.ones(0, 3, dtype=torch.bool)),
     shape_is(0, 3, 5, device="cpu"))
case(T, "zero-size", _pl(x=torch.randn(2, 3, 0), weight=torch.randn(5, 0), lora_a=torch.randn(2, 0)),
     close_to(lambda: _plora()["bias"].expand(2, 3, 5)))   # in_features=0: the bias, as nn.Linear
case(T, "device", _pl(im_mask=torch.ones(2, 3, dtype=torch.bool, device=META)), Raises(ValueError, "im_mask is on meta"))
case(T, "device", _pl(weight=m(5, 8)), Raises(ValueError, "weight is on meta"))
case(T, "meta", lambda: partial_lora_linear(m(2, 3, 8), m(5, 8), m(5), m(2, 8), m(5, 2), m(2, 3, dtype=torch.bool), 2.0),
     shape_is(2, 3, 5))
case(T, "non-finite scalar", _pl(scaling=INF), Raises(ValueError, "scaling must be a finite float"))
case(T, "non-finite scalar", _pl(dropout_p=NAN), Raises(ValueError, "dropout_p must be a float in [0, 1]"))
case(T, "non-finite tensor", _pl(lora_a=torch.full((2, 8), INF)), finite_rows(rows=(1, 3, 4), nan_rows=(0, 2, 5)))
case(T, "non-finite tensor", _pl(lora_b=torch.full((5, 2), NAN)), finite_rows(rows=(1, 3, 4), nan_rows=(0, 2, 5)))
case(T, "out-of-range mask", _pl(im_mask=torch.ones(6, dtype=torch.bool)), Raises(ValueError, "im_mask must have shape"))
case(T, "int32 overflow", lambda: partial_lora_linear(m(2**16, 2**16, 8).transpose(0, 1), m(5, 8), m(5), m(2, 8),
                                                       m(5, 2), m(2**16, 2**16, dtype=torch.bool), 2.0),
     shape_is(2**16, 2**16, 5))
case(T, "int32 overflow", lambda: PARTIAL_LORA.reasons("triton", m(2**30, 8).t().t()[:, :] if False else m(8, 2**28).t(),
                                                       weight=m(5, 8)),
     Gives(lambda why: _assert_reason(why, "x of shape (268435456, 8)")))
case(T, "keyword", lambda: partial_lora_linear(**_plora(), lora_scale=2.0), Raises(TypeError, "lora_scale"))
case(T, "type", _pl(im_mask=[[True] * 3] * 2), Raises(TypeError, "im_mask must be a bool torch.Tensor"))


def _assert_reason(why, text):
    assert any(text in w and "2**31-1" in w for w in why), why


# ------------------------------------------------------------------------------------------ expert_linear
def _expert(**over):
    g = torch.Generator().manual_seed(1)
    a = dict(x=torch.randn(2, 3, 8, generator=g), weights=torch.randn(2, 5, 8, generator=g),
             expert_ids=torch.tensor([[0, 1, 0], [1, 1, 0]]))
    a.update(over)
    return a


def _ex(**over):
    return lambda: expert_linear(**_expert(**over))


def _inf_expert1():
    w = _expert()["weights"].clone()
    w[1, 0, 0] = INF
    return w


T = "expert_linear"
case(T, "dtype", _ex(x=torch.ones(2, 3, 8, dtype=torch.int32)), Raises(TypeError, "x must have dtype"))
case(T, "dtype", _ex(expert_ids=torch.zeros(2, 3)), Raises(TypeError, "expert_ids must have dtype"))
case(T, "dtype", _ex(weights=torch.randn(2, 5, 8).half()), Raises(TypeError, "weights dtype"))
case(T, "float64", lambda: expert_linear(_expert()["x"].double(), _expert()["weights"].double(), _expert()["expert_ids"]),
     close_to(lambda: ref.expert_linear(_expert()["x"].double(), _expert()["weights"].double(), _expert()["expert_ids"])),
     float64=True)
case(T, "rank", _ex(weights=torch.randn(5, 8)), Raises(ValueError, "weights must be 3-D"))
case(T, "rank", _ex(x=torch.tensor(1.0)), Raises(ValueError, "x must have at least 1 dimension"))
case(T, "shape", _ex(x=torch.randn(2, 3, 7)), Raises(ValueError, "in_features=8"))
case(T, "shape", _ex(expert_ids=torch.zeros(3, 2, dtype=torch.long)), Raises(ValueError, "expert_ids must have shape"))
case(T, "shape", _ex(weights=[torch.randn(5, 8), torch.randn(4, 8)]), Raises(ValueError, "weights[1] has shape"))
case(T, "zero-size", _ex(weights=torch.randn(0, 5, 8)), Raises(ValueError, "num_experts=0"))
case(T, "zero-size", _ex(x=torch.randn(2, 3, 0), weights=torch.randn(2, 5, 0)), close_to(lambda: torch.zeros(2, 3, 5)))
case(T, "zero-size", _ex(x=torch.randn(0, 8), expert_ids=torch.zeros(0, dtype=torch.long)), shape_is(0, 5, device="cpu"))
case(T, "device", _ex(expert_ids=torch.zeros(2, 3, dtype=torch.long, device=META)), Raises(ValueError, "expert_ids is on meta"))
case(T, "meta", lambda: expert_linear(m(2, 3, 8), m(2, 5, 8), m(2, 3, dtype=torch.long), validate_ids=True),
     shape_is(2, 3, 5))
case(T, "non-finite tensor", _ex(weights=_inf_expert1(), expert_ids=torch.tensor([[0, 0, 0], [0, 0, 1]])),
     finite_rows(rows=range(5)))                                     # expert 1's inf stays in its row 5
case(T, "out-of-range ids", _ex(expert_ids=torch.tensor([[0, 2, 0], [0, 0, 0]])), Raises(ValueError, "expert_ids must lie in"))
case(T, "out-of-range ids", _ex(expert_ids=torch.tensor([[0, -1, 0], [0, 0, 0]])), Raises(ValueError, "expert_ids must lie in"))
case(T, "out-of-range ids", _ex(expert_ids=torch.tensor([[2**32, 0, 0], [0, 0, 0]])), Raises(ValueError, "expert_ids must lie in"))
case(T, "out-of-range ids", lambda: expert_linear(**_expert(expert_ids=torch.tensor([[2**32, 0, 0], [0, 0, 0]])),
                                                 validate_ids=False),
     finite_rows(rows=range(1, 6), nan_rows=(0,)))                   # documented: NaN row, no wrap onto expert 0
case(T, "int32 overflow", lambda: EXPERT_LINEAR.reasons("triton", m(4, 8), **{f"weights[{i}]": m(2**14, 2**14)
                                                                                for i in range(9)}),
     Gives(lambda why: _assert_reason(why, "stack to more than")))
case(T, "int32 overflow", lambda: expert_linear(m(8, 2**28).t(), m(2, 5, 8), m(2**28, dtype=torch.long)), shape_is(2**28, 5))
case(T, "keyword", lambda: expert_linear(**_expert(), validate=True), Raises(TypeError, "validate"))
case(T, "type", _ex(weights="w"), Raises(TypeError, "weights must be a (num_experts, out, in) tensor"))
case(T, "out-of-range ids", _ex(weights=torch.randn(1, 5, 8), expert_ids=torch.ones(2, 3, dtype=torch.bool)),
     Raises(ValueError, "expert_ids is bool (True = expert 1) but weights hold 1 expert"))
case(T, "flag type", lambda: expert_linear(**_expert(), validate_ids="yes"), Raises(TypeError, "validate_ids must be a bool"))

# -------------------------------------------------------------------------------------- cogvlm_expert_ids
T = "cogvlm_expert_ids"
case(T, "dtype", lambda: cogvlm_expert_ids(torch.zeros(2, 3)), Raises(TypeError, "token_type_ids must have dtype"))
case(T, "rank", lambda: cogvlm_expert_ids(torch.zeros(3, dtype=torch.long)), Raises(ValueError, "token_type_ids must be 2-D"))
case(T, "rank", lambda: cogvlm_expert_ids(torch.zeros(1, 2, 3, dtype=torch.long)), Raises(ValueError, "token_type_ids must be 2-D"))
case(T, "shape", lambda: cogvlm_expert_ids(torch.ones(2, 1, dtype=torch.long)),
     close_to(lambda: torch.zeros(2, 1, dtype=torch.int32)))          # a lone vision token: language expert
case(T, "zero-size", lambda: cogvlm_expert_ids(torch.zeros(0, 4, dtype=torch.long)), shape_is(0, 4, device="cpu"))
case(T, "zero-size", lambda: cogvlm_expert_ids(torch.zeros(2, 0, dtype=torch.long)), shape_is(2, 0, device="cpu"))
case(T, "meta", lambda: cogvlm_expert_ids(m(2, 5, dtype=torch.long)), shape_is(2, 5))
case(T, "out-of-range ids", lambda: cogvlm_expert_ids(torch.tensor([[7, 1, 1, -3]])),
     close_to(lambda: torch.tensor([[0, 1, 0, 0]], dtype=torch.int32)))  # only type 1 is vision (CogVLM)
case(T, "strided", lambda: cogvlm_expert_ids(torch.ones(2, 8, dtype=torch.long)[:, ::2]),
     close_to(lambda: torch.tensor([[1, 1, 1, 0]] * 2, dtype=torch.int32)))
case(T, "type", lambda: cogvlm_expert_ids([[0, 1]]), Raises(TypeError, "token_type_ids must be a torch.Tensor"))
case(T, "keyword", lambda: cogvlm_expert_ids(token_types=torch.zeros(1, 2)), Raises(TypeError, "token_types"))
case(T, "int32 overflow", lambda: cogvlm_expert_ids(m(2**16, 2**16, dtype=torch.long)), shape_is(2**16, 2**16))


# ---------------------------------------------------------------------------------------------- linear_gelu
def _lin(**over):
    g = torch.Generator().manual_seed(2)
    a = dict(x=torch.randn(2, 3, 8, generator=g), weight=torch.randn(5, 8, generator=g), bias=torch.randn(5, generator=g))
    a.update(over)
    return a


def _lg(**over):
    return lambda: ops.linear_gelu(**_lin(**over))


T = "linear_gelu"
case(T, "dtype", _lg(x=torch.ones(2, 3, 8, dtype=torch.int64)), Raises(TypeError, "x must have dtype"))
case(T, "dtype", _lg(weight=torch.randn(5, 8).half()), Raises(TypeError, "weight dtype"))
case(T, "dtype", _lg(bias=torch.randn(5).half()), Raises(TypeError, "bias must have dtype"))
case(T, "float64", lambda: ops.linear_gelu(**{k: v.double() for k, v in _lin().items()}),
     close_to(lambda: ref_projector.linear_gelu(**{k: v.double() for k, v in _lin().items()})), float64=True)
case(T, "rank", _lg(x=torch.tensor(1.0)), Raises(ValueError, "x must have at least 1 dimension"))
case(T, "rank", _lg(weight=torch.randn(8)), Raises(ValueError, "weight must be 2-D"))
case(T, "shape", _lg(x=torch.randn(2, 3, 7)), Raises(ValueError, "weight has in_features=8"))
case(T, "shape", _lg(bias=torch.randn(4)), Raises(ValueError, "bias must have out_features=5"))
case(T, "zero-size", _lg(x=torch.randn(2, 3, 0), weight=torch.randn(5, 0)),
     close_to(lambda: torch.nn.functional.gelu(_lin()["bias"]).expand(2, 3, 5)))
case(T, "zero-size", _lg(x=torch.randn(0, 8)), shape_is(0, 5, device="cpu"))
case(T, "device", _lg(bias=m(5)), Raises(ValueError, "bias is on meta"))
case(T, "meta", lambda: ops.linear_gelu(m(2, 3, 8), m(5, 8), m(5)), shape_is(2, 3, 5))
case(T, "non-finite tensor", _lg(x=torch.tensor([[INF] * 8, [1.0] * 8])), finite_rows(rows=(1,), nan_rows=(0,)))
case(T, "int32 overflow", lambda: ops.linear_gelu(m(8, 2**28).t(), m(5, 8)), shape_is(2**28, 5))
case(T, "keyword", lambda: ops.linear_gelu(**_lin(), approximate="tanh"), Raises(TypeError, "approximate"))
case(T, "type", _lg(weight=[[1.0] * 8] * 5), Raises(TypeError, "weight must be a torch.Tensor"))


# --------------------------------------------------------------------------------- gather_linear(_gelu)
def _gat(**over):
    g = torch.Generator().manual_seed(3)
    a = dict(x=torch.randn(2, 3, 4, generator=g), index=torch.tensor([[0, 5], [6, 1], [-1, 0]]),
             weight=torch.randn(5, 8, generator=g), bias=torch.randn(5, generator=g), extra=torch.randn(1, 4, generator=g),
             fill=torch.randn(5, generator=g))
    a.update(over)
    return a


for T, fn, ref_fn, gelu in (("gather_linear", gather_linear, ref_packing.gather_linear, False),
                            ("gather_linear_gelu", gather_linear_gelu, ref_packing.gather_linear_gelu, True)):
    def _ga(fn=fn, gelu=gelu, **over):
        a = _gat(**over)
        if gelu:
            a.pop("fill")
            if "index" not in over:
                a["index"] = a["index"].clamp(min=0)
        return lambda: fn(**a)

    def _exact(fn=ref_fn, gelu=gelu, **over):
        a = {k: v.double() if v.is_floating_point() else v for k, v in _gat(**over).items()}
        if gelu:
            a.pop("fill")
            a["index"] = a["index"].clamp(min=0)
        return fn(**a)

    case(T, "dtype", _ga(x=torch.ones(2, 3, 4, dtype=torch.int32)), Raises(TypeError, "x must have dtype"))
    case(T, "dtype", _ga(index=torch.zeros(3, 2)), Raises(TypeError, "index must have dtype"))
    case(T, "dtype", _ga(extra=torch.randn(1, 4).half()), Raises(TypeError, "extra must have dtype"))
    case(T, "float64", lambda fn=fn, gelu=gelu: fn(**{k: v.double() if v.is_floating_point() else v
                                                     for k, v in _gat().items() if not (gelu and k == "fill")}
                                                  | ({"index": _gat()["index"].clamp(min=0)} if gelu else {})),
         close_to(_exact), float64=True)
    case(T, "rank", _ga(x=torch.randn(4)), Raises(ValueError, "x must have at least 2 dims"))
    case(T, "rank", _ga(index=torch.zeros(3, dtype=torch.long)), Raises(ValueError, "index must be 2-D"))
    case(T, "shape", _ga(weight=torch.randn(5, 9)), Raises(ValueError, "weight must have pieces*C"))
    case(T, "shape", _ga(bias=torch.randn(4)), Raises(ValueError, "bias must have out_features=5"))
    case(T, "shape", _ga(extra=torch.randn(1, 3)), Raises(ValueError, "extra must have x's width"))
    case(T, "zero-size", _ga(index=torch.zeros(3, 0, dtype=torch.long), weight=torch.randn(5, 0)),
         Raises(ValueError, "index must have at least one piece"))
    case(T, "zero-size", _ga(index=torch.zeros(0, 2, dtype=torch.long)), shape_is(0, 5, device="cpu"))
    case(T, "zero-size", _ga(x=torch.randn(2, 3, 0), weight=torch.randn(5, 0), extra=torch.randn(1, 0)),
         close_to(lambda ex=_exact: ex(x=torch.randn(2, 3, 0), weight=torch.randn(5, 0), extra=torch.randn(1, 0))))
    case(T, "device", _ga(index=torch.zeros(3, 2, dtype=torch.long, device=META)), Raises(ValueError, "index is on meta"))
    case(T, "meta", lambda fn=fn: fn(m(2, 3, 4), m(3, 2, dtype=torch.long), m(5, 8), m(5)), shape_is(3, 5))
    case(T, "out-of-range ids", _ga(index=torch.tensor([[0, 7], [0, 1], [0, 0]])), Raises(ValueError, "index row 0"))
    case(T, "out-of-range ids", _ga(index=torch.tensor([[0, -2], [0, 1], [0, 0]])), Raises(ValueError, "index row 0"))
    case(T, "non-finite tensor", _ga(x=torch.tensor([INF] * 4 + [1.0] * 20).reshape(2, 3, 4),
                                     index=torch.tensor([[0, 1], [2, 3], [4, 5]])),
         finite_rows(rows=(1, 2), nan_rows=(0,)))
    case(T, "int32 overflow", lambda fn=fn: fn(m(4, 2**28).t(), m(3, 2, dtype=torch.long), m(5, 8), m(5)), shape_is(3, 5))
    case(T, "keyword", lambda fn=fn: fn(**{k: v for k, v in _gat().items() if k != "fill"}, validate=False), Raises(TypeError, "validate"))
    case(T, "type", _ga(index=[[0, 1]]), Raises(TypeError, "index must be a torch.Tensor"))
case("gather_linear", "flag type", lambda: gather_linear(**_gat(), gelu="no"), Raises(TypeError, "gelu must be a bool"))
case("gather_linear", "flag type", lambda: gather_linear(**_gat(), validate_values=1),
     Raises(TypeError, "validate_values must be a bool"))
case("gather_linear", "out-of-range ids", lambda: gather_linear(**{**_gat(), "fill": None}),
     Raises(ValueError, "-1 marks a fill row, which needs fill="))

# ---------------------------------------------------------------------------------------------- modules
CFG = SimpleNamespace(hidden_size=8, intermediate_size=12, num_attention_heads=2, hidden_act="silu")


def _plora_mod(dtype=torch.float32):
    torch.manual_seed(4)
    return PLoRA(8, 5, lora_r=2, lora_alpha=4, lora_dropout=0.0).to(dtype)


T = "nn.PLoRA"
X, MASK = torch.randn(2, 3, 8), torch.tensor([[True, False, True], [False, False, False]])
case(T, "dtype", lambda: _plora_mod()(X.half(), MASK), Raises(TypeError, "weight dtype float32 must match x dtype"))
case(T, "dtype", lambda: _plora_mod()(X, MASK.long()), Raises(TypeError, "im_mask must have dtype bool"))
case(T, "float64", lambda: _plora_mod(torch.float64)(X.double(), MASK),
     close_to(lambda: original_plora(X.double(), *[p.detach() for p in _plora_mod(torch.float64).parameters()][:2],
                                     _plora_mod(torch.float64).Plora_A.weight.detach(),
                                     _plora_mod(torch.float64).Plora_B.weight.detach(), MASK, 2.0)), float64=True)
case(T, "rank", lambda: _plora_mod()(torch.tensor(1.0), None), Raises(ValueError, "x must have at least 1 dimension"))
case(T, "shape", lambda: _plora_mod()(torch.randn(2, 3, 7), MASK), Raises(ValueError, "in_features=8"))
case(T, "shape", lambda: _plora_mod()(X, MASK[:, :2]), Raises(ValueError, "im_mask must have shape"))
case(T, "zero-size", lambda: _plora_mod()(X[:0], MASK[:0]), shape_is(0, 3, 5, device="cpu"))
case(T, "device", lambda: _plora_mod()(X, MASK.to(META)), Raises(ValueError, "im_mask is on meta"))
case(T, "meta", lambda: _plora_mod().to(META)(m(2, 3, 8), MASK.to(META)), shape_is(2, 3, 5))
case(T, "non-finite tensor", lambda: _inf_plora()(X, MASK), finite_rows(rows=(1, 3, 4, 5), nan_rows=(0, 2)))
case(T, "keyword", lambda: _plora_mod()(X, mask=MASK), Raises(TypeError, "mask"))
case(T, "type", lambda: _plora_mod()(X, MASK.tolist()), Raises(TypeError, "im_mask must be a bool torch.Tensor"))
case(T, "non-finite scalar", lambda: PLoRA(8, 5, lora_r=2, lora_alpha=INF)(X, MASK),
     Raises(ValueError, "scaling must be a finite float"))


def _inf_plora():
    mod = _plora_mod()
    with torch.no_grad():
        mod.Plora_B.weight.fill_(INF)
    return mod


def _proj(dtype=torch.float32):
    torch.manual_seed(5)
    return MLPProjector(8, 6, 5).to(dtype)


def _proj_original(dtype=torch.float64):
    p = _proj(dtype)
    return lambda x: p.linear_2(torch.nn.functional.gelu(p.linear_1(x)))


T = "nn.MLPProjector"
case(T, "dtype", lambda: _proj()(X.half()), Raises(TypeError, "weight dtype"))
case(T, "dtype", lambda: _proj()(X.long()), Raises(TypeError, "x must have dtype"))
case(T, "float64", lambda: _proj(torch.float64)(X.double()), close_to(lambda: _proj_original()(X.double())), float64=True)
case(T, "rank", lambda: _proj()(torch.tensor(1.0)), Raises(ValueError, "x must have at least 1 dimension"))
case(T, "shape", lambda: _proj()(torch.randn(2, 7)), Raises(ValueError, "weight has in_features=8"))
case(T, "zero-size", lambda: _proj()(X[:0]), shape_is(0, 3, 5, device="cpu"))
case(T, "zero-size", lambda: MLPProjector(0, 6, 5)(torch.randn(2, 0)), shape_is(2, 5, device="cpu"))
case(T, "device", lambda: _proj()(X.to(META)), Raises(ValueError, "is on"))
case(T, "meta", lambda: _proj().to(META)(m(2, 3, 8)), shape_is(2, 3, 5))
case(T, "non-finite tensor", lambda: _proj()(torch.tensor([[NAN] * 8, [1.0] * 8])), finite_rows(rows=(1,), nan_rows=(0,)))
case(T, "state_dict", lambda: _proj().load_state_dict({**_proj().state_dict(), **{
    k.replace("linear_1.", "0.").replace("linear_2.", "2."): v for k, v in _proj().state_dict().items()}}),
     Raises(RuntimeError, "both the LLaVA layout (0.bias, 0.weight, 2.bias, 2.weight)"))
case(T, "state_dict", lambda: _proj().load_state_dict({"0.weight": torch.randn(6, 8)}), Raises(RuntimeError, "Missing key"))
case(T, "keyword", lambda: _proj()(X, im_mask=MASK), Raises(TypeError, "im_mask"))


def _mlp(dtype=torch.float32):
    torch.manual_seed(6)
    return cogvlm.VisionExpertMLP(CFG).to(dtype)


TYPES = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
H = torch.randn(2, 5, 8)
for T, mk in (("models.cogvlm.VisionExpertMLP", _mlp),
              ("models.cogvlm.VisionExpertAttention", lambda dtype=torch.float32: _attn(dtype))):
    def call(mod, h=H, types=TYPES, T=T, **kw):
        if "Attention" in T:
            pos = torch.arange(h.shape[1]).expand(h.shape[0], -1).to(h.device)
            return mod(h, types, pos, **kw)[0]
        return mod(h, types, **kw)

    case(T, "dtype", lambda mk=mk, call=call: call(mk(), H.half()), Raises(TypeError, "dtype"))
    case(T, "dtype", lambda mk=mk, call=call: call(mk(), H, TYPES.float()), Raises(TypeError, "token_type_ids must have dtype"))
    case(T, "float64", lambda mk=mk, call=call: call(mk(torch.float64), H.double()), Gives(
        lambda y: torch.testing.assert_close(y, y.double()) or None), float64=True)
    case(T, "rank", lambda mk=mk, call=call: call(mk(), H, TYPES[0]), Raises(ValueError, "token_type_ids must be 2-D"))
    case(T, "shape", lambda mk=mk, call=call: call(mk(), H[..., :7], TYPES), Raises(ValueError, "hidden_states has last dim 7"))
    case(T, "shape", lambda mk=mk, call=call: call(mk(), H, TYPES[:, :4]), Raises(ValueError, "token_type_ids must have shape"))
    case(T, "rank", lambda mk=mk, call=call: call(mk(), H[0], TYPES), Raises(ValueError, "hidden_states must be 3-D"))
    case(T, "dtype", lambda mk=mk, call=call: call(mk(), H.int(), TYPES), Raises(TypeError, "hidden_states must be a floating"))
    case(T, "zero-size", lambda mk=mk, call=call: call(mk(), H[:0], TYPES[:0]), shape_is(0, 5, 8, device="cpu"))
    case(T, "device", lambda mk=mk, call=call: call(mk(), H, TYPES.to(META)), Raises(ValueError, "is on meta"))
    case(T, "meta", lambda mk=mk, call=call: call(mk().to(META), H.to(META), TYPES.to(META)), shape_is(2, 5, 8))
    case(T, "non-finite tensor", lambda mk=mk, call=call: call(_inf_vision(mk()), H, torch.zeros_like(TYPES)),
         finite_rows(rows=range(10)))   # an inf in the vision expert never reaches language rows
    case(T, "out-of-range ids", lambda mk=mk, call=call: call(mk(), H, TYPES + 5),
         Gives(lambda y: torch.isfinite(y).all() or None))   # unknown token types route to the language expert
    case(T, "keyword", lambda mk=mk, call=call: call(mk(), H, TYPES, token_types=TYPES), Raises(TypeError, "token_types"))
    case(T, "type", lambda mk=mk, call=call: call(mk(), H, TYPES.tolist()), Raises(TypeError, "token_type_ids must be a torch.Tensor"))


_A = "models.cogvlm.VisionExpertAttention"
_POS = torch.arange(5).expand(2, -1)
case(_A, "shape", lambda: _attn()(H, TYPES, _POS[:, :4])[0], Raises(ValueError, "position_ids must have shape"))
case(_A, "shape", lambda: _attn()(H, TYPES, _POS, torch.zeros(2, 1, 5, 4))[0], Raises(ValueError, "attention_mask must"))
case(_A, "rank", lambda: _attn()(H, TYPES, _POS, torch.zeros(2, 5, 5))[0], Raises(ValueError, "attention_mask must be 4-D"))
case(_A, "device", lambda: _attn()(H, TYPES, _POS.to(META))[0], Raises(ValueError, "position_ids is on meta"))


def _attn(dtype=torch.float32):
    torch.manual_seed(7)
    return cogvlm.VisionExpertAttention(CFG).to(dtype)


def _inf_vision(mod):
    with torch.no_grad():
        for name, p in mod.named_parameters():
            if "vision" in name:
                p.fill_(INF)
    return mod


# --------------------------------------------------------------------------- image packers (LLaVA-NeXT, 4KHD)
PIN = ((28, 56), (56, 28), (56, 56))   # 28-px tiles of 14-px patches: 2x2 tokens per tile
SIZES = [(28, 28)]                     # selects the 1x2 grid: base + 2 tiles


def _packed(result):
    return torch.cat(result[0])


def _tiles(c, seed):
    """``(3, 4, c)`` features: a base (global) tile and two tiles of 2x2 tokens."""
    return torch.randn(3, 4, c, generator=torch.Generator().manual_seed(seed))


def _pack_call(make, feats, layout, kw):
    return lambda: _packed(make()(feats, layout, **kw))


def _llava(vision=6, dtype=torch.float32, device=None, **kw):
    torch.manual_seed(8)
    return llava_next.LlavaNextImagePacker(vision, 5, PIN, 28, 14, device=device, **kw).to(dtype)


def _llava_feats(c=6):
    return _tiles(c, 9)


def _ll(feats=None, sizes=SIZES, mod=None, **kw):
    return _pack_call(mod or _llava, _llava_feats() if feats is None else feats, sizes, kw)


def _ll_unfused(mod_fn, feats):
    def expected():
        p = mod_fn()
        return torch.cat(llava_next.unfused_project_and_pack(feats, SIZES, p.multi_modal_projector, p.image_newline,
                                                             image_grid_pinpoints=PIN, tile_size=28, patch_size=14)[0])
    return close_to(expected)


def _inf_newline():
    p = _llava()
    with torch.no_grad():
        p.image_newline.fill_(INF)
    return p


NAN_BASE = _llava_feats().index_put((torch.tensor([0]), torch.tensor([0])), torch.tensor(NAN))
T = "models.llava_next.LlavaNextImagePacker"
case(T, "dtype", _ll(_llava_feats().half()), Raises(TypeError, "features dtype torch.float16"))
case(T, "dtype", _ll(_llava_feats().long()), Raises(TypeError, "features dtype torch.int64"))
case(T, "dtype", _ll(sizes=torch.tensor([[28.0, 28.0]])), Raises(ValueError, "image_sizes[0] must be a (height, width) pair"))
case(T, "float64", _ll(_llava_feats().double(), mod=lambda: _llava(dtype=torch.float64)),
     _ll_unfused(lambda: _llava(dtype=torch.float64), _llava_feats().double()), float64=True)
case(T, "rank", _ll(_llava_feats()[0]), Raises(ValueError, "features must be 3-D"))
case(T, "rank", _ll(sizes=torch.tensor([28, 28])), Raises(ValueError, "image_sizes must be 2-D"))
case(T, "shape", _ll(_llava_feats(5)), Raises(ValueError, "features have width C=5 but the projector's first Linear takes 6"))
case(T, "shape", _ll(_llava_feats()[:, :3]), Raises(ValueError, "features[0] has 3 tokens per tile"))
case(T, "shape", _ll(_llava_feats()[:2]), Raises(ValueError, "features has 2 tiles but image_sizes"))
case(T, "shape", _ll([_llava_feats()] * 2), Raises(ValueError, "features has 2 images but image_sizes has 1"))
case(T, "zero-size", _ll(_llava_feats()[:0]), Raises(ValueError, "features has 0 tiles"))
case(T, "zero-size", _ll(_llava_feats()[:0], []), Raises(ValueError, "image_sizes must name at least one image"))
case(T, "zero-size", _ll(sizes=[(0, 28)]), Raises(ValueError, "image_sizes[0] must be a (height, width) pair of positive"))
case(T, "zero-size", _ll(_llava_feats(0), mod=lambda: _llava(0)),
     _ll_unfused(lambda: _llava(0), _llava_feats(0)))            # C=0: the projector of nothing, as nn.Linear
case(T, "device", _ll(_llava_feats().to(META)), Raises(ValueError, "features is on meta"))
case(T, "meta", lambda: _packed(_llava().to(META)(m(3, 4, 6), SIZES)), shape_is(10, 5))
case(T, "meta", _ll(sizes=torch.tensor(SIZES, device=META)), Raises(ValueError, "image_sizes is on meta"))
case(T, "non-finite tensor", _ll(NAN_BASE), finite_rows(rows=range(1, 10), nan_rows=(0,)))
case(T, "non-finite tensor", _ll(mod=_inf_newline), _ll_unfused(_inf_newline, _llava_feats()))
case(T, "non-finite scalar", _ll(sizes=[(INF, 28)]), Raises(ValueError, "image_sizes[0] must be a (height, width) pair"))
case(T, "out-of-range size", _ll(sizes=[(-28, 28)]), Raises(ValueError, "image_sizes[0] must be a (height, width) pair"))
case(T, "int32 overflow", lambda: _packed(_llava(2**28, device=META)(m(3, 4, 2**28), SIZES)), shape_is(10, 5))
case(T, "keyword", lambda: _llava()(_llava_feats(), image_size=SIZES), Raises(TypeError, "image_size"))
case(T, "type", _ll(_llava_feats().numpy()), Raises(TypeError, "features must be a non-empty list"))
case(T, "config", lambda: llava_next.LlavaNextImagePacker(6, 5, PIN, 0, 14), Raises(ValueError, "tile_size must be a positive int"))
case(T, "config", _ll(mod=lambda: llava_next.LlavaNextImagePacker(6, 5, PIN, 28, 13)),
     Raises(ValueError, "tile_size=28 must be a multiple of patch_size=13"))

GRIDS = [(1, 2)]   # a global view + 1x2 tiles of 2x2 tokens


def _hd(vit=2, dtype=torch.float32, device=None):
    torch.manual_seed(10)
    p = ixc_hd.InternLMXComposer2HDImagePacker(vit, 5, device=device)
    if device != META:
        with torch.no_grad():
            p.plora_glb_GN.normal_()
            p.plora_sub_GN.normal_()
    return p.to(dtype)


def _hd_feats(c=2):
    return _tiles(c, 11)


def _hdc(feats=None, grids=GRIDS, mod=None, **kw):
    return _pack_call(mod or _hd, _hd_feats() if feats is None else feats, grids, kw)


def _hd_unfused(mod_fn, feats):
    def expected():
        p = mod_fn()
        return torch.cat(ixc_hd.unfused_project_and_pack(feats, GRIDS, p.plora_glb_GN, p.plora_sub_GN, p.vision_proj)[0])
    return close_to(expected)


def _inf_sub_gn():
    p = _hd()
    with torch.no_grad():
        p.plora_sub_GN.fill_(INF)
    return p


T = "models.internlm_xcomposer2_hd.InternLMXComposer2HDImagePacker"
case(T, "dtype", _hdc(_hd_feats().half()), Raises(TypeError, "features dtype torch.float16"))
case(T, "dtype", _hdc(_hd_feats().long()), Raises(TypeError, "features dtype torch.int64"))
case(T, "float64", _hdc(_hd_feats().double(), mod=lambda: _hd(dtype=torch.float64)),
     _hd_unfused(lambda: _hd(dtype=torch.float64), _hd_feats().double()), float64=True)
case(T, "rank", _hdc(_hd_feats()[0]), Raises(ValueError, "features must be 3-D"))
case(T, "shape", _hdc(_hd_feats(1)), Raises(ValueError, "projector's first Linear takes 8 features"))
case(T, "shape", _hdc(_hd_feats()[:, :3]), Raises(ValueError, "even square number of tokens per tile"))
case(T, "shape", _hdc(_hd_feats()[:2]), Raises(ValueError, "features has 2 tiles but grids"))
case(T, "shape", _hdc([_hd_feats()[:2]]), Raises(ValueError, "features[0] has 2 tiles but its grid 1x2"))
case(T, "zero-size", _hdc(_hd_feats()[:0]), Raises(ValueError, "features has 0 tiles"))
case(T, "zero-size", _hdc(grids=[]), Raises(ValueError, "grids must name at least one image"))
case(T, "zero-size", _hdc(grids=[(0, 2)]), Raises(ValueError, "grids[0] must be an (h, w) pair of positive"))
case(T, "zero-size", _hdc(_hd_feats(0), mod=lambda: _hd(0)),
     close_to(lambda: _hd(0).vision_proj(torch.zeros(6, 0))))     # C=0: every token is the projector of nothing
case(T, "device", _hdc(_hd_feats().to(META)), Raises(ValueError, "features is on meta"))
case(T, "meta", lambda: _packed(_hd().to(META)(m(3, 4, 2), GRIDS)), shape_is(6, 5))
case(T, "meta", _hdc(grids=torch.tensor(GRIDS, device=META)), Raises(ValueError, "grids is on meta"))
case(T, "non-finite tensor", _hdc(_hd_feats().index_put((torch.tensor([2]),), torch.tensor(NAN))),
     _hd_unfused(_hd, _hd_feats().index_put((torch.tensor([2]),), torch.tensor(NAN))))
case(T, "non-finite tensor", _hdc(mod=_inf_sub_gn), _hd_unfused(_inf_sub_gn, _hd_feats()))
case(T, "non-finite scalar", _hdc(grids=[(INF, 2)]), Raises(ValueError, "grids[0] must be an (h, w) pair"))
case(T, "out-of-range size", _hdc(grids=[(-1, 2)]), Raises(ValueError, "grids[0] must be an (h, w) pair"))
case(T, "int32 overflow", lambda: _packed(_hd(2**28, device=META)(m(3, 4, 2**28), GRIDS)), shape_is(6, 5))
case(T, "keyword", lambda: _hd()(_hd_feats(), grid=GRIDS), Raises(TypeError, "grid"))
case(T, "type", _hdc(_hd_feats().numpy()), Raises(TypeError, "features must be a torch.Tensor"))

# ------------------------------------------------------------------------ InternLM2 parts with PLoRA (IXC2)
LM_CFG = SimpleNamespace(hidden_size=8, intermediate_size=12, num_attention_heads=2, num_key_value_heads=1,
                         hidden_act="silu")
LM_H = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(12))
LM_MASK = torch.tensor([[True, False, True], [False, False, False]])
NAN_TOKEN0 = LM_H.index_put((torch.tensor([0]), torch.tensor([0])), torch.tensor(NAN))


def _lm(cls, dtype=torch.float32, alpha=4.0):
    torch.manual_seed(13)
    return cls(LM_CFG, lora_r=2, lora_alpha=alpha, lora_dropout=0.0).to(dtype)


def _first(y):
    return y[0] if isinstance(y, tuple) else y


for T, cls in (("models.internlm_xcomposer2.InternLM2MLP", ixc.InternLM2MLP),
               ("models.internlm_xcomposer2.InternLM2Attention", ixc.InternLM2Attention),
               ("models.internlm_xcomposer2.InternLM2DecoderLayer", ixc.InternLM2DecoderLayer)):
    mlp = cls is ixc.InternLM2MLP

    def call(h=LM_H, mask=LM_MASK, mod=None, cls=cls, **kw):
        return lambda: _first((mod or (lambda: _lm(cls)))()(h, im_mask=mask, **kw))

    if cls is ixc.InternLM2DecoderLayer:   # the fp32 RMSNorm weight promotes, as the original's layer does
        case(T, "dtype", call(LM_H.half()), Gives(lambda y: (y.dtype == torch.float32 and torch.isfinite(y).all())
                                                  or pytest.fail(f"{y.dtype}")))
    else:
        case(T, "dtype", call(LM_H.half()), Raises(TypeError, "weight dtype float32 must match x dtype float16"))
    case(T, "dtype", call(mask=LM_MASK.long()), Raises(TypeError, "im_mask must have dtype bool"))
    case(T, "float64", call(LM_H.double(), mod=lambda cls=cls: _lm(cls, torch.float64)),
         Gives(lambda y: (y.dtype == torch.float64 and torch.isfinite(y).all()) or pytest.fail(f"{y.dtype}")),
         float64=True)
    if mlp:   # a per-token MLP: any leading dims, as nn.Linear
        case(T, "rank", call(LM_H[0], LM_MASK[0]), shape_is(3, 8, device="cpu"))
        case(T, "shape", call(LM_H[..., :7]), Raises(ValueError, "in_features=8"))
        case(T, "type", call(LM_H.tolist()), Raises(TypeError, "x must be a torch.Tensor"))
        case(T, "out-of-range mask", call(mask=torch.ones(7, dtype=torch.bool)), Raises(ValueError, "im_mask must have shape"))
        case(T, "non-finite tensor", call(NAN_TOKEN0), finite_rows(rows=range(1, 6), nan_rows=(0,)))
    else:
        case(T, "rank", call(LM_H[0], LM_MASK[0]), Raises(ValueError, "hidden_states must be 3-D"))
        case(T, "shape", call(LM_H[..., :7]), Raises(ValueError, "hidden_states must have hidden_size=8"))
        case(T, "shape", call(attention_mask=torch.zeros(2, 1, 3, 4)), Raises(ValueError, "attention_mask must have shape"))
        case(T, "type", call(LM_H.tolist()), Raises(TypeError, "hidden_states must be a torch.Tensor"))
        case(T, "out-of-range ids", call(position_ids=torch.arange(3).expand(3, 3)),
             Raises(ValueError, "position_ids must have shape"))
        case(T, "non-finite tensor", call(NAN_TOKEN0), finite_rows(rows=(3, 4, 5), nan_rows=(0, 1, 2)))  # one sequence
    case(T, "shape", call(mask=LM_MASK[:, :2]), Raises(ValueError, "im_mask must have shape"))
    case(T, "shape", call(mask=LM_MASK.reshape(-1)), close_to(call()))   # documented: the IXC2.5 flattened mask
    case(T, "zero-size", call(LM_H[:0], LM_MASK[:0]), shape_is(0, 3, 8, device="cpu"))
    case(T, "zero-size", call(LM_H[:, :0], LM_MASK[:, :0]), shape_is(2, 0, 8, device="cpu"))
    case(T, "device", call(mask=LM_MASK.to(META)), Raises(ValueError, "im_mask is on meta"))
    case(T, "meta", call(m(2, 3, 8), LM_MASK.to(META), mod=lambda cls=cls: _lm(cls).to(META)), shape_is(2, 3, 8))
    case(T, "non-finite scalar", call(mod=lambda cls=cls: _lm(cls, alpha=INF)), Raises(ValueError, "scaling must be a finite"))
    case(T, "int32 overflow", call(m(2**16, 2**16, 8), m(2**16, 2**16, dtype=torch.bool),
                                   mod=lambda cls=cls: _lm(cls).to(META)), shape_is(2**16, 2**16, 8))
    case(T, "keyword", call(mask_im=LM_MASK), Raises(TypeError, "mask_im"))
    case(T, "type", call(mask=LM_MASK.tolist()), Raises(TypeError, "im_mask must be a bool torch.Tensor"))


# -------------------------------------------------------------------------------------------------- runner
def counts() -> dict[str, tuple[int, int]]:
    """``{target: (cases, classes)}`` of the matrix."""
    by = defaultdict(list)
    for c in CASES:
        by[c.target].append(c.klass)
    return {t: (len(k), len(set(k))) for t, k in by.items()}


def _ids():
    seen = defaultdict(int)
    out = []
    for c in CASES:
        key = f"{c.target}|{c.klass}"
        seen[key] += 1
        out.append(f"{key}|{seen[key]}")
    return out


def test_every_target_has_ten_classes():
    small = {t: k for t, (_, k) in counts().items() if k < 10}
    assert not small, f"fewer than 10 bad-input classes: {small}"


@pytest.mark.parametrize("backend", ["auto", "triton"], indirect=True)
@pytest.mark.parametrize("c", CASES, ids=_ids())
def test_bad_input(backend, c: Case):
    if c.float64 and backend == "triton":
        with pytest.raises(BackendNotSupported, match="float64 is not supported"):
            c.call()
        return
    if isinstance(c.expect, Raises):
        with pytest.raises(c.expect.exc) as info:
            c.call()
        assert c.expect.text in str(info.value), f"{c.expect.text!r} not in {str(info.value)!r}"
        assert not isinstance(info.value, BackendNotSupported)
    else:
        c.expect.check(c.call())


META_GRADS = {
    "partial_lora_linear": lambda x, w: partial_lora_linear(x, w, None, m(2, 8), m(5, 2), m(2, 3, dtype=torch.bool), 2.0),
    "expert_linear": lambda x, w: expert_linear(x, torch.stack([w, w]), m(2, 3, dtype=torch.long)),
    "linear_gelu": lambda x, w: ops.linear_gelu(x, w, m(5)),
    "gather_linear_gelu": lambda x, w: gather_linear_gelu(x, m(4, 1, dtype=torch.long), w, m(5)),
}


@pytest.mark.parametrize("backend", ["auto", "triton"], indirect=True)
@pytest.mark.parametrize("op", list(META_GRADS))
def test_meta_backward_gives_gradient_shapes(backend, op):
    x, w = m(2, 3, 8).requires_grad_(True), m(5, 8).requires_grad_(True)
    META_GRADS[op](x, w).sum().backward()
    assert x.grad.shape == x.shape and w.grad.shape == w.shape and x.grad.device.type == META


if __name__ == "__main__":
    for target, (n, k) in counts().items():
        print(f"{target:64s} {n:3d} cases {k:3d} classes")
    print(f"{'total':64s} {len(CASES):3d} cases")


@pytest.mark.parametrize("op", ["partial_lora_linear", "gather_linear_gelu", "linear_gelu", "patch_embed"])
def test_float64_bias_gradients_accumulate_in_float64(op):
    """float64 runs the reference math and its gradients are exact: a bias gradient summed in float32 (1.6e-7
    relative) would not be. The bias gradient is the row sum of the output gradient (times GELU' before fill)."""
    g = torch.Generator().manual_seed(0)
    big = (1 + 1e-12 * torch.arange(64, dtype=torch.float64))[:, None] * 1e4     # rows fp32 cannot sum exactly
    if op == "patch_embed":
        w, b = torch.randn(5, 48, dtype=torch.float64, generator=g), torch.zeros(5, dtype=torch.float64)
        b.requires_grad_(True)
        y = ops.patch_embed(torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8, generator=g), w, b, patch_size=4)
        grad = big.expand(64, 5).reshape(1, 64, 5)
    else:
        x = torch.randn(64, 8, dtype=torch.float64, generator=g)
        w, b = torch.randn(5, 8, dtype=torch.float64, generator=g), torch.zeros(5, dtype=torch.float64, requires_grad=True)
        if op == "partial_lora_linear":
            y = partial_lora_linear(x, w, b, torch.randn(2, 8, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64),
                                    torch.arange(64) % 2 == 0, 2.0)
        elif op == "linear_gelu":
            y = ops.linear_gelu(x, w, b)
        else:
            y = gather_linear_gelu(x, torch.arange(64)[:, None], w, b)
        grad = big.expand(64, 5)
    (y * grad).sum().backward()
    assert b.grad.dtype == torch.float64
    if op in ("partial_lora_linear", "patch_embed"):
        torch.testing.assert_close(b.grad, grad.reshape(-1, 5).sum(0), rtol=1e-15, atol=0)
    else:  # GELU'(pre) weights the rows: the oracle is autograd through the float64 reference math
        b2 = b.detach().clone().requires_grad_(True)
        ref = torch.nn.functional.gelu(torch.nn.functional.linear(x, w, b2))
        (ref * grad).sum().backward()
        torch.testing.assert_close(b.grad, b2.grad, rtol=1e-15, atol=0)
