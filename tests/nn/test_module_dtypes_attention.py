"""The attention-family modules against their originals under ``.double()``, ``.half()``, CPU bf16 autocast
(CUDA autocast on a GPU), ``copy.deepcopy`` and ``state_dict`` round trips.

Pairs (ours, original): the BLIP-2 and InstructBLIP Q-Formers vs transformers', Qwen-VL ``Resampler`` vs its
``forward_original``, Mini-Gemini ``PatchInfoMining`` and CogAgent ``CrossAttention`` vs the ports in
``vlmkern.reference.originals`` (paired as in tests/models/test_mini_gemini.py / test_cogagent_cross_attention.py),
``PatchEmbedLinear.forward_images`` vs the processor's patches through ``nn.Linear``. Low-precision results
follow the tolerance rule of ``vlmkern.testing`` against the original in float64.
"""
from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

from vlmkern import ops, reference
from vlmkern.testing import assert_close

transformers = pytest.importorskip("transformers")
# the pairs reuse the model tests' builders: importable when this file runs alone too (pytest adds a test file's
# directory to sys.path only when it collects a file there)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
BACKENDS = pytest.mark.parametrize("backend", ["auto", "triton"], indirect=True)


@dataclass
class Pair:
    ours: torch.nn.Module
    orig: torch.nn.Module
    inputs: Callable[[torch.dtype], dict]        # float inputs in the given dtype
    run: Callable[[torch.nn.Module, dict], torch.Tensor]
    run_orig: Callable[[torch.nn.Module, dict], torch.Tensor]


def _qformer_pair(kind: str) -> Pair:
    import test_blip2_qformer as tb
    import test_instructblip_qformer as ti
    mod, make = (tb, tb.itm_inputs) if kind == "blip2" else (ti, ti.instruction_inputs)
    hf = mod.hf_model(mod.make_config(num_hidden_layers=1))
    cls = __import__("vlmkern.models." + ("blip2" if kind == "blip2" else "instructblip"),
                     fromlist=["x"])
    ours = getattr(cls, "Blip2QFormerModel" if kind == "blip2" else "InstructBlipQFormerModel").from_transformers(hf)
    base = make(batch=2)

    def inputs(dtype):
        return {k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in base.items()}

    def run(m, x):
        return m(**x).last_hidden_state
    return Pair(ours, hf, inputs, run, run)


def _resampler_pair() -> Pair:
    from vlmkern.models.qwen_vl import Resampler
    r = Resampler(2, 64, 2, 32)
    x = torch.randn(2, 16, 32, dtype=torch.float64)
    return Pair(r, r, lambda dt: {"x": x.to(dt)}, lambda m, a: m(a["x"]), lambda m, a: m.forward_original(a["x"]))


def _mini_gemini_pair() -> Pair:
    import test_mini_gemini as tm
    orig, ours = tm._pair(8, 12, "cpu", torch.float32)
    images, aux = torch.randn(2, 9, 8, dtype=torch.float64), torch.randn(2, 12, 6, 6, dtype=torch.float64)
    return Pair(ours, orig, lambda dt: {"images": images.to(dt), "images_aux": aux.to(dt)},
                lambda m, a: m(**a)[1], lambda m, a: m(**a)[1])


def _cogagent_pair() -> Pair:
    import test_cogagent_cross_attention as tc
    from vlmkern.reference.originals.cogagent import make_config
    orig, ours = tc._pair(make_config(), "cpu", torch.float32)
    h, e = torch.randn(2, 5, 64, dtype=torch.float64), torch.randn(2, 7, 64, dtype=torch.float64)

    def run(m, a):
        mask = torch.zeros(2, 1, 1, 1, dtype=a["h"].dtype)   # the original's default; None is an error there
        return m(a["h"], a["e"], attention_mask=mask)[0]
    return Pair(ours, orig, lambda dt: {"h": h.to(dt), "e": e.to(dt)}, run, run)


def _patch_embed_pair() -> Pair:
    from vlmkern.nn.patch_embed import PatchEmbedLinear
    ours = PatchEmbedLinear(3 * 16, 8)
    orig = torch.nn.Linear(3 * 16, 8)
    orig.load_state_dict(ours.state_dict())
    px = torch.randint(0, 256, (2, 3, 9, 7), dtype=torch.uint8)

    def run_orig(m, a):                                # FuyuImageProcessor patches (fp32) through nn.Linear
        return m(reference.patchify(a["px"], 4).to(m.weight.dtype))
    return Pair(ours, orig, lambda dt: {"px": px}, lambda m, a: m.forward_images(a["px"], patch_size=4), run_orig)


PAIRS = {"blip2": lambda: _qformer_pair("blip2"), "instructblip": lambda: _qformer_pair("instructblip"),
         "qwen_vl_resampler": _resampler_pair, "mini_gemini": _mini_gemini_pair, "cogagent": _cogagent_pair,
         "patch_embed_linear": _patch_embed_pair}


def _reference(pair: Pair) -> torch.Tensor:
    orig64 = copy.deepcopy(pair.orig).double()
    with torch.no_grad():
        return pair.run_orig(orig64, pair.inputs(torch.float64))


@pytest.mark.parametrize("name", PAIRS)
def test_double_matches_the_original(name):
    pair = PAIRS[name]()
    ours = copy.deepcopy(pair.ours).double()
    with torch.no_grad():
        out = pair.run(ours, pair.inputs(torch.float64))
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, _reference(pair), atol=1e-10, rtol=1e-9)


@BACKENDS
@pytest.mark.parametrize("name", PAIRS)
def test_half_follows_the_tolerance_rule(backend, name):
    pair = PAIRS[name]()
    ours, orig = copy.deepcopy(pair.ours).half(), copy.deepcopy(pair.orig).half()
    with torch.no_grad():
        out = pair.run(ours, pair.inputs(torch.float16))
        base = pair.run_orig(orig, pair.inputs(torch.float16))
    assert out.dtype == base.dtype == torch.float16
    assert_close(out, base, _reference(pair), dtype=torch.float16, name=name)


def _autocast_check(name, device_type):
    pair = PAIRS[name]()
    ours, orig = pair.ours.to(device_type), pair.orig.to(device_type)
    x = {k: v.to(device_type) if torch.is_tensor(v) else v for k, v in pair.inputs(torch.float32).items()}
    with torch.no_grad(), torch.autocast(device_type, torch.bfloat16):
        out = pair.run(ours, x)
        base = pair.run_orig(orig, x)
    assert out.dtype == base.dtype, f"{name}: {out.dtype} under autocast where the original gives {base.dtype}"
    assert_close(out.cpu(), base.cpu(), _reference(pair), dtype=torch.bfloat16, name=name)


@BACKENDS
@pytest.mark.parametrize("name", PAIRS)
def test_cpu_autocast_bf16_runs_like_the_original(backend, name):
    _autocast_check(name, "cpu")


@pytest.mark.cuda
@pytest.mark.parametrize("name", PAIRS)
def test_cuda_autocast_bf16_runs_like_the_original(name):
    _autocast_check(name, "cuda")


@pytest.mark.parametrize("name", PAIRS)
def test_deepcopy_and_state_dict_round_trip(name):
    pair = PAIRS[name]()
    x = pair.inputs(torch.float32)
    with torch.no_grad():
        out = pair.run(pair.ours, x)
        twin = copy.deepcopy(pair.ours)
        torch.testing.assert_close(pair.run(twin, x), out, atol=0, rtol=0)
        for p in twin.parameters():                     # the copy owns its weights (and caches)
            p.add_(0.25)
        torch.testing.assert_close(pair.run(pair.ours, x), out, atol=0, rtol=0)
        assert not torch.equal(pair.run(twin, x), out)
        # our state dict loads strictly into the original and back
        fresh = copy.deepcopy(twin)
        fresh.load_state_dict(pair.ours.state_dict(), strict=True)
        torch.testing.assert_close(pair.run(fresh, x), out, atol=0, rtol=0)
        orig = copy.deepcopy(pair.orig)
        orig.load_state_dict(pair.ours.state_dict(), strict=True)
        torch.testing.assert_close(pair.run_orig(orig, x), out, atol=2e-5, rtol=2e-4)


def test_resampler_sees_weights_changed_through_data():
    """The issue's case: a weight scaled through ``.data`` (no version bump) must not leave a stale cached term."""
    pair = _resampler_pair()
    r, x = pair.ours, pair.inputs(torch.float32)["x"]
    with torch.no_grad():
        r(x)                                            # fill the caches
        r.attn.in_proj_weight.data.mul_(0.31)
        torch.testing.assert_close(r(x), r.forward_original(x), atol=1e-5, rtol=1e-4)
        r.pos_embed.data.mul_(0.31)                     # the cached table too
        torch.testing.assert_close(r(x), r.forward_original(x), atol=1e-5, rtol=1e-4)
        r.pos_embed.data = torch.randn_like(r.pos_embed)  # reassignment
        torch.testing.assert_close(r(x), r.forward_original(x), atol=1e-5, rtol=1e-4)


def test_patch_info_mining_autocast_with_bf16_inputs():
    """Under autocast the model's bf16 features meet fp32 projector weights (the issue's TypeError)."""
    pair = _mini_gemini_pair()
    x = pair.inputs(torch.bfloat16)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        out, base = pair.run(pair.ours, x), pair.run_orig(pair.orig, x)
    assert out.dtype == base.dtype
    assert_close(out, base, _reference(pair), dtype=torch.bfloat16)


def test_patch_embed_float64_weight_runs_the_reference():
    lin = _patch_embed_pair().ours.double()
    px = torch.randint(0, 256, (1, 3, 8, 8), dtype=torch.uint8)
    out = lin.forward_images(px, patch_size=4)
    ref = F.linear(reference.patchify(px, 4, out_dtype=torch.float64), lin.weight, lin.bias)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
