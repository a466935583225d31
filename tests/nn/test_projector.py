"""Linear + fused GELU (vlmkern::linear_gelu) and the MLPProjector drop-in."""
import pytest
import torch
from torch import nn

from vlmkern import ops, reference
from vlmkern.nn import MLPProjector
from vlmkern.testing import assert_close

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _grads(fn, *tensors, grad):
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves)
    out.backward(grad.to(out.dtype))
    return out.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,N", [(1, 32, 48), (65, 40, 130), (257, 24, 16)])
def test_linear_gelu_matches_reference(backend, device, dtype, M, K, N):
    x = torch.randn(M, K, device=device).to(dtype)
    w = (torch.randn(N, K, device=device) / K ** 0.5).to(dtype)
    b = torch.randn(N, device=device).to(dtype)
    grad = torch.randn(M, N, device=device)
    out, g = _grads(ops.linear_gelu, x, w, b, grad=grad)
    base, gb = _grads(reference.linear_gelu, x, w, b, grad=grad)
    exact, ge = _grads(reference.linear_gelu, x.double(), w.double(), b.double(), grad=grad)
    assert_close(out, base, exact, name="out")
    for name, o, bb, e in zip("xwb", g, gb, ge):
        assert_close(o, bb, e, kind="grad", dtype=dtype, name=f"d{name}")


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_linear_gelu_batched_non_contiguous_no_bias(backend, device):
    x = torch.randn(3, 40, 17, device=device).transpose(1, 2)  # (3, 17, 40) non-contiguous
    w = torch.randn(24, 40, device=device) / 40 ** 0.5
    out = ops.linear_gelu(x, w)
    assert out.shape == (3, 17, 24)
    assert_close(out, reference.linear_gelu(x, w), reference.linear_gelu(x.double(), w.double()))


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_zero_rows(backend, device):
    out = ops.linear_gelu(torch.randn(0, 32, device=device), torch.randn(16, 32, device=device))
    assert out.shape == (0, 16)


def test_opcheck_and_compile(device):
    x = torch.randn(5, 32, device=device, requires_grad=True)
    w = torch.randn(16, 32, device=device, requires_grad=True)
    b = torch.randn(16, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.vlmkern.linear_gelu.default, (x, w, b, True))
    torch.library.opcheck(torch.ops.vlmkern.linear_gelu.default, (x.detach(), w.detach(), None, False))
    torch._dynamo.reset()
    f = torch.compile(lambda x, w, b: ops.linear_gelu(x, w, b).sum(), fullgraph=True, backend="aot_eager")
    f(x, w, b).backward()
    gx = x.grad.clone()
    x.grad = None
    reference.linear_gelu(x, w, b).sum().backward()
    torch.testing.assert_close(gx, x.grad)


@pytest.mark.parametrize("bad,exc,match", [
    (dict(w=torch.zeros(8, 31)), ValueError, "in_features=31"),
    (dict(w=torch.zeros(8, 32, dtype=torch.float16)), TypeError, "weight dtype"),
    (dict(b=torch.zeros(9)), ValueError, "bias must have out_features=8"),
    (dict(x=torch.zeros(4, 32, dtype=torch.int32)), TypeError, "x must have dtype"),
    (dict(w=torch.zeros(8, 32, 1)), ValueError, "weight must be 2-D"),
])
def test_bad_input(bad, exc, match):
    args = dict(x=torch.zeros(4, 32), w=torch.zeros(8, 32), b=None)
    args.update(bad)
    with pytest.raises(exc, match=match):
        ops.linear_gelu(args["x"], args["w"], args["b"])


def _llava_projector(i, h, o):
    return nn.Sequential(nn.Linear(i, h), nn.GELU(), nn.Linear(h, o))


def test_projector_loads_both_layouts_and_matches():
    llava = _llava_projector(24, 40, 32)
    ours = MLPProjector(24, 40, 32)
    ours.load_state_dict(llava.state_dict(), strict=True)
    x = torch.randn(2, 7, 24)
    torch.testing.assert_close(ours(x), llava(x))
    assert set(ours.state_dict()) == {"linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias"}
    again = MLPProjector(24, 40, 32)
    again.load_state_dict(ours.state_dict(), strict=True)
    torch.testing.assert_close(again(x), llava(x))


def test_projector_matches_transformers_llava_projector():
    transformers = pytest.importorskip("transformers")
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector
    cfg = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=1,
                                                    num_attention_heads=2, image_size=28, patch_size=14),
        text_config=transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, num_key_value_heads=2, vocab_size=64),
        projector_hidden_act="gelu", vision_feature_layer=-2)
    hf = LlavaMultiModalProjector(cfg)
    ours = MLPProjector(24, 32, 32)
    ours.load_state_dict(hf.state_dict(), strict=True)
    x = torch.randn(2, 5, 24, requires_grad=True)
    out_hf = hf(x)
    out = ours(x)
    torch.testing.assert_close(out, out_hf)
    g = torch.randn_like(out)
    (gx_hf,) = torch.autograd.grad(out_hf, x, g)
    (gx,) = torch.autograd.grad(out, x, g)
    torch.testing.assert_close(gx, gx_hf)


# ------------------------------------------------------------------------------------ construction parity
def _hf_config(feature_layer=-2, act="gelu", bias=True):
    transformers = pytest.importorskip("transformers")
    return transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=1,
                                                    num_attention_heads=2, image_size=28, patch_size=14),
        text_config=transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, num_key_value_heads=2, vocab_size=64),
        projector_hidden_act=act, vision_feature_layer=feature_layer, multimodal_projector_bias=bias)


@pytest.mark.parametrize("feature_layer, act, bias", [(-2, "gelu", True), ([-2, -5], "gelu", False),
                                                      (-2, "gelu_pytorch_tanh", True)])
def test_built_from_a_transformers_config_as_llava_multimodal_projector(feature_layer, act, bias):
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector
    cfg = _hf_config(feature_layer, act, bias)
    torch.manual_seed(0)
    hf = LlavaMultiModalProjector(cfg)
    torch.manual_seed(0)
    ours = MLPProjector(cfg)
    assert [n for n, _ in ours.named_modules()] == [n for n, _ in hf.named_modules()]
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in hf.state_dict().items()}
    for k, v in hf.state_dict().items():      # same draws in the same order
        assert torch.equal(ours.state_dict()[k], v), k
    x = torch.randn(2, 5, hf.linear_1.in_features)
    torch.testing.assert_close(ours(x), hf(x))
    assert type(MLPProjector.from_config(cfg)) is MLPProjector


def test_built_from_an_original_llava_config_in_its_layout():
    from types import SimpleNamespace
    cfg = SimpleNamespace(mm_hidden_size=24, hidden_size=32, mm_projector_type="mlp2x_gelu")
    ours = MLPProjector(cfg)
    original = _llava_projector(24, 32, 32)      # LLaVA's build_vision_projector for mlp2x_gelu
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in original.named_parameters()]
    assert [type(m) for m in ours] == [type(m) for m in original] and len(ours) == 3
    with pytest.raises(ValueError, match="mm_projector_type"):
        MLPProjector(SimpleNamespace(mm_hidden_size=24, hidden_size=32, mm_projector_type="linear"))
    with pytest.raises(TypeError, match="in_features"):
        MLPProjector("24", 32)


def test_llava_layout_names_index_and_saves_what_llava_loads():
    """LLaVA's trainer saves ``mm_projector.bin`` from ``named_parameters()`` and loads it into the
    ``nn.Sequential`` strictly; freezing by name prefix must find the same parameters."""
    ours = MLPProjector(24, 40, 32, saved_layout="llava")
    assert [n for n, _ in ours.named_parameters()] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert ours[0] is ours.linear_1 and ours[2] is ours.linear_2 and isinstance(ours[1], nn.GELU)
    original = _llava_projector(24, 40, 32)
    original.load_state_dict({n: p.detach() for n, p in ours.named_parameters()}, strict=True)
    x = torch.randn(3, 24)
    torch.testing.assert_close(ours(x), original(x))
    for n, p in ours.named_parameters():
        p.requires_grad_(not n.startswith("0."))
    assert not ours[0].weight.requires_grad and ours[2].weight.requires_grad
    hf = MLPProjector(24, 40, 32)                 # the other layout loads it, and back
    hf.load_state_dict(ours.state_dict(), strict=True)
    ours.load_state_dict(hf.state_dict(), strict=True)


@pytest.mark.parametrize("layout", ["transformers", "llava"])
def test_a_replaced_or_hooked_activation_is_called(layout):
    ours = MLPProjector(24, 40, 32, saved_layout=layout)
    x = torch.randn(3, 24)
    name = "act" if layout == "transformers" else "1"
    setattr(ours, name, nn.ReLU())
    torch.testing.assert_close(ours(x), ours.linear_2(torch.relu(ours.linear_1(x))))
    setattr(ours, name, nn.GELU())
    seen = []
    ours.act.register_forward_hook(lambda m, i, o: seen.append(o.shape) or o * 0)
    torch.testing.assert_close(ours(x), ours.linear_2(torch.zeros(3, 40)).expand(3, 32))
    assert seen == [(3, 40)]


def test_copies_and_pickles():
    import copy
    import pickle
    ours = MLPProjector(24, 40, 32, saved_layout="llava")
    x = torch.randn(2, 24)
    for twin in (copy.deepcopy(ours), pickle.loads(pickle.dumps(ours))):
        torch.testing.assert_close(twin(x), ours(x))
        assert [n for n, _ in twin.named_parameters()] == [n for n, _ in ours.named_parameters()]


def test_a_linear_whose_forward_was_wrapped_on_the_instance_is_called():
    """accelerate's hooks (device_map dispatch, offloading) replace ``module.forward`` on the instance instead of
    registering torch hooks; an offloaded Linear's weight stays on meta until that wrapper runs."""
    ours = MLPProjector(24, 40, 32)
    x = torch.randn(3, 24)
    want = ours.linear_2(nn.functional.gelu(ours.linear_1(x) * 2))
    first, plain_forward = ours.linear_1, ours.linear_1.forward
    first.forward = lambda t: plain_forward(t) * 2           # what accelerate's add_hook_to_module does
    torch.testing.assert_close(ours(x), want)
