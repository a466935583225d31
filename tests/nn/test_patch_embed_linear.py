"""PatchEmbedLinear: a drop-in nn.Linear for Fuyu's vision_embed_tokens, plus the fused forward_images path."""
import pytest
import torch
from torch import nn

from vlmkern import reference
from vlmkern.nn.patch_embed import PatchEmbedLinear, infer_patch_size
from vlmkern.testing import assert_close


def _pixels(B, H, W, C=3, device="cpu"):
    return torch.randint(0, 256, (B, C, H, W), dtype=torch.uint8, device=device)


def test_is_a_drop_in_linear():
    torch.manual_seed(1)
    ours = PatchEmbedLinear(2700, 64)
    torch.manual_seed(1)
    original = nn.Linear(2700, 64)
    assert isinstance(ours, nn.Linear)
    assert list(ours.state_dict()) == list(original.state_dict()) == ["weight", "bias"]
    for k, v in original.state_dict().items():  # same init from the same seed
        assert torch.equal(ours.state_dict()[k], v)
    ours.load_state_dict(original.state_dict(), strict=True)
    patches = torch.randn(2, 5, 2700)
    assert torch.equal(ours(patches), original(patches))
    assert ours.patch_size == 30
    no_bias = PatchEmbedLinear(12, 8, bias=False)
    assert list(no_bias.state_dict()) == ["weight"] and no_bias.patch_size == 2


def test_infer_patch_size():
    assert infer_patch_size(2700, 3) == 30
    assert infer_patch_size(100, 1) == 10
    assert infer_patch_size(100, 3) is None
    assert infer_patch_size(2700, 4) is None
    assert PatchEmbedLinear(100, 4).patch_size is None


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
@pytest.mark.parametrize("dtype, shape", [(torch.float32, (1, 61, 47)), (torch.bfloat16, (1, 61, 47)),
                                          (torch.float32, (2, 30, 30)), (torch.bfloat16, (1, 1, 1))])
def test_forward_images_matches_linear_on_patches(backend, device, dtype, shape):
    B, H, W = shape
    layer = PatchEmbedLinear(2700, 40).to(device=device, dtype=dtype)
    pixels = _pixels(B, H, W, device=device)
    out = layer.forward_images(pixels)
    nP = -(-H // 30) * -(-W // 30)
    assert out.shape == (B, nP, 40) and out.dtype == dtype
    baseline = layer(reference.patchify(pixels, 30, out_dtype=dtype))            # the unfused drop-in path
    ref = reference.patch_embed(pixels, layer.weight.double(), layer.bias.double())
    assert_close(out, baseline, ref, name="forward_images")


def test_single_image_input(device):
    layer = PatchEmbedLinear(2700, 8).to(device)
    pixels = _pixels(2, 31, 61, device=device)
    single = layer.forward_images(pixels[1])                                       # (C, H, W) -> (nP, out)
    assert single.shape == (6, 8)
    torch.testing.assert_close(single, layer.forward_images(pixels)[1])


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_forward_images_gradients(backend, device):
    layer = PatchEmbedLinear(3 * 8 * 8, 24).to(device)
    pixels = (torch.rand(2, 3, 19, 13, device=device) * 255).requires_grad_(True)
    grad = torch.randn(2, 3 * 2, 24, device=device)
    layer.forward_images(pixels).backward(grad)
    ours = (pixels.grad, layer.weight.grad, layer.bias.grad)

    def grads(px, w, b):
        px, w, b = (t.detach().clone().requires_grad_(True) for t in (px, w, b))
        reference.patch_embed(px, w, b, patch_size=8).backward(grad.to(w.dtype))
        return px.grad, w.grad, b.grad

    base = grads(pixels, layer.weight, layer.bias)
    exact = grads(pixels.double(), layer.weight.double(), layer.bias.double())
    for name, o, b_, e in zip(("pixels", "weight", "bias"), ours, base, exact):
        assert_close(o, b_, e, kind="grad", dtype=torch.float32, name=f"d{name}")


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_patch_size_inferred_from_channels_or_given(backend, device):
    layer = PatchEmbedLinear(100, 8).to(device)           # 1 channel x 10 x 10, or an explicit patch size
    gray = _pixels(1, 25, 21, C=1, device=device)
    out = layer.forward_images(gray)
    assert out.shape == (1, 9, 8)
    torch.testing.assert_close(out, layer(reference.patchify(gray, 10)))
    assert layer.forward_images(gray, patch_size=10).shape == (1, 9, 8)
    with pytest.raises(ValueError, match="patch_size"):
        layer.forward_images(_pixels(1, 25, 21, C=3, device=device))


def test_compiles_fullgraph(device):
    layer = PatchEmbedLinear(2700, 16).to(device)
    pixels = _pixels(1, 31, 29, device=device)
    fn = torch.compile(lambda x: layer.forward_images(x), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(fn(pixels), layer.forward_images(pixels))


def test_bad_input(device):
    layer = PatchEmbedLinear(2700, 16).to(device)
    with pytest.raises(ValueError, match="pixels has C=4 channels"):
        layer.forward_images(_pixels(1, 30, 30, C=4, device=device))
    with pytest.raises(ValueError, match="weight must have"):       # explicit patch size, wrong weight width
        layer.forward_images(_pixels(1, 30, 30, C=4, device=device), patch_size=30)
    with pytest.raises(TypeError, match="pixels"):
        layer.forward_images(torch.zeros(1, 3, 30, 30, dtype=torch.int32, device=device))
    with pytest.raises(TypeError, match="pixels"):
        layer.forward_images(torch.zeros(1, 3, 30, 30).numpy())     # an array, not a tensor (made on the host)
    with pytest.raises(ValueError, match="pixels"):
        layer.forward_images(torch.zeros(1, 3, 0, 30, dtype=torch.uint8, device=device))
    with pytest.raises(ValueError, match="pixels"):
        layer.forward_images(torch.zeros(30, 30, dtype=torch.uint8, device=device))
    with pytest.raises(ValueError, match="on meta"):
        layer.forward_images(torch.zeros(1, 3, 30, 30, dtype=torch.uint8, device="meta"))
    with pytest.raises(ValueError, match="patches"):
        layer(torch.randn(2, 2699, device=device))
    with pytest.raises(TypeError, match="patches"):
        layer([1.0] * 2700)
