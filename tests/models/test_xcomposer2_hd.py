"""InternLM-XComposer2-4KHD: HD_transform and the fused layout + projector against the port of the original code
(:mod:`vlmkern.reference.originals.internlm_xcomposer2_hd`)."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

from vlmkern.models import internlm_xcomposer2_hd as ixc
from vlmkern.reference.originals import internlm_xcomposer2_hd as original
from vlmkern.testing import assert_close

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402


def _original(features, grids, glb, sub, vision_proj):
    seq, lens = original.tower_layout(features, grids, glb, sub)
    return list(torch.split(vision_proj(seq)[0], lens)), lens


# ------------------------------------------------------------------------------------------------ fixtures
S, C = 4, 8                      # 4x4 ViT tokens per tile (2x2 merged), width 8 -> merged 32
GRIDS = [(2, 3), (1, 2)]


def _inputs(dtype=torch.float32, grids=GRIDS, side=S, width=C, seed=0):
    g = torch.Generator().manual_seed(seed)
    tiles = sum(1 + h * w for h, w in grids)
    feats = torch.randn(tiles, side * side + 1, width, generator=g)[:, 1:].to(dtype)   # CLS dropped: strided
    glb = torch.randn(1, 1, 4 * width, generator=g).to(dtype)
    sub = torch.randn(1, 1, 1, 4 * width, generator=g).to(dtype)
    torch.manual_seed(seed)
    proj = nn.Sequential(nn.Linear(4 * width, 40), nn.GELU(), nn.Linear(40, 24)).to(dtype)
    return feats, glb, sub, proj


def _double(module):
    return copy.deepcopy(module).double()


# ----------------------------------------------------------------------------------------------- HD_transform
@pytest.mark.parametrize("wh,hd_num", [((500, 300), 4), ((300, 500), 4), ((337, 335), 6), ((1000, 90), 9),
                                       ((64, 64), 2), ((17, 700), 3), ((800, 600), 16)])
def test_hd_transform_matches_original(wh, hd_num):
    rng = np.random.default_rng(sum(wh))
    img = Image.fromarray(rng.integers(0, 256, (wh[1], wh[0], 3), dtype=np.uint8))
    ours = ixc.HD_transform(img, hd_num)
    theirs = original.hd_transform(img, hd_num)
    assert ours.size == theirs.size
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
    geo = ixc.hd_geometry(*wh, hd_num)
    assert geo.padded == ours.size
    assert geo.grid == (ours.size[1] // 336, ours.size[0] // 336)
    assert geo.grid[0] * geo.grid[1] <= hd_num


def test_spec_grids_and_token_counts():
    # IXC2-4KHD token counts (sizes are width x height).
    cases = {((1024, 768), 16): ((3, 4), 1921), ((1024, 768), 25): ((4, 5), 3085),
             ((1024, 768), 55): ((6, 8), 7141), ((3840, 2160), 55): ((6, 9), 8005),
             ((336, 336), 55): ((7, 7), 7297)}
    for (wh, hd_num), (grid, tokens) in cases.items():
        geo = ixc.hd_geometry(*wh, hd_num)
        assert geo.grid == grid and ixc.tokens_per_image(*grid) == tokens
    assert ixc.hd_geometry(768, 1024, 16).grid == (4, 3)   # portrait: transposed, tiles still row-major


def test_tower_inputs_match_original():
    img = torch.randn(1, 3, 336, 672)
    torch.testing.assert_close(ixc.tower_inputs(img), original.tower_images(img), rtol=0, atol=0)
    torch.testing.assert_close(ixc.tower_inputs(img[0]), original.tower_images(img), rtol=0, atol=0)


# --------------------------------------------------------------------------------------- layout + projector
@pytest.mark.parametrize("grids", [[(6, 8)], [(1, 1), (2, 3), (3, 1)]])
def test_layout_at_real_size_matches_original(grids):
    # 24x24 ViT tokens -> 12x12 merged, the (dy, dx, c) channel order; tiny C keeps it cheap.
    feats, glb, sub, _ = _inputs(grids=grids, side=24, width=2)
    ours = ixc.layout_tokens(feats, grids, glb, sub)
    theirs, lens = original.tower_layout(feats, grids, glb, sub)
    assert lens == [ixc.tokens_per_image(h, w) for h, w in grids]
    torch.testing.assert_close(ours, theirs[0], rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["triton", "reference"], indirect=True)
def test_fused_matches_original(backend, device):
    feats, glb, sub, proj = _inputs()
    with torch.no_grad():
        out, lens = ixc.project_and_pack(feats.to(device), GRIDS, glb.to(device), sub.to(device),
                                         copy.deepcopy(proj).to(device))
        ref, ref_lens = _original(feats, GRIDS, glb, sub, proj)
        exact, _ = _original(feats.double(), GRIDS, glb.double(), sub.double(), _double(proj))
    assert lens == ref_lens == [ixc.tokens_per_image(h, w, S) for h, w in GRIDS]
    for o, r, e in zip(out, ref, exact):
        assert_close(o, r, e, name="4KHD image embeddings")


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_low_precision(backend, device, dtype):
    feats, glb, sub, proj = _inputs()
    low = _double(proj).to(dtype)
    with torch.no_grad():
        out, _ = ixc.project_and_pack(feats.to(device, dtype), GRIDS, glb.to(device, dtype), sub.to(device, dtype),
                                      copy.deepcopy(low).to(device))
        base, _ = _original(feats.to(dtype), GRIDS, glb.to(dtype), sub.to(dtype), low)
        exact, _ = _original(feats.double(), GRIDS, glb.double(), sub.double(), _double(proj))
    for o, b, e in zip(out, base, exact):
        assert o.dtype == dtype
        assert_close(o, b, e, name=f"4KHD image embeddings {dtype}")


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_gradients_match_original(backend, device):
    feats0, glb0, sub0, proj0 = _inputs()

    def run(fn, dtype):
        feats, glb, sub = (t.detach().to(device, dtype).requires_grad_(True) for t in (feats0, glb0, sub0))
        proj = _double(proj0).to(device, dtype)
        out, _ = fn(feats, GRIDS, glb, sub, proj)
        g = torch.Generator().manual_seed(3)
        sum((o * torch.randn(o.shape, generator=g).to(device, dtype)).sum() for o in out).backward()
        return [feats.grad, glb.grad, sub.grad] + [p.grad for p in proj.parameters()]

    ours = run(ixc.project_and_pack, torch.float32)
    base = run(_original, torch.float32)
    exact = run(_original, torch.float64)
    for name, o, b, e in zip(["features", "glb_GN", "sub_GN", "W1", "b1", "W2", "b2"], ours, base, exact):
        assert_close(o, b, e, kind="grad", name=f"d{name}")


def test_list_input_packer_module_and_benchmark_baseline():
    feats, glb, sub, proj = _inputs()
    packer = ixc.InternLMXComposer2HDImagePacker(C, 40)
    packer.vision_proj = ixc.MLPProjector(4 * C, 40, 24)
    state = {"vision_proj." + k: v for k, v in proj.state_dict().items()}      # vision_proj.0.* / 2.*
    state.update(plora_glb_GN=glb, plora_sub_GN=sub)
    packer.load_state_dict(state, strict=True)
    parts = list(torch.split(feats, [1 + h * w for h, w in GRIDS]))
    with torch.no_grad():
        a, _ = packer(parts, GRIDS)
        b, _ = ixc.unfused_project_and_pack(feats, GRIDS, glb, sub, proj)
        r, _ = _original(feats, GRIDS, glb, sub, proj)
    for x, y, z in zip(a, b, r):
        torch.testing.assert_close(x, z, rtol=2e-5, atol=2e-6)
        torch.testing.assert_close(y, z, rtol=0, atol=0)


def test_benchmark_inputs_shapes():
    for hd_num, grid in ((16, (3, 4)), (55, (6, 8))):
        d = ixc.benchmark_inputs([(1024, 768)], hd_num, device="meta")
        assert d["grids"] == [grid] and d["features"].shape == (1 + grid[0] * grid[1], 576, 1024)
        assert d["glb_GN"].shape == (1, 1, 4096) and d["sub_GN"].shape == (1, 1, 1, 4096)


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("over,exc,match", [
    (dict(features=torch.randn(9, 16, C)), ValueError, "features has 9 tiles but grids \\[\\(2, 3\\), \\(1, 2\\)\\] "
                                                       "need 10"),
    (dict(features=[torch.randn(7, 16, C), torch.randn(2, 16, C)]), ValueError,
     "features\\[1\\] has 2 tiles but its grid 1x2 needs 1 \\+ 2"),
    (dict(features=[torch.randn(7, 16, C)]), ValueError, "features has 1 images but grids has 2"),
    (dict(features=torch.randn(10, 25, C)), ValueError, "even square number of tokens"),
    (dict(features=torch.randn(10, 15, C)), ValueError, "even square number of tokens"),
    (dict(features=torch.randn(10, 16, 6)), ValueError, "first Linear takes 32 features but .* 4C = 24"),
    (dict(features=torch.randn(10, 16, C, dtype=torch.float16)), TypeError, "features dtype"),
    (dict(glb=torch.randn(1, 1, 31)), ValueError, "glb_GN must hold one 4C = 32 vector"),
    (dict(sub=torch.randn(1, 1, 1, 33)), ValueError, "sub_GN must hold one 4C = 32 vector"),
    (dict(grids=[(2, 3), (0, 2)]), ValueError, "grids\\[1\\] must be an \\(h, w\\) pair"),
    (dict(proj=nn.Sequential(nn.Linear(32, 40), nn.SiLU(), nn.Linear(40, 24))), TypeError, "exact GELU"),
])
def test_bad_input(over, exc, match):
    feats, glb, sub, proj = _inputs()
    args = dict(features=feats, grids=GRIDS, glb=glb, sub=sub, proj=proj)
    args.update(over)
    with pytest.raises(exc, match=match):
        ixc.project_and_pack(args["features"], args["grids"], args["glb"], args["sub"], args["proj"])


def test_bad_hd_arguments():
    with pytest.raises(ValueError, match="hd_num must be a positive int"):
        ixc.hd_geometry(100, 100, 0)
    with pytest.raises(ValueError, match="multiples of 336"):
        ixc.tower_inputs(torch.randn(3, 336, 400))


def test_packer_saves_the_original_keys():
    """The original's ``vision_proj`` is ``nn.Sequential(Linear, GELU, Linear)``: the packer loads its keys and
    saves them (before: ``vision_proj.linear_1.*``, which the original could not load)."""
    from torch import nn

    from vlmkern.models.internlm_xcomposer2_hd import InternLMXComposer2HDImagePacker

    class Original(nn.Module):
        def __init__(self):
            super().__init__()
            self.vision_proj = nn.Sequential(nn.Linear(32, 24), nn.GELU(), nn.Linear(24, 24))
            self.plora_glb_GN = nn.Parameter(torch.randn(1, 1, 32))
            self.plora_sub_GN = nn.Parameter(torch.randn(1, 1, 1, 32))

    orig, packer = Original(), InternLMXComposer2HDImagePacker(8, 24)
    packer.load_state_dict(orig.state_dict(), strict=True)
    assert list(packer.state_dict()) == list(orig.state_dict())
    back = Original()
    back.load_state_dict(packer.state_dict(), strict=True)
    for (name, a), b in zip(orig.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), name


def test_projector_layouts():
    from vlmkern.nn import MLPProjector
    hf_keys = list(MLPProjector(4, 6, 5).state_dict())
    assert hf_keys == ["linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias"]
    llava = MLPProjector(4, 6, 5, saved_layout="llava")
    assert list(llava.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    MLPProjector(4, 6, 5).load_state_dict(llava.state_dict(), strict=True)
    with pytest.raises(ValueError, match="saved_layout"):
        MLPProjector(4, 6, 5, saved_layout="sequential")


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_hd_transform_takes_rgb_only(mode):
    """The original pads with fill=[255, 255, 255], which torchvision refuses for other modes (a palette image
    would otherwise be padded with index 255, not white)."""
    Image = pytest.importorskip("PIL.Image")
    from vlmkern.models.internlm_xcomposer2_hd import HD_transform
    with pytest.raises(ValueError, match=f"img must be an RGB PIL image, got mode '{mode}'"):
        HD_transform(Image.new(mode, (500, 300)), 16)


def test_grids_take_numpy_and_tensor_integers():
    np = pytest.importorskip("numpy")
    from vlmkern.models.internlm_xcomposer2_hd import _grids
    want = ((2, 3), (1, 1))
    assert _grids([(2, 3), (1, 1)]) == want
    assert _grids([(np.int64(2), np.int32(3)), (torch.tensor(1), 1)]) == want
    assert _grids(torch.tensor([[2, 3], [1, 1]])) == want
    assert _grids((2, 3)) == ((2, 3),)
    for bad in ([(2, True)], [(2.0, 3)], [(0, 3)], [(torch.tensor(True), 3)]):
        with pytest.raises(ValueError, match=r"grids\[0\] must be an \(h, w\) pair"):
            _grids(bad)
