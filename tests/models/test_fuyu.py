"""vlmkern.models.fuyu against transformers: FuyuImageProcessor (resize, patches, token layout) and
FuyuForCausalLM (input embeddings and logits) on a tiny random-weight config."""
import copy
import inspect
import math
import warnings

import pytest
import torch

from vlmkern.models import fuyu
from vlmkern.nn.patch_embed import PatchEmbedLinear
from vlmkern.testing import assert_close

transformers = pytest.importorskip("transformers")

IMG, NL, BOS, BOA = 250, 251, 1, 7          # tiny-vocab stand-ins for |SPEAKER|, |NEWLINE|, <s>, <0x04>
ULP_ONE = 2.0 ** -22                        # 2 ulps at |x| <= 1: processor backends round (x/255-0.5)/0.5 differently


# ------------------------------------------------------------------------------------------ processor helpers
def _processors():
    """FuyuImageProcessor (torchvision backend when torchvision is installed) and the PIL backend if distinct."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        procs = [transformers.FuyuImageProcessor()]
        pil_cls = getattr(transformers, "FuyuImageProcessorPil", None)
        if pil_cls is not None and not isinstance(procs[0], pil_cls):
            procs.append(pil_cls())
    return procs


PROCESSORS = _processors()


def _resize_method(proc) -> str:
    backend = getattr(proc, "backend", None)
    if backend is None:
        names = {c.__name__ for c in type(proc).__mro__}
        backend = "torchvision" if names & {"TorchvisionBackend", "BaseImageProcessorFast"} else "pil"
    return "pil" if backend == "pil" else "torch"


def _processor_run(proc, image):
    """What FuyuProcessor gets from the image processor: patches (nP, K), image ids, patch indices, sizes."""
    out = proc(images=image, return_tensors="pt")
    images, h, w = out["images"], out["image_unpadded_heights"], out["image_unpadded_widths"]
    if hasattr(proc, "preprocess_with_tokenizer_info"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            info = proc.preprocess_with_tokenizer_info(
                image_input=images, image_present=torch.ones(1, 1, 1), image_unpadded_h=h, image_unpadded_w=w,
                image_placeholder_id=IMG, image_newline_id=NL, variable_sized=True)
        return (torch.as_tensor(info["image_patches"][0][0]), info["image_input_ids"][0][0].long(),
                info["image_patch_indices_per_subsequence"][0][0].long(), (int(h[0][0]), int(w[0][0])))
    # FuyuProcessor._process_images: crop the padded image to whole patches, then patchify
    new_h, new_w = (min(images.shape[-2], math.ceil(int(h[0][0]) / 30) * 30),
                    min(images.shape[-1], math.ceil(int(w[0][0]) / 30) * 30))
    crop = images[0, :, :, :new_h, :new_w]
    if _resize_method(proc) == "pil":
        crop = crop.numpy()
    return torch.as_tensor(proc.patchify_image(crop))[0], None, None, (int(h[0][0]), int(w[0][0]))


def _processor_resized(proc, image):
    """The processor's own resize output (no pad / rescale / normalise), uint8 (C, h, w)."""
    out = proc(images=image, do_pad=False, do_rescale=False, do_normalize=False, return_tensors="pt")
    return torch.as_tensor(out["images"])[0, 0]


def _image(h, w, seed=0, C=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (C, h, w), dtype=torch.uint8, generator=g)


# ------------------------------------------------------------------------------------------ image processor
SIZES = [(31, 29), (61, 47), (300, 450), (1080, 1920), (2000, 3000), (1500, 1000), (1, 1)]


@pytest.mark.parametrize("proc", PROCESSORS, ids=lambda p: type(p).__name__)
@pytest.mark.parametrize("hw", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_patches_match_image_processor(proc, hw):
    image = _image(*hw)
    patches, ids, indices, (h, w) = _processor_run(proc, image)
    assert (h, w) == fuyu.resized_size(*hw)
    nH, nW = fuyu.image_token_layout(*hw)
    assert (nH, nW) == (math.ceil(h / 30), math.ceil(w / 30))
    assert patches.shape == (nH * nW, 2700)

    # the processor's resized pixels through our patchify: pad/crop/normalise/flatten must agree exactly
    resized = _processor_resized(proc, image)
    assert resized.shape == (3, h, w) and resized.dtype == torch.uint8
    ours = fuyu.patchify(resized)
    assert ours.dtype == torch.float32 and ours.shape == patches.shape
    torch.testing.assert_close(ours, patches, rtol=0, atol=ULP_ONE)

    # our resize, for the backend this processor uses, is bit-identical; then end to end from the raw image
    method = _resize_method(proc)
    assert torch.equal(fuyu.resize_to_fit(image, method=method), resized)
    ours_e2e, grid = fuyu.image_to_patches(image, resize_method=method)
    assert grid == (nH, nW)
    torch.testing.assert_close(ours_e2e, patches, rtol=0, atol=ULP_ONE)

    if ids is not None:   # image token ids and patch indices from preprocess_with_tokenizer_info
        assert torch.equal(ids, fuyu.build_image_tokens(nH, nW, IMG, NL))
        assert torch.equal(indices, fuyu.image_patches_indices(ids, IMG))


def test_resize_backends_differ_by_at_most_two_grey_levels():
    image = _image(2000, 3000, seed=3)
    a, b = fuyu.resize_to_fit(image, method="torch"), fuyu.resize_to_fit(image, method="pil")
    assert a.shape == b.shape == (3, 1080, 1620)
    assert (a.int() - b.int()).abs().max() <= 2
    f = fuyu.resize_to_fit(image.float(), method="torch")      # float input: no rounding, same dtype
    assert f.dtype == torch.float32 and (f - a.float()).abs().max() <= 1.0


def test_resize_rules():
    assert fuyu.resized_size(1080, 1920) == (1080, 1920)
    assert fuyu.resized_size(2000, 3000) == (1080, 1620)
    assert fuyu.resized_size(1500, 1000) == (1080, 720)
    assert fuyu.resized_size(100, 4000) == (48, 1920)
    small = _image(40, 50)
    assert fuyu.resize_to_fit(small) is small                   # never upscales, no copy
    batch = torch.stack([_image(1200, 500, seed=s) for s in range(2)])
    out = fuyu.resize_to_fit(batch)
    assert out.shape == (2, 3, 1080, 450)
    assert torch.equal(out[1], fuyu.resize_to_fit(batch[1]))
    # Fuyu examples, width x height: 640x480 -> 16x22, 4000x3000 -> 36x48 (1764 tokens), 301x299 -> 10x11
    assert fuyu.image_token_layout(480, 640) == (16, 22)
    nH, nW = fuyu.image_token_layout(3000, 4000)
    assert (nH, nW) == (36, 48) and fuyu.build_image_tokens(nH, nW, IMG, NL).numel() == 1764
    assert fuyu.image_token_layout(299, 301) == (10, 11)
    assert fuyu.image_token_layout(2000, 3000, max_size=None) == (67, 100)


# ------------------------------------------------------------------------------------------ token stream
def test_token_stream_layout():
    ids = fuyu.build_input_ids([11, 12, 13], (2, 3), newline_token_id=NL, bos_token_id=BOS, boa_token_id=BOA,
                               image_token_id=IMG)
    I, N = IMG, NL
    assert ids.tolist() == [I, I, I, N, I, I, I, N, BOS, 11, 12, 13, BOA]
    assert fuyu.image_patches_indices(ids, IMG).tolist() == [0, 1, 2, -1, 3, 4, 5, -1, -1, -1, -1, -1, -1]
    text_only = fuyu.build_input_ids(torch.tensor([5]), None, newline_token_id=NL, bos_token_id=BOS)
    assert text_only.tolist() == [BOS, 5]
    assert fuyu.build_image_tokens(0, 4, IMG, NL).numel() == 0

    short = fuyu.build_input_ids([9], (1, 1), newline_token_id=NL, bos_token_id=BOS, image_token_id=IMG)
    batch, mask = fuyu.pad_left([ids, short])
    assert batch.shape == mask.shape == (2, 13)
    assert batch[1].tolist() == [0] * 9 + [IMG, NL, BOS, 9] and mask[1].tolist() == [0] * 9 + [1] * 4
    idx = fuyu.image_patches_indices(batch, IMG)
    assert idx[1].tolist() == [-1] * 9 + [0, -1, -1, -1]


# ------------------------------------------------------------------------------------------ scatter
def _random_stream(B, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    seqs, counts = [], []
    for b in range(B):
        nH, nW = 1 + b, 2 + b
        prompt = torch.randint(10, 240, (3 + 2 * b,), generator=g)
        seqs.append(fuyu.build_input_ids(prompt, (nH, nW), newline_token_id=NL, bos_token_id=BOS,
                                         boa_token_id=BOA, image_token_id=IMG))
        counts.append(nH * nW)
    ids, mask = fuyu.pad_left(seqs)
    embeds = torch.randn(B, ids.shape[1], D, generator=g)
    per_image = [torch.randn(n, D, generator=g) for n in counts]
    return ids, embeds, per_image


def test_scatter_equals_masked_scatter_and_v4_gather():
    ids, embeds, per_image = _random_stream(3, 16)
    E = torch.cat(per_image)
    expected = embeds.masked_scatter((ids == IMG).unsqueeze(-1), E)          # transformers v5 FuyuModel
    ours = fuyu.scatter_image_embeddings(embeds, ids, E, IMG)
    assert torch.equal(ours, expected)
    indices = fuyu.image_patches_indices(ids, IMG)
    v4_indices = torch.cat([indices, torch.full((3, 10), -1)], dim=1)         # v4.46 adds 10 trailing -1
    assert torch.equal(fuyu.scatter_by_patch_indices(embeds, v4_indices, per_image), expected)
    hf_model_cls = getattr(transformers, "FuyuModel", None)
    if hf_model_cls is not None and hasattr(hf_model_cls, "gather_continuous_embeddings"):
        hf = hf_model_cls.gather_continuous_embeddings(None, embeds, per_image, indices)
        assert torch.equal(ours, hf)
    # gradients reach both the text and the patch embeddings
    e, p = embeds.clone().requires_grad_(True), E.clone().requires_grad_(True)
    fuyu.scatter_image_embeddings(e, ids, p, IMG).sum().backward()
    assert torch.equal(e.grad, (ids != IMG).float().unsqueeze(-1).expand_as(e))
    assert torch.equal(p.grad, torch.ones_like(p))


def test_scatter_no_image_tokens_and_compile():
    ids = torch.tensor([[BOS, 5, 6]])
    embeds = torch.randn(1, 3, 8)
    out = fuyu.scatter_image_embeddings(embeds, ids, torch.empty(0, 8), IMG)
    assert torch.equal(out, embeds) and out is not embeds
    ids, embeds, per_image = _random_stream(2, 8, seed=1)
    E = torch.cat(per_image)
    fn = torch.compile(fuyu.scatter_image_embeddings, fullgraph=True, backend="aot_eager")
    assert torch.equal(fn(embeds, ids, E, IMG), fuyu.scatter_image_embeddings(embeds, ids, E, IMG))


# ------------------------------------------------------------------------------------------ model parity
def _tiny_fuyu(seed=0):
    cfg = transformers.FuyuConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, image_token_id=IMG, patch_size=30, num_channels=3)
    torch.manual_seed(seed)
    model = transformers.FuyuForCausalLM(cfg).eval()
    with torch.no_grad():   # visible bias / patch weights, so that a layout error cannot hide
        model.get_input_embeddings().weight.normal_(0, 1)
        vis = getattr(model, "model", model).vision_embed_tokens
        vis.weight.normal_(0, 2700 ** -0.5)
        vis.bias.normal_(0, 1)
    return model


def _lm(model):
    return getattr(model, "model", model).language_model


def _hf_forward(model, input_ids, patches, attention_mask=None):
    """transformers' own path; returns (inputs_embeds the LM received, logits)."""
    captured = {}

    def hook(module, args, kwargs):
        captured["inputs_embeds"] = kwargs["inputs_embeds"].detach().clone()

    handle = _lm(model).register_forward_pre_hook(hook, with_kwargs=True)
    key = "pixel_values" if "pixel_values" in inspect.signature(model.forward).parameters else "image_patches"
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **{key: patches})
    finally:
        handle.remove()
    return captured["inputs_embeds"], out.logits


def _our_forward(model, input_ids, patch_embeddings, attention_mask=None):
    """vlmkern embeddings + scatter, then the same transformers language model and head."""
    with torch.no_grad():
        inputs_embeds = fuyu.build_inputs_embeds(input_ids, patch_embeddings, model.get_input_embeddings(), IMG)
        position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        hidden = _lm(model)(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                            use_cache=False)[0]
        return inputs_embeds, model.lm_head(hidden)


def _stream(images, prompt_lens, seed=0):
    g = torch.Generator().manual_seed(seed)
    seqs = [fuyu.build_input_ids(torch.randint(10, 240, (n,), generator=g),
                                 fuyu.image_token_layout(*img.shape[-2:]), newline_token_id=NL,
                                 bos_token_id=BOS, boa_token_id=BOA, image_token_id=IMG)
            for img, n in zip(images, prompt_lens)]
    return fuyu.pad_left(seqs)


def _hf_patches(images):
    proc = PROCESSORS[0]
    return torch.stack([_processor_run(proc, img)[0] for img in images])       # (B, nP, 2700), same-size images


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_model_parity_fp32_fused(backend, device):
    _check_model_parity_fp32("fused", device)


def test_model_parity_fp32_patchify_then_linear(device):
    _check_model_parity_fp32("patchify", device)


def _check_model_parity_fp32(path, device):
    model = _tiny_fuyu().to(device)
    images = [_image(61, 47, seed=s) for s in range(2)]                        # 3x2 patches, partial borders
    input_ids, attention_mask = (t.to(device) for t in _stream(images, [5, 2]))
    patches = _hf_patches(images).to(device)
    base = _hf_forward(model, input_ids, patches, attention_mask)
    ref = _hf_forward(copy.deepcopy(model).double(), input_ids, patches.double(), attention_mask)
    pixels = torch.stack(images).to(device)

    if path == "fused":      # uint8 pixels -> Triton normalise+patchify+GEMM (the interpreter on a CPU)
        embedder = fuyu.FuyuImageEmbedder.from_pretrained_model(model)
        with torch.no_grad():
            emb = embedder(pixels)
        assert emb.grids == [(3, 2), (3, 2)]
        patch_emb = emb.embeddings
    else:                    # our patchify + the drop-in nn.Linear
        layer = PatchEmbedLinear(2700, 64).to(device)
        layer.load_state_dict(getattr(model, "model", model).vision_embed_tokens.state_dict(), strict=True)
        with torch.no_grad():
            patch_emb = layer(fuyu.patchify(pixels))
    ours = _our_forward(model, input_ids, patch_emb, attention_mask)
    keep = attention_mask.bool()
    for name, o, b, r in zip(("inputs_embeds", "logits"), ours, base, ref):
        assert_close(o[keep], b[keep], r[keep], dtype=torch.float32, name=name)


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_model_parity_bf16_fused(backend, device):
    model = _tiny_fuyu(seed=1).to(device)
    ref_model = copy.deepcopy(model).double()
    model = model.to(torch.bfloat16)
    images = [_image(31, 29, seed=7)]
    input_ids, _ = _stream(images, [4])
    input_ids = input_ids.to(device)
    patches = _hf_patches(images).to(device)
    base = _hf_forward(model, input_ids, patches.to(torch.bfloat16))
    ref = _hf_forward(ref_model, input_ids, patches.double())
    embedder = fuyu.FuyuImageEmbedder.from_pretrained_model(model)
    assert embedder.vision_embed_tokens.weight.dtype == torch.bfloat16
    with torch.no_grad():
        emb = embedder([img.to(device) for img in images])
    ours = _our_forward(model, input_ids, emb.embeddings)
    for name, o, b, r in zip(("inputs_embeds", "logits"), ours, base, ref):
        assert_close(o, b, r, dtype=torch.bfloat16, name=name)


def test_embedder_variable_sizes_and_resize(device):
    embedder = fuyu.FuyuImageEmbedder(16, max_size=(60, 90)).to(device)         # small max_size: cheap resize
    images = [_image(31, 29, seed=1).to(device), _image(100, 200, seed=2).to(device), _image(1, 1, seed=3).to(device)]
    with torch.no_grad():
        out = embedder(images)
    assert out.grids == [(2, 1), (2, 3), (1, 1)]
    assert out.embeddings.shape == (2 + 6 + 1, 16)
    layer = embedder.vision_embed_tokens
    with torch.no_grad():
        expected = torch.cat([layer(fuyu.patchify(fuyu.resize_to_fit(img, (60, 90)))) for img in images])
    torch.testing.assert_close(out.embeddings, expected)


def test_weight_loading_layouts():
    model = _tiny_fuyu()
    sd = model.state_dict()
    v5 = fuyu.FuyuImageEmbedder.from_config(model.config)
    v5.load_fuyu_state_dict(sd)
    w = getattr(model, "model", model).vision_embed_tokens.weight
    assert torch.equal(v5.vision_embed_tokens.weight, w)
    v4_sd = {k.replace("model.vision_embed_tokens.", "vision_embed_tokens."): v for k, v in sd.items()}
    v4 = fuyu.FuyuImageEmbedder(64)
    v4.load_state_dict({k: v for k, v in v4_sd.items() if k.startswith("vision_embed_tokens.")}, strict=True)
    assert torch.equal(v4.vision_embed_tokens.weight, w)
    adept = {"vit_encoder.linear_encoder.weight": w,
             "vit_encoder.linear_encoder.bias": v4_sd["vision_embed_tokens.bias"]}
    assert torch.equal(fuyu.fuyu_vision_state_dict(adept)["weight"], w)
    with pytest.raises(ValueError, match="no vision_embed_tokens"):
        fuyu.fuyu_vision_state_dict({"lm_head.weight": w})
    with pytest.raises(ValueError, match="several"):
        fuyu.fuyu_vision_state_dict({**sd, **v4_sd})


# ------------------------------------------------------------------------------------------ bad input
def test_bad_input():
    with pytest.raises(TypeError, match="pixels"):
        fuyu.patchify(torch.zeros(1, 3, 30, 30, dtype=torch.int32))
    with pytest.raises(ValueError, match="pixels"):
        fuyu.patchify(torch.zeros(30, 30, dtype=torch.uint8))
    with pytest.raises(ValueError, match="pixels"):
        fuyu.patchify(torch.zeros(1, 3, 0, 30, dtype=torch.uint8))
    with pytest.raises(ValueError, match="patch_size"):
        fuyu.patchify(torch.zeros(1, 3, 30, 30, dtype=torch.uint8), 0)
    with pytest.raises(ValueError, match="method"):
        fuyu.resize_to_fit(_image(2000, 10), method="cv2")
    with pytest.raises(ValueError, match="method='pil'"):
        fuyu.resize_to_fit(_image(2000, 10).float(), method="pil")
    with pytest.raises(ValueError, match="max_size"):
        fuyu.resized_size(10, 10, max_size=(0, 10))
    with pytest.raises(ValueError, match="newline_token_id"):
        fuyu.build_image_tokens(2, 2, IMG, None)

    ids, embeds, per_image = _random_stream(2, 8)
    E = torch.cat(per_image)
    with pytest.raises(ValueError, match="placeholders"):
        fuyu.scatter_image_embeddings(embeds, ids, E[:-1], IMG)
    with pytest.raises(ValueError, match="patch_embeddings"):
        fuyu.scatter_image_embeddings(embeds, ids, E[:, :4], IMG)
    with pytest.raises(TypeError, match="input_ids"):
        fuyu.scatter_image_embeddings(embeds, ids.float(), E, IMG)
    with pytest.raises(ValueError, match="input_ids"):
        fuyu.scatter_image_embeddings(embeds, ids[:, 1:], E, IMG)
    with pytest.raises(ValueError, match="on meta"):
        fuyu.scatter_image_embeddings(embeds, ids, E.to("meta"), IMG)
    indices = fuyu.image_patches_indices(ids, IMG)
    with pytest.raises(ValueError, match="point past"):
        fuyu.scatter_by_patch_indices(embeds, indices, [per_image[0], per_image[1][:1]])
    with pytest.raises(ValueError, match="one entry per sample"):
        fuyu.scatter_by_patch_indices(embeds, indices, per_image[:1])

    embedder = fuyu.FuyuImageEmbedder(8)
    with pytest.raises(ValueError, match=r"images\[1\] has 4 channels"):
        embedder([_image(30, 30), _image(30, 30, C=4)])
    with pytest.raises(TypeError, match="images"):
        embedder(torch.zeros(1, 3, 30, 30, dtype=torch.int16))
    with pytest.raises(ValueError, match="images"):
        embedder([])
    with pytest.raises(ValueError, match="on meta"):
        embedder(torch.zeros(1, 3, 30, 30, dtype=torch.uint8, device="meta"))


# ------------------------------------------------------------------- HF integration: uint8 images end to end
def _hf_processors():
    """(transformers' FuyuProcessor, FusedFuyuProcessor sharing its tokenizer and image processor)."""
    import numpy as np

    from vlmkern.integrations.hf import fuyu as integration
    from vlmkern.integrations.hf import tiny
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proc = tiny.tiny_fuyu_processor()
    fused = integration.fused_processor(proc)
    image_processor = proc.image_processor
    if _resize_method(image_processor) == "pil":
        # transformers 5.24's FuyuProcessor hands torch crops to the PIL backend's numpy patchify, and expects a
        # batched torch result back (the torchvision backend's contract): adapt, for the reference only.
        numpy_patchify = image_processor.patchify_image

        def patchify_image(image, patch_size=None):
            out = torch.from_numpy(np.asarray(numpy_patchify(np.asarray(image), patch_size)))
            return out if out.dim() == 3 else out[None]

        image_processor.patchify_image = patchify_image
    return proc, fused


def _hwc(images):
    return [img.permute(1, 2, 0).numpy() for img in images]       # numpy HWC uint8, as images are usually read


def _tiny_fuyu_model():
    from vlmkern.integrations.hf import tiny
    return tiny.tiny_fuyu()[0]


@pytest.mark.parametrize("sizes", [[(61, 47), (95, 130)], [(31, 29), (31, 29)], [(1100, 1000)]],
                         ids=["two-sizes", "one-size", "resized"])
def test_fused_processor_and_patched_model_match_transformers(sizes):
    """FusedFuyuProcessor (resize only, uint8 out) + the patched model's fused patch embedding give the token ids
    and logits of transformers' FuyuProcessor + FuyuForCausalLM."""
    from vlmkern.integrations import hf
    proc, fused = _hf_processors()
    images = _hwc([_image(h, w, seed=i) for i, (h, w) in enumerate(sizes)])
    text = ["what is this?", "a cat"][:len(images)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want_in = proc(images=images, text=text, return_tensors="pt", return_legacy_image_output=False)
        got_in = fused(images=images, text=text, return_tensors="pt", return_legacy_image_output=False)
    assert torch.equal(got_in["input_ids"], want_in["input_ids"])
    assert torch.equal(got_in["attention_mask"], want_in["attention_mask"])
    pixels = got_in["pixel_values"]
    one_size = len(set(sizes)) == 1
    assert isinstance(pixels, torch.Tensor) == one_size
    assert all(t.dtype == torch.uint8 for t in (pixels if one_size else pixels))

    model = _tiny_fuyu_model()
    oracle = copy.deepcopy(model).double()
    with torch.no_grad():
        base = model(**want_in).logits
        ref = oracle(**{**want_in, "pixel_values": want_in["pixel_values"].double()}).logits
        assert [r.new_class_name for r in hf.apply(model)] == ["FuyuPatchEmbed"]
        got = model(**got_in).logits
        also = model(**want_in).logits          # the patched model still takes transformers' float patches
    assert_close(got, base, ref, name="logits from uint8 images")
    assert_close(also, base, ref, name="logits from float patches")


def test_fused_processor_generate_matches_transformers():
    from vlmkern.integrations import hf
    proc, fused = _hf_processors()
    images, text = _hwc([_image(61, 47), _image(61, 47, seed=1)]), ["what is this?", "a cat"]
    model = _tiny_fuyu_model()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = model.generate(**proc(images=images, text=text, return_tensors="pt"), max_new_tokens=3,
                              do_sample=False)
        hf.apply(model)
        got = model.generate(**fused(images=images, text=text, return_tensors="pt"), max_new_tokens=3,
                             do_sample=False)
    assert torch.equal(got, want)


def test_fused_processor_refuses_what_the_fused_op_does_not_compute():
    _, fused = _hf_processors()
    image = _hwc([_image(31, 29)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="image_mean"):
            fused(images=image, text="a cat", return_tensors="pt", image_mean=0.3)
        with pytest.raises(ValueError, match="uint8"):
            fused(images=[image[0].astype("float32")], text="a cat", return_tensors="pt")
    from vlmkern.integrations.hf.fuyu_processor import FusedFuyuProcessor
    with pytest.raises(TypeError, match="FuyuProcessor"):
        FusedFuyuProcessor.from_processor(object())


@pytest.mark.parametrize("how", ["call", "attribute"])
@pytest.mark.parametrize("mode", ["edge", "reflect"])
def test_fused_processor_refuses_padding_other_than_constant(mode, how):
    """transformers pads the border patches with edge / mirrored pixels there; the fused op pads with the constant
    padding_value, so it must refuse (before: other border embeddings, no error)."""
    proc, fused = _hf_processors()
    image = _hwc([_image(61, 47)])            # partial border patches: the padding shows
    kwargs = {"padding_mode": mode} if how == "call" else {}
    if how == "attribute":
        fused.image_processor.padding_mode = mode
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proc(images=image, text="a cat", return_tensors="pt", **kwargs)   # the original takes it
        with pytest.raises(ValueError, match=f"padding_mode='{mode}'"):
            fused(images=image, text="a cat", return_tensors="pt", **kwargs)


@pytest.mark.parametrize("image_hw, kwargs, match", [
    ((100, 100), {"size": {"height": 50, "width": 50}}, "size=50x50 must be a multiple of patch_size=30"),
    ((1100, 70), {"do_resize": False}, r"images\[0\] is 1100x70 after the resize, larger than size=1080x1920"),
], ids=["size-not-whole-patches", "unresized-larger-than-size"])
def test_fused_processor_refuses_what_transformers_refuses(image_hw, kwargs, match):
    """Where FuyuProcessor raises (a size it cannot cut into patches, an image it cannot pad to size), the fused
    processor raises too, naming the setting, instead of returning a token stream."""
    proc, fused = _hf_processors()
    image = _hwc([_image(*image_hw)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError):
            proc(images=image, text="a cat", return_tensors="pt", **kwargs)
        with pytest.raises(ValueError, match=match):
            fused(images=image, text="a cat", return_tensors="pt", **kwargs)


def test_patched_vision_embed_takes_patches_or_uint8_images():
    from vlmkern.integrations.hf.fuyu import FuyuPatchEmbed
    layer = FuyuPatchEmbed(2700, 16)
    imgs = [_image(61, 47), _image(31, 95, seed=1)]
    with torch.no_grad():
        want = torch.cat([layer(fuyu.patchify(img)) for img in imgs])
        assert_close(layer(imgs), want, want, name="list of images")
        assert_close(layer(tuple(imgs)), want, want, name="tuple of images")
        assert_close(layer(imgs[0]), want[:6], want[:6], name="one image")
        both = torch.stack([imgs[0], imgs[0]])
        assert_close(layer(both), want[:6].repeat(2, 1), want[:6].repeat(2, 1), name="batch")
    with pytest.raises(ValueError, match="uint8"):
        layer([imgs[0].float()])
    with pytest.raises(ValueError, match="list"):
        layer([])
    with pytest.raises(ValueError, match="uint8 images"):
        layer(imgs[0][0])
