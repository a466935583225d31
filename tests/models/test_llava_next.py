"""LLaVA-NeXT AnyRes: CPU helpers and the fused project_and_pack against transformers (tiny config, random weights)."""
import functools

import numpy as np
import pytest
import torch
from torch import nn

from vlmkern.models import llava_next as ln
from vlmkern.nn import MLPProjector
from vlmkern.testing import assert_close

transformers = pytest.importorskip("transformers")
from transformers.image_processing_utils import select_best_resolution as hf_select  # noqa: E402
from transformers.models.llava_next import modeling_llava_next as hf  # noqa: E402

# The v1.6 pinpoints scaled 336 -> 28 px tiles of 7 px patches: 4x4 = 16 tokens per tile.
PIN = [[28, 56], [56, 28], [56, 56], [84, 28], [28, 84]]
PIN_1X1 = PIN + [[28, 28]]
TILE, PATCH, SIDE = 28, 7, 4
IMAGE_TOKEN = 99
KW = dict(tile_size=TILE, patch_size=PATCH)
# (height, width): rows unpadded (wide), columns unpadded (tall), a tie between 28x56 and 56x28 (first wins),
# a 2x2 grid with an odd row slack, no unpadding at all.
SIZES = [(10, 50), (50, 11), (28, 28), (30, 40), (56, 56)]


@functools.lru_cache(maxsize=None)
def _hf_model(pinpoints: tuple):
    torch.manual_seed(0)
    cfg = transformers.LlavaNextConfig(
        vision_config=transformers.CLIPVisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                                                    num_attention_heads=2, image_size=TILE, patch_size=PATCH),
        text_config=transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, num_key_value_heads=2, vocab_size=100),
        image_grid_pinpoints=[list(p) for p in pinpoints], image_token_id=IMAGE_TOKEN,
        projector_hidden_act="gelu", vision_feature_layer=-2, vision_feature_select_strategy="default")
    return transformers.LlavaNextForConditionalGeneration(cfg).eval()


def _hf_pack(model, features_list, sizes, projector, newline):
    """transformers: projector on every tile, then pack_image_features."""
    projected = [projector(f) for f in features_list]
    out, lens = hf.LlavaNextModel.pack_image_features(model.model, projected, torch.tensor(sizes), "default",
                                                      image_newline=newline)
    return out, lens


def _features(sizes, pins, dtype=torch.float32, C=24):
    counts = [ln.num_tiles(s, pins, TILE) for s in sizes]
    full = torch.randn(sum(counts), SIDE * SIDE + 1, C)
    return full[:, 1:].to(dtype), counts      # CLS dropped: a strided view, as hidden_states[-2][:, 1:]


# ------------------------------------------------------------------------------------------- CPU helpers
def test_resolution_grid_and_tile_count_match_transformers():
    rng = np.random.default_rng(0)
    sizes = [tuple(int(v) for v in rng.integers(1, 2500, 2)) for _ in range(300)]
    sizes += [(336, 336), (672, 672), (336, 1008), (1, 1), (480, 640), (1080, 1920), (667, 1000)]
    for pins in (ln.LLAVA_NEXT_PINPOINTS, [list(p) for p in ln.LLAVA_NEXT_PINPOINTS][::-1]):
        pins_l = [list(p) for p in pins]
        for s in sizes:
            assert ln.select_best_resolution(s, pins) == tuple(hf_select(s, pins_l)), s
            assert ln.anyres_grid_shape(s, pins, 336) == tuple(hf.get_anyres_image_grid_shape(s, pins_l, 336))
            assert ln.num_tiles(s, pins, 336) == hf.image_size_to_num_patches(s, pins_l, 336)


def test_ties_pick_the_first_listed_pinpoint():
    # A square image fits 336x672 and 672x336 equally (same pixels kept, same waste): the first listed wins.
    assert ln.select_best_resolution((336, 336), ln.LLAVA_NEXT_PINPOINTS) == (336, 672)
    assert ln.select_best_resolution((336, 336), [(672, 336), (336, 672)]) == (672, 336)
    assert ln.select_best_resolution((28, 28), PIN) == (28, 56)


def test_unpad_bounds_match_transformers_unpad_image():
    rng = np.random.default_rng(1)
    for _ in range(300):
        oh, ow = (int(v) for v in rng.integers(1, 3000, 2))
        ch, cw = (24 * int(v) for v in rng.integers(1, 4, 2))
        grid = torch.arange(ch * cw).reshape(1, ch, cw)
        r0, r1, c0, c1 = ln.unpad_bounds((oh, ow), (ch, cw))
        torch.testing.assert_close(grid[:, r0:r1, c0:c1], hf.unpad_image(grid, (oh, ow)))


def _sweep(step_h=7, step_w=5, top=1500):
    return [(h, w) for h in range(1, top, step_h) for w in range(1, top, step_w)]


def test_llava_convention_matches_the_original_llava():
    """``convention="llava"``: (width, height) sizes and pinpoints and ``int(x)`` unpadding, as LLaVA's own
    ``mm_utils.py`` / ``llava_arch.py``. The default convention differs from it on some of these sizes (ties,
    rounding), which is what the option is for."""
    from vlmkern.reference.originals import llava as orig
    pins = [list(p) for p in ln.LLAVA_NEXT_PINPOINTS]        # the config's list, read as (W, H) by LLaVA
    differs = 0
    for wh in _sweep(13, 11) + [(336, 336), (88, 55)]:
        W, H = orig.select_best_resolution(wh, pins)
        assert ln.select_best_resolution(wh, pins, convention="llava") == (W, H), wh
        assert ln.anyres_grid_shape(wh, pins, 336, convention="llava") == orig.get_anyres_image_grid_shape(wh, pins,
                                                                                                            336)
        assert ln.num_tiles(wh, pins, 336, convention="llava") == (W // 336) * (H // 336) + 1
        grid = torch.arange((H // 14) * (W // 14)).reshape(1, H // 14, W // 14)
        r0, r1, c0, c1 = ln.unpad_bounds(wh, grid.shape[1:], convention="llava")
        assert torch.equal(grid[:, r0:r1, c0:c1], orig.unpad_image(grid, wh)), wh
        hf_way = ln.select_best_resolution(wh[::-1], pins)
        differs += hf_way != (H, W) or ln.unpad_bounds(wh[::-1], grid.shape[1:]) != (r0, r1, c0, c1)
    assert differs
    with pytest.raises(ValueError, match="convention"):
        ln.unpad_bounds((1, 1), (24, 24), convention="hf")


@pytest.mark.parametrize("backend", ["triton", "reference"], indirect=True)
def test_pack_in_the_llava_convention_matches_the_original_llava(backend, device):
    """Sizes where the conventions disagree: a square image (a tie between 336x672 and 672x336) and sizes whose
    unpadding rounds differently; the fused and unfused packing against the original's spatial_unpad merge."""
    from vlmkern.reference.originals import llava as orig
    pins = [list(p) for p in ln.LLAVA_NEXT_PINPOINTS]
    def grid(wh):
        W, H = orig.select_best_resolution(wh, pins)
        return H // 14, W // 14
    rounding = [wh for wh in _sweep(1, 1, 120)
                if ln.unpad_bounds(wh, grid(wh), convention="llava") != ln.unpad_bounds(wh[::-1], grid(wh))][:2]
    sizes = [(336, 336)] + rounding + [(300, 200)]           # (width, height), as PIL's image.size
    assert len(sizes) == 4
    interpreted = backend == "triton" and device == "cpu"
    sizes = sizes[:2] if interpreted else sizes               # the interpreter's time: the two disputed sizes
    torch.manual_seed(0)
    proj = MLPProjector(8, 16, 16).to(device)
    newline = torch.randn(16, device=device)
    counts = [ln.num_tiles(s, pins, convention="llava") for s in sizes]
    feats = torch.randn(sum(counts), 576, 8, device=device)
    with torch.no_grad():
        original = nn.Sequential(proj.linear_1, nn.GELU(), proj.linear_2)     # LLaVA's mm_projector, plain torch
        want = orig.pack_spatial_unpad(torch.split(original(feats), counts), sizes, pins, 336, newline)
        packs = (ln.project_and_pack,) if interpreted else (ln.project_and_pack, ln.unfused_project_and_pack)
        for pack in packs:
            out, lens = pack(feats, sizes, proj, newline, image_grid_pinpoints=pins, convention="llava")
            assert lens.tolist() == [w.shape[0] for w in want]
            for o, w in zip(out, want):
                torch.testing.assert_close(o, w, atol=1e-5, rtol=1e-5)
        if interpreted:
            return
        hf_lens = ln.project_and_pack(feats, [s[::-1] for s in sizes], proj, newline, image_grid_pinpoints=pins)[1]
        assert hf_lens.tolist() != lens.tolist()       # rounding: another row count in transformers' way
        packer = ln.LlavaNextImagePacker(8, 16, convention="llava").to(device)
        packer.multi_modal_projector.load_state_dict(proj.state_dict())
        packer.image_newline.data.copy_(newline)
        assert [o.shape[0] for o in packer(feats, sizes)[0]] == lens.tolist()


def test_real_config_token_counts_and_projector_work():
    # LLaVA-NeXT: 640x480 -> 2340, 1920x1080 -> 1948, 1000x667 -> 2144, max 2928 (sizes are (height, width)).
    expect = {(480, 640): (2340, 576), (1080, 1920): (1948, 960), (667, 1000): (2144, 768), (672, 672): (2928, 0)}
    for size, (tokens, skipped) in expect.items():
        work = ln.projector_work(size)
        assert ln.packed_length(size) == work["packed_tokens"] == tokens
        assert work["reference"] == 5 * 576 and work["skipped"] == skipped
        assert work["projected"] + work["skipped"] == work["reference"]


def _pil_processor():
    try:
        from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
    except ImportError:
        pytest.skip("this transformers has no PIL-backend LlavaNextImageProcessorPil")
    return LlavaNextImageProcessorPil()


@pytest.mark.parametrize("hw", [(45, 97), (100, 31), (28, 28), (57, 57), (13, 200)])
def test_resize_pad_and_tiles_match_the_processor(hw):
    proc = _pil_processor()
    from PIL import Image

    image = torch.randint(0, 256, (3, *hw), dtype=torch.uint8)
    theirs = proc.get_image_patches(image.numpy(), PIN, size=(TILE, TILE), patch_size=TILE,
                                    resample=Image.BICUBIC)
    ours = ln.image_tiles(image, PIN, TILE)
    assert ours.shape == (len(theirs), 3, TILE, TILE)
    torch.testing.assert_close(ours, torch.from_numpy(np.stack(theirs)), rtol=0, atol=0)
    target = ln.select_best_resolution(hw, PIN)
    padded = ln.resize_and_pad(image, target)
    assert padded.shape[1:] == target
    top, bottom, left, right = ln.padding_for_patching(ln.resized_size_for_patching(hw, target), target)
    assert (padded[:, :top] == 0).all() and (padded[:, padded.shape[1] - bottom:] == 0).all()
    assert (padded[:, :, :left] == 0).all() and (padded[:, :, padded.shape[2] - right:] == 0).all()


# ------------------------------------------------------------------------------------- fused vs transformers
@pytest.mark.parametrize("backend", ["triton", "reference"], indirect=True)
@pytest.mark.parametrize("pins", [PIN, PIN_1X1], ids=["v1.6-pinpoints", "with-1x1-grid"])
def test_pack_matches_transformers(backend, device, pins):
    model = _hf_model(tuple(map(tuple, pins)))
    proj, newline = model.model.multi_modal_projector, model.model.image_newline
    feats, counts = _features(SIZES, pins)
    with torch.no_grad():
        out, lens = ln.project_and_pack(feats.to(device), SIZES, proj.to(device), newline.to(device),
                                        image_grid_pinpoints=pins, **KW)
        ref, ref_lens = _hf_pack(model, torch.split(feats, counts), SIZES, proj, newline)
        exact, _ = _hf_pack(model, [f.double() for f in torch.split(feats, counts)], SIZES,
                            _double(proj), newline.double())
    assert lens.tolist() == ref_lens.tolist()
    for o, r, e in zip(out, ref, exact):
        assert_close(o, r, e, name="packed image features")


def _double(module):
    import copy
    return copy.deepcopy(module).double()


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_pack_low_precision(backend, device, dtype):
    model = _hf_model(tuple(map(tuple, PIN)))
    proj, newline = model.model.multi_modal_projector, model.model.image_newline
    feats, counts = _features(SIZES, PIN)
    low = _double(proj).to(dtype)
    with torch.no_grad():
        out, _ = ln.project_and_pack(feats.to(device, dtype), SIZES, low.to(device), newline.to(device, dtype),
                                     image_grid_pinpoints=PIN, **KW)
        base, _ = _hf_pack(model, [f.to(dtype) for f in torch.split(feats, counts)], SIZES, low,
                           newline.to(dtype))
        exact, _ = _hf_pack(model, [f.double() for f in torch.split(feats, counts)], SIZES, _double(proj),
                            newline.double())
    for o, b, e in zip(out, base, exact):
        assert o.dtype == dtype
        assert_close(o, b, e, name=f"packed image features {dtype}")


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_pack_gradients_match_transformers(backend, device):
    model = _hf_model(tuple(map(tuple, PIN)))
    sizes = SIZES[:2] + SIZES[3:4]
    feats, counts = _features(sizes, PIN)

    def run(fn, dtype):
        proj = _double(model.model.multi_modal_projector).to(device=device, dtype=dtype)
        newline = model.model.image_newline.detach().to(device=device, dtype=dtype).requires_grad_(True)
        x = feats.detach().to(device=device, dtype=dtype).requires_grad_(True)
        out = fn(x, proj, newline)
        g = torch.Generator().manual_seed(1)
        loss = sum((o * torch.randn(o.shape, generator=g).to(device=device, dtype=dtype)).sum() for o in out)
        loss.backward()
        return [x.grad, newline.grad] + [p.grad for p in proj.parameters()]

    ours = run(lambda x, p, n: ln.project_and_pack(x, sizes, p, n, image_grid_pinpoints=PIN, **KW)[0],
               torch.float32)
    base = run(lambda x, p, n: _hf_pack(model, torch.split(x, counts), sizes, p, n)[0], torch.float32)
    exact = run(lambda x, p, n: _hf_pack(model, torch.split(x, counts), sizes, p, n)[0], torch.float64)
    for name, o, b, e in zip(["features", "image_newline", "W1", "b1", "W2", "b2"], ours, base, exact):
        assert_close(o, b, e, kind="grad", name=f"d{name}")


@pytest.mark.parametrize("backend", ["triton", "reference"], indirect=True)
def test_inputs_embeds_match_transformers(backend, device):
    model = _hf_model(tuple(map(tuple, PIN)))
    sizes = [(10, 50), (30, 40)]
    counts = [ln.num_tiles(s, PIN, TILE) for s in sizes]
    pixels = [torch.randn(n, 3, TILE, TILE) for n in counts]
    pixel_values = torch.stack([torch.cat([p, p.new_zeros(max(counts) - len(p), 3, TILE, TILE)]) for p in pixels])
    lens = [ln.packed_length(s, PIN, **KW) for s in sizes]
    ids = torch.full((2, max(lens) + 5), 7)
    ids[0, 2:2 + lens[0]] = IMAGE_TOKEN
    ids[1, 4:4 + lens[1]] = IMAGE_TOKEN
    seen = {}
    hook = model.model.language_model.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.update(embeds=kwargs["inputs_embeds"]), with_kwargs=True)
    try:
        with torch.no_grad():
            model(input_ids=ids, pixel_values=pixel_values, image_sizes=torch.tensor(sizes))
    finally:
        hook.remove()
    packer = ln.LlavaNextImagePacker.from_config(model.config)
    packer.load_state_dict({k: v for k, v in model.model.state_dict().items()
                            if k.startswith(("multi_modal_projector.", "image_newline"))}, strict=True)
    with torch.no_grad():
        hidden = model.model.vision_tower(torch.cat(pixels), output_hidden_states=True).hidden_states[-2]
        feats, feature_lens = packer.to(device)(hidden[:, 1:].to(device), torch.tensor(sizes))
        embeds = ln.merge_image_features(model.model.get_input_embeddings()(ids).to(device), ids.to(device),
                                         feats, IMAGE_TOKEN)
    assert feature_lens.tolist() == lens
    torch.testing.assert_close(embeds.cpu(), seen["embeds"], rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_single_tile_fallback_and_no_newline(backend, device):
    # features[i] with one tile = HF's fallback (base + newline), whatever the grid; list input.
    model = _hf_model(tuple(map(tuple, PIN)))
    proj = _double(model.model.multi_modal_projector).float().to(device)     # a copy: the model is shared
    newline = model.model.image_newline.detach().to(device)
    feats, counts = _features([(10, 50), (30, 40)], PIN)
    parts = list(torch.split(feats.to(device), counts))
    parts[0] = parts[0][:1]
    with torch.no_grad():
        for nl in (newline, None):
            out, lens = ln.project_and_pack(parts, [(10, 50), (30, 40)], proj, nl, image_grid_pinpoints=PIN, **KW)
            ref, ref_lens = _hf_pack(model, parts, [(10, 50), (30, 40)], proj, nl)
            assert lens.tolist() == ref_lens.tolist()
            for o, r in zip(out, ref):
                torch.testing.assert_close(o, r, rtol=2e-5, atol=2e-6)


def test_llava_sequential_projector_and_benchmark_baseline():
    # LLaVA's nn.Sequential(Linear, GELU, Linear) works as is, equals MLPProjector loaded from it, and the
    # unfused benchmark baseline equals transformers.
    model = _hf_model(tuple(map(tuple, PIN)))
    seq = nn.Sequential(nn.Linear(24, 32), nn.GELU(), nn.Linear(32, 32))
    mlp = MLPProjector(24, 32)
    mlp.load_state_dict(seq.state_dict(), strict=True)
    newline = torch.randn(32)
    feats, counts = _features(SIZES, PIN)
    with torch.no_grad():
        a, _ = ln.project_and_pack(feats, SIZES, seq, newline, image_grid_pinpoints=PIN, **KW)
        b, _ = ln.project_and_pack(feats, SIZES, mlp, newline, image_grid_pinpoints=PIN, **KW)
        c, _ = ln.unfused_project_and_pack(feats, SIZES, seq, newline, image_grid_pinpoints=PIN, **KW)
        r, _ = _hf_pack(model, torch.split(feats, counts), SIZES, seq, newline)
    for x, y, z, w in zip(a, b, c, r):
        torch.testing.assert_close(x, y)
        torch.testing.assert_close(x, w, rtol=2e-5, atol=2e-6)
        torch.testing.assert_close(z, w, rtol=0, atol=0)


def test_benchmark_inputs_run():
    d = ln.benchmark_inputs([(40, 60)], vision_hidden_size=8, text_hidden_size=16, device="cpu",
                            dtype=torch.float32)
    kw = dict(d["kwargs"], image_grid_pinpoints=PIN, tile_size=TILE, patch_size=PATCH)
    d["features"] = torch.randn(ln.num_tiles((40, 60), PIN, TILE), SIDE * SIDE, 8)
    a, _ = ln.project_and_pack(d["features"], d["image_sizes"], d["projector"], d["image_newline"], **kw)
    b, _ = ln.unfused_project_and_pack(d["features"], d["image_sizes"], d["projector"], d["image_newline"], **kw)
    torch.testing.assert_close(a[0], b[0], rtol=2e-5, atol=2e-6)
    assert ln.benchmark_inputs([(1080, 1920)], device="meta")["features"].shape == (5, 576, 1024)


# ------------------------------------------------------------------------------------------------ bad input
def _bad(**over):
    feats, counts = _features([(10, 50), (30, 40)], PIN)
    args = dict(features=feats, image_sizes=[(10, 50), (30, 40)], projector=MLPProjector(24, 32),
                image_newline=torch.randn(32))
    args.update(over)
    return args


@pytest.mark.parametrize("over,exc,match", [
    (dict(features=list(torch.split(_features([(10, 50)], PIN)[0], 1))[:2] + [torch.randn(3, 16, 24)]),
     ValueError, "features has 3 images but image_sizes has 2"),
    (dict(features=[torch.randn(3, 16, 24), torch.randn(4, 16, 24)]), ValueError,
     "features\\[1\\] has 4 tiles but image size \\(30, 40\\) selects a 2x2 grid: expected 1 \\+ 4 = 5"),
    (dict(features=torch.randn(7, 16, 24)), ValueError, "features has 7 tiles but image_sizes"),
    (dict(features=torch.randn(8, 17, 24)), ValueError, "17 tokens per tile.*4x4 = 16 \\(drop the CLS"),
    (dict(features=torch.randn(8, 16, 20)), ValueError, "width C=20 but the projector's first Linear takes 24"),
    (dict(features=torch.randn(8, 16, 24, dtype=torch.float16)), TypeError, "features dtype"),
    (dict(image_newline=torch.randn(31)), ValueError, "image_newline must have the projector's output width D=32"),
    (dict(projector=nn.Sequential(nn.Linear(24, 32), nn.ReLU(), nn.Linear(32, 32))), TypeError, "exact GELU"),
    (dict(projector=nn.Sequential(nn.Linear(24, 32), nn.GELU(approximate="tanh"), nn.Linear(32, 32))), TypeError,
     "exact GELU"),
    (dict(projector=nn.Linear(24, 32)), TypeError, "projector must be"),
    (dict(image_sizes=[(10, 50), (0, 40)]), ValueError, "image_sizes\\[1\\] must be a \\(height, width\\)"),
    (dict(features=[torch.randn(2, 16, 24), torch.randn(5, 16, 12)]), ValueError, "every image needs the same"),
])
def test_bad_input(over, exc, match):
    args = _bad(**over)
    with pytest.raises(exc, match=match):
        ln.project_and_pack(args["features"], args["image_sizes"], args["projector"], args["image_newline"],
                            image_grid_pinpoints=PIN, **KW)


def test_bad_pinpoints_and_tile_sizes():
    with pytest.raises(ValueError, match="image_grid_pinpoints"):
        ln.select_best_resolution((10, 10), [])
    with pytest.raises(ValueError, match="tile_size=30 must be a multiple of patch_size=7"):
        ln.packed_length((10, 50), PIN, 30, 7)
    with pytest.raises(ValueError, match="not a whole number of 28-pixel tiles"):
        ln.divide_to_tiles(torch.zeros(3, 28, 30, dtype=torch.uint8), 28)
    with pytest.raises(TypeError, match="image must have dtype"):
        ln.image_tiles(torch.zeros(3, 28, 30), PIN, 28)
