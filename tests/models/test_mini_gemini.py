"""Mini-Gemini patch info mining: the ``vlmkern::window_attention`` op and the ``PatchInfoMining`` drop-in.

The oracle is the faithful port of the original (``mgm_arch.py``: ``initialize_uni_modules`` + ``unified_resampler``;
:mod:`vlmkern.reference.originals.mini_gemini`): re-arranged HR copy, K and V materialised, softmax in the input
dtype.
"""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from vlmkern.models.mini_gemini import PatchInfoMining, stack_hd_views
from vlmkern.ops.window_attention import patch_info_mining as ops_patch_info_mining
from vlmkern.ops.window_attention import window_attention as ops_window_attention
from vlmkern.reference.originals import mini_gemini as original
from vlmkern.reference.window_attention import window_attention as ref_window_attention
from vlmkern.testing import assert_close

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _randomize(module: nn.Module, gen_scale: float = 0.5) -> None:
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("0.weight"):   # LayerNorm gamma around 1
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("0.bias"):
                p.copy_(0.2 * torch.randn_like(p))
            elif p.dim() == 2:
                p.copy_(torch.randn_like(p) * gen_scale / math.sqrt(p.shape[1]) * 4)
            else:
                p.copy_(0.3 * torch.randn_like(p))


def _pair(C, C_aux, device, dtype):
    orig = original.UniModules(C, C_aux)
    _randomize(orig)
    ours = PatchInfoMining(C, C_aux)
    ours.load_state_dict(orig.state_dict(), strict=True)
    return orig.to(device, dtype), ours.to(device, dtype)


def _run(module, images, images_aux, grad):
    module.zero_grad(set_to_none=True)
    x = images.detach().clone().requires_grad_(True)
    h = images_aux.detach().clone().requires_grad_(True)
    _, out = module(x, h)
    out.backward(grad.to(out.dtype))
    grads = {"images": x.grad, "images_aux": h.grad}
    for name, p in module.named_parameters():
        grads[name] = p.grad if p.grad is not None else torch.zeros_like(p)
    return out.detach(), grads


def _inputs(B, pn, M, C, C_aux, device, dtype):
    images = torch.randn(B, pn * pn, C, device=device)
    images_aux = torch.randn(B, C_aux, pn * M, pn * M, device=device) * 1.5 + 0.5
    grad = torch.randn(B, pn * pn, C, device=device)
    return images.to(dtype), images_aux.to(dtype), grad


def _check_module(device, dtype, B, pn, M, C, C_aux, *, aux_transform=None):
    orig, ours = _pair(C, C_aux, device, dtype)
    exact = original.UniModules(C, C_aux).to(device, torch.float64)
    exact.load_state_dict(orig.state_dict())
    images, images_aux, grad = _inputs(B, pn, M, C, C_aux, device, dtype)
    aux_ours = aux_transform(images_aux) if aux_transform else images_aux
    out, g = _run(ours, images, aux_ours, grad)
    base, gb = _run(orig, images, images_aux, grad)
    ref, gr = _run(exact, images.double(), images_aux.double(), grad.double())
    assert_close(out, base, ref, dtype=dtype, name="embed_feat")
    for name in gr:
        assert_close(g[name], gb[name], gr[name], kind="grad", dtype=dtype, name=f"d{name}")


# ------------------------------------------------------------------------------------------- the op
@pytest.mark.parametrize("backend", ["triton"], indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,pn,M,C", [(2, 3, 2, 48), (1, 3, 4, 40), (1, 1, 8, 24), (1, 2, 3, 20)])
def test_window_attention_op_matches_reference(backend, device, dtype, B, pn, M, C):
    u = torch.randn(B, pn * pn, C, device=device)
    h = (torch.randn(B, C, pn * M, pn * M, device=device) * 2 + 3).to(dtype)
    g = torch.randn(B, pn * pn, C, device=device)

    def run(fn, u, h):
        u = u.detach().clone().requires_grad_(True)
        h = h.detach().clone().requires_grad_(True)
        s, p = fn(u, h)
        s.backward(g.to(s.dtype))
        return s.detach(), p.detach(), u.grad, h.grad

    s, p, du, dh = run(ops_window_attention, u, h)
    sb, pb, dub, dhb = run(ref_window_attention, u.to(dtype), h)
    se, pe, due, dhe = run(ref_window_attention, u.double(), h.double())
    assert s.dtype == torch.float32 and p.shape == (B, pn * pn, M * M)
    assert_close(s, sb, se, dtype=dtype, name="s")
    assert_close(p, pb, pe, dtype=dtype, name="probs")
    assert_close(du, dub, due, kind="grad", dtype=dtype, name="du")
    assert_close(dh, dhb, dhe, kind="grad", dtype=dtype, name="dh")


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_window_attention_non_contiguous_map(backend, device):
    """Channels-last HR map and a strided u: read in place, gradients in the map's shape."""
    u = torch.randn(2, 4, 64, device=device)[:, :, ::2]
    h = torch.randn(2, 32, 6, 6, device=device).to(memory_format=torch.channels_last).requires_grad_(True)
    s, _ = ops_window_attention(u, h)
    s.sum().backward()
    h2 = h.detach().double().requires_grad_(True)
    s2, _ = ref_window_attention(u.double(), h2)
    s2.sum().backward()
    torch.testing.assert_close(s.double(), s2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h.grad.double(), h2.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_window_attention_nan_to_num(backend, device):
    """Non-finite logits are mapped by nan_to_num: the softmax stays finite, the other rows are exact."""
    u = torch.randn(1, 4, 16, device=device)
    u[0, 1, 3] = float("inf")
    h = torch.randn(1, 16, 4, 4, device=device)
    s, p = ops_window_attention(u, h)
    s2, p2 = ref_window_attention(u, h)
    assert torch.isfinite(p).all() and torch.isfinite(s).all()
    # not row 1: an inf inside a dot product gives +-inf or NaN depending on how the GEMM pads its lanes (BLAS on
    # the CPU computes inf * 0 in some), so which windows tie at nan_to_num's clamp is the GEMM's choice there
    rows = [0, 2, 3]
    torch.testing.assert_close(p[:, rows], p2[:, rows])
    torch.testing.assert_close(s[:, rows], s2[:, rows])


def test_window_attention_opcheck_and_compile(device):
    u = torch.randn(2, 4, 16, device=device, requires_grad=True)
    h = torch.randn(2, 16, 4, 4, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.vlmkern.window_attention.default, (u, h, 1e-5))
    torch._dynamo.reset()
    f = torch.compile(lambda u, h: ops_window_attention(u, h)[0].square().sum(), fullgraph=True,
                      backend="aot_eager")
    f(u, h).backward()
    gu, gh = u.grad.clone(), h.grad.clone()
    u.grad = h.grad = None
    ref_window_attention(u, h)[0].square().sum().backward()
    torch.testing.assert_close(gu, u.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gh, h.grad, atol=1e-5, rtol=1e-5)


def test_patch_info_mining_compiles(device):
    C, C_aux = 16, 24
    orig, ours = _pair(C, C_aux, device, torch.float32)
    images, images_aux, _ = _inputs(2, 2, 2, C, C_aux, device, torch.float32)
    torch._dynamo.reset()
    f = torch.compile(lambda x, h: ours(x, h)[1], fullgraph=True, backend="aot_eager")
    out = f(images, images_aux)
    torch.testing.assert_close(out, orig(images, images_aux)[1], atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------ the module
def test_state_dict_names():
    keys = set(PatchInfoMining(8, 12).state_dict())
    expected = {f"vlm_uni_{p}_projector.{i}.{t}" for p in ("query", "aux", "val") for i in (0, 1)
                for t in ("weight", "bias")}
    assert keys == expected


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,pn,M", [(2, 3, 2), (1, 2, 4), (1, 1, 8)])
def test_module_matches_original_triton(backend, device, dtype, B, pn, M):
    _check_module(device, dtype, B, pn, M, C=32, C_aux=48)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("L", [64, 256, 1024, 1600])
@pytest.mark.parametrize("M", [2, 4, 8])
def test_module_matches_original_odd_grids(dtype, M, L):
    """Real grid sizes through the reference backend of the op (the restructured math at scale)."""
    _check_module("cpu", dtype, 1, math.isqrt(L), M, C=16, C_aux=8)


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_module_non_contiguous_aux(backend, device):
    _check_module(device, torch.float32, 2, 2, 3, C=16, C_aux=24,
                  aux_transform=lambda h: h.contiguous(memory_format=torch.channels_last))


def test_hd_setting_through_the_same_op():
    """2x2 tiles + global view: the five pairs stacked on the batch give each pair's own result."""
    C, C_aux, pn, M = 16, 24, 3, 2
    orig, ours = _pair(C, C_aux, "cpu", torch.float32)
    glr = torch.randn(2, pn * pn, C)
    ghr = torch.randn(2, C_aux, pn * M, pn * M)
    tlr = torch.randn(2, 4, pn * pn, C)
    thr = torch.randn(2, 4, C_aux, pn * M, pn * M)
    lr, hr = stack_hd_views(glr, ghr, tlr, thr)
    _, feat = ours(lr, hr)
    feat = feat.reshape(2, 5, pn * pn, C)
    torch.testing.assert_close(feat[:, 0], orig(glr, ghr)[1], atol=1e-5, rtol=1e-4)
    for t in range(4):
        torch.testing.assert_close(feat[:, 1 + t], orig(tlr[:, t], thr[:, t])[1], atol=1e-5, rtol=1e-4)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(B=st.integers(1, 2), pn=st.integers(1, 3), M=st.integers(1, 4), C=st.sampled_from([4, 16, 24]),
       C_aux=st.sampled_from([3, 16, 40]))
def test_module_hypothesis_shapes(B, pn, M, C, C_aux):
    _check_module("cpu", torch.float32, B, pn, M, C, C_aux)


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(B=st.integers(1, 2), pn=st.integers(1, 2), M=st.integers(1, 3), C_aux=st.sampled_from([8, 24]))
def test_module_hypothesis_shapes_triton(backend, B, pn, M, C_aux):
    _check_module("cpu", torch.float32, B, pn, M, 16, C_aux)


# ------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("images,aux,exc,match", [
    ((1, 10, 8), (1, 12, 6, 6), ValueError, "images must hold .* perfect square"),
    ((1, 9, 8), (1, 12, 7, 7), ValueError, "divisible into the 3x3"),
    ((1, 9, 8), (1, 12, 6, 9), ValueError, "square"),
    ((1, 9, 6), (1, 12, 6, 6), ValueError, "mm_hidden_size is 8"),
    ((1, 9, 8), (1, 10, 6, 6), ValueError, "mm_hidden_size_aux is 12"),
    ((2, 9, 8), (3, 12, 6, 6), ValueError, "batch"),
    ((9, 8), (1, 12, 6, 6), ValueError, "images must be 3-D"),
    ((1, 0, 8), (1, 12, 0, 0), ValueError, "images must hold .* perfect square"),
])
def test_bad_input(images, aux, exc, match):
    m = PatchInfoMining(8, 12)
    with pytest.raises(exc, match=match):
        m(torch.zeros(images), torch.zeros(aux))


def test_bad_input_dtype_and_op_args():
    m = PatchInfoMining(8, 12)
    with pytest.raises(TypeError, match="images_aux dtype"):
        m(torch.zeros(1, 9, 8), torch.zeros(1, 12, 6, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match="images_aux has 12 channels but u has 8"):
        ops_window_attention(torch.zeros(1, 9, 8), torch.zeros(1, 12, 6, 6))
    with pytest.raises(TypeError, match="u must have dtype"):
        ops_window_attention(torch.zeros(1, 9, 8, dtype=torch.int32), torch.zeros(1, 8, 6, 6))
    q = (torch.ones(8), torch.zeros(8), torch.zeros(8, 8), torch.zeros(8))
    k = (torch.ones(12), torch.zeros(12), torch.zeros(8, 11), torch.zeros(8))
    with pytest.raises(ValueError, match="key_params weight must have shape"):
        ops_patch_info_mining(torch.zeros(1, 9, 8), torch.zeros(1, 12, 6, 6), q, k, k)


# ------------------------------------------------------------------------------------ GPU, real shapes
@pytest.mark.cuda
@pytest.mark.parametrize("M,L", [(8, 576), (4, 576), (2, 64)])
def test_module_matches_original_bf16_real_shapes(M, L):
    _check_module("cuda", torch.bfloat16, 2, math.isqrt(L), M, C=1024, C_aux=2880 if M == 8 else 1536)


def test_fp16_large_key_bias_keeps_the_originals_logits():
    """fp16 with a key bias whose row constant q·bk exceeds fp16's range before the 1/sqrt(C') scale but not
    after it (the original scales its keys first): the logits stay finite, as the original's, so no row falls
    back to uniform weights (before: error 1.6 against fp64, against 9e-4 for the original)."""
    import copy
    torch.manual_seed(0)
    C, C_aux = 64, 32
    orig = original.UniModules(C, C_aux)
    with torch.no_grad():
        orig.vlm_uni_query_projector[1].bias.fill_(3.0)
        orig.vlm_uni_aux_projector[1].weight.mul_(20)
        orig.vlm_uni_aux_projector[1].bias.fill_(400.0)      # q·bk ≈ 3·400·64 = 76800 > 65504
    ours = PatchInfoMining(C, C_aux)
    ours.load_state_dict(orig.state_dict(), strict=True)
    x, aux = torch.randn(2, 4, C), torch.randn(2, C_aux, 8, 8)
    exact = copy.deepcopy(orig).double()(x.double(), aux.double())[1]
    base = copy.deepcopy(orig).half()(x.half(), aux.half())[1]
    got = copy.deepcopy(ours).half()(x.half(), aux.half())[1]
    assert_close(got, base, exact, name="embed_feat fp16")


def test_one_hr_map_for_every_row():
    """A batch-1 ``images_aux`` with batch-B ``images``: broadcast (stride-0 batch), as the original's matmuls do."""
    torch.manual_seed(0)
    ours = PatchInfoMining(16, 8)
    images, aux = torch.randn(3, 4, 16), torch.randn(1, 8, 8, 8)
    with torch.no_grad():
        got = ours(images, aux)[1]
        want = ours(images, aux.expand(3, -1, -1, -1).contiguous())[1]
    torch.testing.assert_close(got, want)


# ------------------------------------------------------------------ hooks, wrappers, replaced layers
PROJECTOR_NAMES = [f"vlm_uni_{p}_projector{s}" for p in ("query", "aux", "val") for s in ("", ".0", ".1")]


def _doubling_hook(module, args, out):
    return out * 2


def _plain_pair_and_inputs():
    torch.manual_seed(0)
    orig, ours = _pair(16, 24, "cpu", torch.float32)
    images, images_aux, _ = _inputs(2, 2, 3, 16, 24, "cpu", torch.float32)
    return orig, ours, images, images_aux


@pytest.mark.parametrize("name", PROJECTOR_NAMES)
def test_forward_hook_on_a_projector_fires_and_acts_as_in_the_original(name):
    """A hook on a projector or its LayerNorm / Linear (steering, ablation): the original calls that module, so
    the drop-in must too; reading its tensors instead skipped the hook silently (0.2-0.6 off)."""
    orig, ours, images, images_aux = _plain_pair_and_inputs()
    calls = []
    for m in (orig, ours):
        m.get_submodule(name).register_forward_hook(lambda mod, a, out: calls.append(tuple(a[0].shape)))
        m.get_submodule(name).register_forward_hook(_doubling_hook)
    want = orig(images, images_aux)[1]
    n_orig = len(calls)
    got = ours(images, images_aux)[1]
    assert calls[n_orig:] == calls[:n_orig]             # fired as often, on the same shapes
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_wrapped_or_replaced_projector_layers_act_as_in_the_original():
    """A PEFT-style adapter on a projector Linear and a LayerNorm subclass in a projector: called as the original
    calls them, so the output and the adapter's gradients are the original's."""
    from vlmkern.testing import adapt_

    class ShiftedLayerNorm(nn.LayerNorm):
        def forward(self, x):
            return super().forward(x) + 0.5

    orig, ours, images, images_aux = _plain_pair_and_inputs()
    runs = []
    for m in (orig, ours):
        torch.manual_seed(1)                            # the same adapter weights in both
        adapter = adapt_(m, "vlm_uni_aux_projector.1")
        with torch.no_grad():
            adapter.lora_B.weight.normal_()
        old = m.vlm_uni_val_projector[0]
        m.vlm_uni_val_projector[0] = ShiftedLayerNorm(old.normalized_shape, eps=old.eps)
        m.vlm_uni_val_projector[0].load_state_dict(old.state_dict())
        out = m(images, images_aux)[1]
        out.square().mean().backward()
        runs.append((out.detach(), adapter.lora_A.weight.grad, adapter.lora_B.weight.grad))
    for got, want in zip(runs[1], runs[0]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_global_forward_hooks_fire_as_in_the_original():
    """``register_module_forward_hook`` (every module): each projector module the original calls is called."""
    from torch.nn.modules.module import register_module_forward_hook
    orig, ours, images, images_aux = _plain_pair_and_inputs()
    seen = []
    handle = register_module_forward_hook(lambda mod, a, out: seen.append(mod))
    try:
        orig(images, images_aux)
        names_orig = sorted(n for n, m in orig.named_modules() if any(s is m for s in seen))
        seen.clear()
        ours(images, images_aux)
        names_ours = sorted(n for n, m in ours.named_modules() if any(s is m for s in seen))
    finally:
        handle.remove()
    assert names_orig == sorted([""] + PROJECTOR_NAMES)
    assert names_ours == names_orig


def test_fused_op_only_for_plain_projectors(monkeypatch):
    """The fused op stands in for plain projectors (the fast path stays), and not once one is hooked."""
    import vlmkern.models.mini_gemini as mgm
    calls = []
    monkeypatch.setattr(mgm, "patch_info_mining", lambda *a, **k: calls.append(1) or ops_patch_info_mining(*a, **k))
    orig, ours, images, images_aux = _plain_pair_and_inputs()
    torch.testing.assert_close(ours(images, images_aux)[1], orig(images, images_aux)[1], atol=1e-5, rtol=1e-4)
    assert calls == [1]
    handle = ours.vlm_uni_query_projector.register_forward_pre_hook(lambda mod, a: None)
    ours(images, images_aux)
    assert calls == [1]
    handle.remove()
    ours(images, images_aux)
    assert calls == [1, 1]
