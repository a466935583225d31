"""vlmkern.nn.PLoRA and the IXC2 InternLM2 decoder layer vs faithful ports of the originals
(:mod:`vlmkern.reference.originals.internlm_xcomposer2`)."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vlmkern.models.internlm_xcomposer2 import InternLM2DecoderLayer
from vlmkern.nn.plora import PLoRA
from vlmkern.reference import routed_linear as ref
from vlmkern.reference.originals.internlm_xcomposer2 import InternLM2DecoderLayer as OrigInternLM2Layer, PLoRA as OriginalPLoRA
from vlmkern.testing import assert_close, assert_no_host_sync


KEYS = {"weight", "bias", "Plora_A.weight", "Plora_B.weight"}
PARAMS = ("weight", "bias", "Plora_A.weight", "Plora_B.weight")


def _pair(in_f, out_f, r, dtype, device, bias=True, dropout=0.05):
    ours = PLoRA(in_f, out_f, bias=bias, lora_r=r, lora_alpha=2 * r, lora_dropout=dropout, lora_len=576)
    with torch.no_grad():  # B is not zero-initialised in the original either: make the adapter matter
        ours.Plora_B.weight.normal_(0, 0.3)
    ours = ours.to(device=device, dtype=dtype)
    orig = OriginalPLoRA(in_f, out_f, bias=bias, lora_r=r, lora_alpha=2 * r, lora_dropout=dropout,
                         device=device, dtype=dtype)
    orig.load_state_dict(ours.state_dict(), strict=True)
    return ours, orig


def _mask(kind, B, N, device):
    m = torch.zeros(B, N, dtype=torch.bool, device=device)
    if kind == "some":
        m[0, 2:19] = True
        m[1, :7] = True
    elif kind == "all":
        m[:] = True
    elif kind == "single":
        m[1, N - 1] = True
    return m


def _forward_backward(module, x, mask, grad):
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    y = module(x, mask)
    y.backward(grad.to(y.dtype))
    params = dict(module.named_parameters())
    return y.detach(), x.grad, [None if params[n].grad is None else params[n].grad.clone() for n in PARAMS]


def test_state_dict_keys_and_strict_load_both_ways():
    ours, orig = _pair(16, 24, 8, torch.float32, "cpu")
    assert set(ours.state_dict()) == set(orig.state_dict()) == KEYS
    ours2 = PLoRA(16, 24, lora_r=8, lora_alpha=16)
    ours2.load_state_dict(orig.state_dict(), strict=True)
    for k in KEYS:
        assert torch.equal(ours2.state_dict()[k], orig.state_dict()[k])
    no_bias = PLoRA(16, 24, bias=False, lora_r=8)
    assert set(no_bias.state_dict()) == KEYS - {"bias"}
    assert isinstance(ours, nn.Linear) and ours.lora_scaling == 2.0 and ours.lora_len == 576


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["none", "some", "all", "single"])
def test_parity_with_original_eval(backend, device, dtype, kind):
    ours, orig = _pair(32, 40, 16, dtype, device)
    exact = OriginalPLoRA(32, 40, lora_r=16, lora_alpha=32, device=device, dtype=torch.float64)
    exact.load_state_dict(ours.state_dict())
    for m in (ours, orig, exact):
        m.eval()
    x = torch.randn(2, 23, 32, device=device).to(dtype)
    mask = _mask(kind, 2, 23, device)
    grad = torch.randn(2, 23, 40, device=device)
    o = _forward_backward(ours, x, mask, grad)
    b = _forward_backward(orig, x, mask, grad)
    e = _forward_backward(exact, x.double(), mask, grad.double())
    assert o[0].dtype == dtype
    assert_close(o[0], b[0], e[0], name="y")
    assert_close(o[1], b[1], e[1], kind="grad", dtype=dtype, name="dx")
    for name, go, gb, ge in zip(PARAMS, o[2], b[2], e[2]):
        assert_close(go, gb, ge, kind="grad", dtype=dtype, name=f"d{name}")


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_no_mask_matches_original(backend, device):
    ours, orig = _pair(16, 24, 16, torch.float32, device)
    x = torch.randn(2, 5, 16, device=device)
    grad = torch.randn(2, 5, 24, device=device)
    o, b = _forward_backward(ours, x, None, grad), _forward_backward(orig, x, None, grad)
    torch.testing.assert_close(o[0], b[0])
    assert o[2][2] is None and o[2][3] is None and b[2][2] is None and b[2][3] is None


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_training_dropout_matches_reference_with_same_generator_state(backend, device):
    ours, _ = _pair(24, 32, 16, torch.float32, device, dropout=0.25)
    ours.train()
    x = torch.randn(2, 11, 24, device=device)
    mask = _mask("some", 2, 11, device)
    grad = torch.randn(2, 11, 32, device=device)
    torch.manual_seed(5)
    o = _forward_backward(ours, x, mask, grad)
    leaves = [p.detach().double().requires_grad_(True) for p in (ours.weight, ours.bias, ours.Plora_A.weight,
                                                                 ours.Plora_B.weight)]
    xe = x.double().requires_grad_(True)
    torch.manual_seed(5)
    ye = ref.partial_lora_linear(xe, *leaves, mask, ours.lora_scaling, 0.25, True)
    ye.backward(grad.double())
    torch.testing.assert_close(o[0].double(), ye, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(o[1].double(), xe.grad, rtol=1e-5, atol=1e-5)
    for name, g, leaf in zip(PARAMS, o[2], leaves):
        torch.testing.assert_close(g.double(), leaf.grad, rtol=1e-5, atol=1e-4, msg=lambda m: f"{name}: {m}")
    ours.eval()
    assert not torch.equal(ours(x, mask), o[0])  # eval mode: no dropout


@pytest.mark.parametrize("backend", ["triton", "reference"], indirect=True)
def test_fp16_no_image_overflow_is_not_nan(backend, device):
    ours, orig = _pair(32, 16, 16, torch.float16, device, bias=False)
    with torch.no_grad():
        for m in (ours, orig):
            m.weight.fill_(0.01)
            m.Plora_A.weight.fill_(100.0)
            m.Plora_B.weight.fill_(1.0)
    x = torch.full((1, 6, 32), 30.0, device=device).half()
    mask = torch.zeros(1, 6, dtype=torch.bool, device=device)
    with torch.no_grad():
        assert torch.isnan(orig.eval()(x, mask)).any()
        y = ours.eval()(x, mask)
    assert torch.isfinite(y).all() and torch.equal(y, F.linear(x, ours.weight))


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_flattened_mask_and_dropout_zero(backend, device):
    ours, orig = _pair(16, 24, 16, torch.float32, device, dropout=0.0)
    assert isinstance(ours.lora_dropout, nn.Identity) and ours.lora_dropout_p == 0.0
    x = torch.randn(2, 7, 16, device=device)
    mask = _mask("some", 2, 7, device)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, mask.reshape(-1)), orig(x, mask))


@pytest.mark.parametrize("shape", [(7, 2), (1, 14), (14, 1)])
def test_a_mask_of_another_shape_with_as_many_elements_is_refused(shape):
    """Only ``(B, N)`` or the flattened ``(B*N,)``: a sequence-first ``(N, B)`` mask read in memory order would
    route other tokens than the original's ``x[im_mask]`` (which raises there)."""
    ours, _ = _pair(16, 24, 16, torch.float32, "cpu", dropout=0.0)
    mask = _mask("some", 2, 7, "cpu").t().contiguous().reshape(shape)
    with pytest.raises(ValueError, match="im_mask"):
        ours(torch.randn(2, 7, 16), mask)


@pytest.mark.parametrize("backend", ["triton", "reference"], indirect=True)
def test_compile_fullgraph(backend, device):
    torch._dynamo.reset()
    ours, _ = _pair(16, 24, 16, torch.float32, device)
    ours.eval()
    x = torch.randn(2, 7, 16, device=device)
    mask = _mask("some", 2, 7, device)
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    compiled(x, mask).sum().backward()
    g = ours.Plora_A.weight.grad.clone()
    ours.zero_grad()
    ours(x, mask).sum().backward()
    torch.testing.assert_close(g, ours.Plora_A.weight.grad, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------ InternLM2 decoder layer with PLoRA (``modeling_internlm2.py``)
LAYER_CONFIG = SimpleNamespace(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                               rms_norm_eps=1e-5, bias=False, hidden_act="silu", rope_theta=10000.0,
                               max_position_embeddings=2048)
LORA = dict(lora_r=16, lora_alpha=16, lora_len=1225)


def _layer_inputs(device, dtype, B=2, L=21):
    mask = torch.zeros(B, L, dtype=torch.bool, device=device)
    mask[0, 3:15] = True   # text, image run, text
    mask[1, :9] = True     # image first
    causal = torch.full((L, L), torch.finfo(dtype).min, device=device).triu(1)[None, None].expand(B, 1, L, L)
    pos = torch.arange(L, device=device)[None].expand(B, L)
    return mask, causal, pos


def test_decoder_layer_state_dict_matches_original_names():
    ours, orig = InternLM2DecoderLayer(LAYER_CONFIG, **LORA), OrigInternLM2Layer(LAYER_CONFIG, **LORA)
    assert set(ours.state_dict()) == set(orig.state_dict())
    assert {"attention.wqkv.Plora_A.weight", "feed_forward.w2.Plora_B.weight", "attention_norm.weight",
            "ffn_norm.weight"} <= set(ours.state_dict())
    orig.load_state_dict(ours.state_dict(), strict=True)
    with_bias = InternLM2DecoderLayer(SimpleNamespace(**{**vars(LAYER_CONFIG), "bias": True}))
    assert "attention.wqkv.bias" in with_bias.state_dict() and "feed_forward.w1.bias" not in with_bias.state_dict()
    assert with_bias.attention.wqkv.lora_r == 256 and with_bias.attention.wqkv.lora_scaling == 1.0


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["some", "none"])
def test_decoder_layer_end_to_end_matches_original(backend, device, dtype, kind):
    ours = InternLM2DecoderLayer(LAYER_CONFIG, **LORA).to(device)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "Plora_B" in name or "norm" in name:
                p.normal_(1.0 if "norm" in name else 0.0, 0.2)
    orig = OrigInternLM2Layer(LAYER_CONFIG, **LORA).to(device)
    orig.load_state_dict(ours.state_dict(), strict=True)
    exact = OrigInternLM2Layer(LAYER_CONFIG, **LORA).to(device).double()
    exact.load_state_dict(ours.state_dict(), strict=True)
    ours, orig = ours.to(dtype), orig.to(dtype)
    for m in (ours, orig, exact):
        m.eval()
    im_mask, causal, pos = _layer_inputs(device, dtype)
    if kind == "none":
        im_mask = torch.zeros_like(im_mask)
    x = torch.randn(2, 21, 64, device=device)
    grad = torch.randn(2, 21, 64, device=device)

    def run(module, xx, mask):
        module.zero_grad(set_to_none=True)
        xx = xx.detach().clone().requires_grad_(True)
        y = module(xx, mask, pos, im_mask=im_mask)[0]
        y.backward(grad.to(y.dtype))
        return y.detach(), xx.grad, {n: p.grad for n, p in module.named_parameters()}

    o = run(ours, x.to(dtype), causal.to(dtype))
    b = run(orig, x.to(dtype), causal.to(dtype))
    e = run(exact, x.double(), torch.full_like(causal, float("-inf"), dtype=torch.float64).triu(1))
    assert_close(o[0], b[0], e[0], name="y")
    assert_close(o[1], b[1], e[1], kind="grad", dtype=dtype, name="dx")
    assert set(o[2]) == set(e[2])
    for name in e[2]:
        assert_close(o[2][name], b[2][name], e[2][name], kind="grad", dtype=dtype, name=f"d{name}")


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_decoder_layer_outputs_and_training_step(backend, device):
    layer = InternLM2DecoderLayer(LAYER_CONFIG, **LORA).to(device)
    im_mask, causal, pos = _layer_inputs(device, torch.float32)
    x = torch.randn(2, 21, 64, device=device)
    h, w, (k, v) = layer(x, causal, None, output_attentions=True, use_cache=True, im_mask=im_mask)
    assert h.shape == x.shape and w.shape == (2, 4, 21, 21) and k.shape == v.shape == (2, 2, 21, 16)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, 21, device=device))
    layer.eval()
    with torch.no_grad():
        h_sdpa = layer(x, causal, pos, im_mask=im_mask)[0]
        h_eager = layer(x, causal, pos, output_attentions=True, im_mask=im_mask)[0]
    torch.testing.assert_close(h_sdpa, h_eager, rtol=1e-4, atol=1e-5)
    layer.train()  # dropout on every adapter input; gradients reach every LoRA matrix
    layer(x, causal, pos, im_mask=im_mask)[0].square().mean().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    with pytest.raises(NotImplementedError, match="past_key_value"):
        layer(x, causal, pos, past_key_value=object(), im_mask=im_mask)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_cuda_decoder_layer_training_step_has_no_host_sync(backend):
    cfg = SimpleNamespace(**{**vars(LAYER_CONFIG), "hidden_size": 256, "intermediate_size": 512})
    layer = InternLM2DecoderLayer(cfg, lora_r=64, lora_alpha=64).cuda().bfloat16().train()
    im_mask, causal, pos = _layer_inputs("cuda", torch.bfloat16, B=2, L=300)
    x = torch.randn(2, 300, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def step():
        layer(x, causal, pos, im_mask=im_mask)[0].float().square().mean().backward()

    assert_no_host_sync(step)


# ------------------------------------------------------------------------------------------ from_linear
def test_from_linear_leaves_every_row_unchanged_until_trained():
    linear = nn.Linear(24, 20).eval()
    linear.bias.requires_grad_(False)
    layer = PLoRA.from_linear(linear, lora_r=4, lora_alpha=8)
    assert (layer.weight.dtype, layer.training, layer.lora_scaling, layer.lora_dropout_p) == (torch.float32, False,
                                                                                               2.0, 0.0)
    assert layer.weight.requires_grad and not layer.bias.requires_grad
    assert torch.count_nonzero(layer.Plora_B.weight) == 0 and torch.count_nonzero(layer.Plora_A.weight) > 0
    x, m = torch.randn(2, 7, 24, dtype=torch.float32), torch.rand(2, 7) < 0.5
    torch.testing.assert_close(layer(x, m), linear(x), rtol=0, atol=0)
    assert layer.weight.data_ptr() != linear.weight.data_ptr()        # a copy: training one leaves the other
    fresh = PLoRA(24, 20, lora_r=4, lora_alpha=8)             # the original's init: B is random
    fresh.load_state_dict({"weight": linear.weight, "bias": linear.bias}, strict=False)
    with torch.no_grad():
        assert not torch.allclose(fresh(x, m)[m], linear(x)[m])
    with pytest.raises(TypeError, match="linear must be an nn.Linear, got Conv1d"):
        PLoRA.from_linear(nn.Conv1d(2, 2, 1))


def test_rope_angles_stay_fp32_after_a_bf16_cast():
    """``.to(torch.bfloat16)`` casts the ``inv_freq`` buffer; the angles must still come from fp32 frequencies,
    as the original's table (built in fp32, values cast): cos / sin of far positions equal the fp32 ones rounded
    to bf16 (before: bf16 frequencies put position 8000 off by radians)."""
    from vlmkern.models.internlm_xcomposer2 import InternLM2RotaryEmbedding
    rope = InternLM2RotaryEmbedding(128, max_position_embeddings=8192, base=1_000_000)
    pos = torch.tensor([[0, 1, 511, 4095, 8191]])
    want_cos, want_sin = rope(pos, torch.float32)
    rope = rope.to(torch.bfloat16)
    assert rope.inv_freq.dtype == torch.bfloat16        # the buffer is cast, as transformers casts buffers
    cos, sin = rope(pos, torch.bfloat16)
    assert torch.equal(cos, want_cos.to(torch.bfloat16)) and torch.equal(sin, want_sin.to(torch.bfloat16))


def test_fp32_mask_in_a_bf16_layer_keeps_pad_rows_as_the_original():
    """An HF-style fp32 mask (finfo(fp32).min, a left-padded sample whose first rows see no key) into a bf16 layer:
    the original adds it in fp32; cast to bf16 its minimum became -inf (pad rows 0.39 off, the original 0.02)."""
    c = SimpleNamespace(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                        rms_norm_eps=1e-6, bias=False, hidden_act="silu", rope_theta=10000,
                        max_position_embeddings=2048)
    lora = dict(lora_r=8, lora_alpha=16, lora_dropout=0.0)
    torch.manual_seed(0)
    ours = InternLM2DecoderLayer(c, **lora).eval()
    orig = OrigInternLM2Layer(c, **lora).eval()
    orig.load_state_dict(ours.state_dict(), strict=True)
    exact = OrigInternLM2Layer(c, **lora).double().eval()
    exact.load_state_dict(ours.state_dict(), strict=True)
    B, L, pad = 2, 11, 3
    x, pos = torch.randn(B, L, 64), torch.arange(L)[None].repeat(B, 1)
    im = torch.zeros(B, L, dtype=torch.bool)
    im[0, 2:7] = True
    low = torch.finfo(torch.float32).min
    mask = torch.full((L, L), low).triu(1)[None, None].repeat(B, 1, 1, 1)
    mask[1, :, :, :pad] = low
    with torch.no_grad():
        got = ours.to(torch.bfloat16)(x.bfloat16(), mask, pos, im_mask=im)[0]
        base = orig.to(torch.bfloat16)(x.bfloat16(), mask, pos, im_mask=im)[0]
        ref = exact(x.double(), mask.double(), pos, im_mask=im)[0]
    assert_close(got[1, :pad], base[1, :pad], ref[1, :pad], name="pad rows")
    assert_close(got, base, ref, name="y")


class _HalfDropout(nn.Module):
    """A replacement dropout the fused path does not take (not an nn.Dropout)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        return F.dropout(x, self.p, self.training)


def test_repr_names_the_dropout_in_use():
    layer = PLoRA(8, 4, lora_r=2, lora_alpha=4, lora_dropout=0.1)
    assert "lora_r=2, lora_alpha=4, lora_dropout=0.1" in repr(layer)
    layer.lora_dropout = _HalfDropout(0.25)      # swapped in: the modules path runs it, and the repr says so
    assert "lora_dropout=0.25" in repr(layer)
    assert "lora_dropout=0.0" in repr(PLoRA(8, 4, lora_r=2, lora_dropout=0.0))
