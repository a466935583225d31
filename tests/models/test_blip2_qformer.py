"""vlmkern.models.blip2.Blip2QFormerModel against transformers.Blip2QFormerModel (eager attention).

Oracle: a float64 copy of the transformers model; baseline for the tolerance rule: the transformers model in
the tested dtype. Weights are random (every parameter, biases and LayerNorms included), text is padded.
"""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import Blip2QFormerConfig  # noqa: E402
from transformers import Blip2QFormerModel as HFBlip2QFormerModel  # noqa: E402

from vlmkern.models import lavis  # noqa: E402
from vlmkern.models.blip2 import Blip2QFormerModel  # noqa: E402
from vlmkern.testing import assert_close, cast_inputs, randomize_  # noqa: E402

TRITON = pytest.mark.parametrize("backend", ["triton"], indirect=True)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
            encoder_hidden_size=48, max_position_embeddings=32, vocab_size=100)
NQ, T, LK = 8, 5, 17


# ------------------------------------------------------------------------------------------ helpers
def make_config(text: bool = True, **kw) -> Blip2QFormerConfig:
    cfg = Blip2QFormerConfig(**{**TINY, **kw}, use_qformer_text_input=text)
    cfg._attn_implementation = "eager"
    return cfg


def hf_model(config) -> HFBlip2QFormerModel:
    return randomize_(HFBlip2QFormerModel(config).eval())


def text_mask(batch: int, nq: int, t: int) -> torch.Tensor:
    """``(B, nq + t)``: ones for the queries, text padded differently per row (row 0 unpadded)."""
    m = torch.ones(batch, nq + t, dtype=torch.long)
    for b in range(1, batch):
        m[b, nq + max(1, t - 2 * b):] = 0
    return m


def itm_inputs(batch=3, nq=NQ, t=T, lk=LK, hidden=64, enc=48, image_pad=False) -> dict:
    """ITM-style call: [queries ; text embeddings] with padding, image tokens (fp64 leaves)."""
    inputs = dict(query_embeds=torch.randn(batch, nq + t, hidden, dtype=torch.float64), query_length=nq,
                  attention_mask=text_mask(batch, nq, t),
                  encoder_hidden_states=torch.randn(batch, lk, enc, dtype=torch.float64))
    if image_pad:
        m = torch.ones(batch, lk, dtype=torch.long)
        m[-1, lk // 2:] = 0
        inputs["encoder_attention_mask"] = m
    return inputs


def check_parity(hf: torch.nn.Module, ours_cls, inputs: dict, dtype: torch.dtype, *, grads: bool = True,
                 no_grad=()):
    """Outputs and the gradients of every parameter and float input (but ``no_grad``) of ``ours_cls`` vs ``hf``."""
    ref = copy.deepcopy(hf).to(torch.float64)
    base = copy.deepcopy(hf).to(dtype)
    ours = ours_cls.from_transformers(base)
    assert not ours.training
    runs = {}
    for name, model, dt in (("ours", ours, dtype), ("base", base, dtype), ("ref", ref, torch.float64)):
        x = cast_inputs(inputs, dt, no_grad)
        out = model(**x)
        runs[name] = (model, x, out)
    for field in ("last_hidden_state", "pooler_output"):
        a, b, r = (getattr(runs[n][2], field) for n in ("ours", "base", "ref"))
        assert a.dtype == b.dtype and a.shape == r.shape
        assert_close(a, b, r, name=field)
    if not grads:
        return ours
    g = torch.randn_like(runs["ref"][2].last_hidden_state)
    for name in runs:
        runs[name][2].last_hidden_state.backward(g.to(runs[name][2].last_hidden_state.dtype))
    params = {n: dict(runs[n][0].named_parameters()) for n in runs}
    assert params["ours"].keys() == params["ref"].keys()
    for pname, p in params["ours"].items():
        rg = params["ref"][pname].grad
        if rg is None:
            assert p.grad is None or not p.grad.any(), pname
            continue
        assert p.grad is not None, f"no gradient for {pname}"
        assert_close(p.grad, params["base"][pname].grad, rg, kind="grad", dtype=dtype, name=f"d {pname}")
    for iname, v in runs["ours"][1].items():
        if torch.is_tensor(v) and v.requires_grad:
            assert_close(v.grad, runs["base"][1][iname].grad, runs["ref"][1][iname].grad, kind="grad",
                         dtype=dtype, name=f"d {iname}")
    return ours


# ---------------------------------------------------------------------------------------- structure
@pytest.mark.parametrize("text", [True, False])
def test_state_dict_keys_and_strict_load(text):
    hf = HFBlip2QFormerModel(make_config(text))
    ours = Blip2QFormerModel(make_config(text))
    assert list(ours.state_dict()) == list(hf.state_dict())
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in hf.state_dict().items()}
    ours.load_state_dict(hf.state_dict(), strict=True)
    hf.load_state_dict(ours.state_dict(), strict=True)
    assert ours.encoder.layer[0].has_cross_attention and not ours.encoder.layer[1].has_cross_attention


def test_default_init_matches_transformers_statistics():
    cfg = make_config()
    ours, hf = Blip2QFormerModel(cfg), HFBlip2QFormerModel(cfg)
    o, h = ours.state_dict(), hf.state_dict()
    for k in o:
        if k.endswith("bias") or "LayerNorm" in k or "layernorm" in k:
            assert torch.equal(o[k], h[k]), k
        else:
            assert abs(o[k].std().item() - h[k].std().item()) < 0.25 * cfg.initializer_range, k


# ------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_parity_itm_text_padding(dtype):
    check_parity(hf_model(make_config()), Blip2QFormerModel, itm_inputs(), dtype)


def test_parity_image_padding_and_broadcast_image():
    # transformers 5.x builds the cross-attention mask for all Q+T rows and fails when text is present: compare
    # image padding on the query-only pass (ours also takes it with text, see test_parity_triton_kernels)
    x = itm_inputs(t=0, image_pad=True)
    del x["attention_mask"]
    check_parity(hf_model(make_config()), Blip2QFormerModel, x, torch.float32)
    x = itm_inputs()
    x["encoder_hidden_states"] = x["encoder_hidden_states"][:1]          # one image for every row
    check_parity(hf_model(make_config()), Blip2QFormerModel, x, torch.float32)


def test_parity_query_only_stage2_path():
    """The LLM-feeding pass: 8 queries, no text, no masks; model without a text FFN."""
    x = itm_inputs(t=0)
    del x["attention_mask"], x["query_length"]
    check_parity(hf_model(make_config(text=False)), Blip2QFormerModel, x, torch.float32)


def test_parity_text_only_pass():
    """ITC text pass: query_length=0, no image, padded text; cross-attention is skipped."""
    x = dict(query_embeds=torch.randn(3, 7, 64, dtype=torch.float64), query_length=0,
             attention_mask=text_mask(3, 0, 7))
    check_parity(hf_model(make_config()), Blip2QFormerModel, x, torch.float32)


@TRITON
@pytest.mark.parametrize("dtype,case", [(torch.float32, "itm"), (torch.float16, "itm"),
                                        (torch.float32, "image_pad")])
def test_parity_triton_kernels(backend, dtype, case):
    """VLMKERN_BACKEND=triton: the attention and linear_gelu kernels (interpreter on the CPU); 2 heads of 32."""
    x = itm_inputs()
    if case == "image_pad":
        x = itm_inputs(t=0, image_pad=True)
        del x["attention_mask"]
    check_parity(hf_model(make_config()), Blip2QFormerModel, x, dtype)


@TRITON
def test_triton_broadcast_image_and_mask(backend):
    """One image and one image mask (batch 1) for every row: stride-0 K/V and key padding in the kernel."""
    hf = hf_model(make_config())
    ours = Blip2QFormerModel.from_transformers(hf)
    x = cast_inputs(itm_inputs(t=0), torch.float32)
    del x["attention_mask"]
    one, mask = x["encoder_hidden_states"][:1], torch.tensor([[1] * (LK - 4) + [0] * 4])
    got = ours(**{**x, "encoder_hidden_states": one, "encoder_attention_mask": mask}).last_hidden_state
    want = hf(**{**x, "encoder_hidden_states": one.expand(3, -1, -1),
                 "encoder_attention_mask": mask.expand(3, -1)}).last_hidden_state
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_row_without_visible_keys_is_zero_on_every_path():
    """A text row with an all-zero attention mask (text-only pass) and an image row with an all-zero image mask:
    zeros, as transformers' default SDPA attention gives, whether or not the attention weights are asked for and
    whether the mask comes 2-D or as the same 4-D boolean mask (before: the weights path averaged the values)."""
    cfg = make_config()
    cfg._attn_implementation = "sdpa"
    hf = hf_model(cfg)
    ours = Blip2QFormerModel.from_transformers(hf)
    text = dict(query_embeds=torch.randn(2, 6, 64), query_length=0, attention_mask=torch.tensor([[1] * 6, [0] * 6]))
    mask4d = text["attention_mask"].bool()[:, None, None, :].expand(2, 1, 6, 6)
    image = cast_inputs(itm_inputs(batch=2, t=0), torch.float32)
    del image["attention_mask"]
    image["encoder_attention_mask"] = torch.tensor([[1] * LK, [0] * LK])
    for x, dense in ((text, mask4d), (image, None)):
        with torch.no_grad():
            want = hf(**x).last_hidden_state
            plain = ours(**x).last_hidden_state
            weighed = ours(**x, output_attentions=True)
            torch.testing.assert_close(plain, want, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(weighed.last_hidden_state, plain, atol=1e-6, rtol=1e-6)
            if dense is not None:
                torch.testing.assert_close(ours(**{**x, "attention_mask": dense}).last_hidden_state, plain,
                                           atol=1e-6, rtol=1e-6)
                assert torch.all(weighed.attentions[0][1] == 0)    # the masked row's weights
            else:
                assert torch.all(weighed.cross_attentions[0][1] == 0)


def test_one_image_with_a_mask_per_row():
    """``encoder_hidden_states (1, Lk, E)`` broadcast to every row with a per-row ``(B, Lk)`` image mask, which
    transformers takes (before: a ValueError asking for a (1, Lk) mask). The oracle is transformers on the image
    repeated per row: transformers 5.24's own broadcast of this call gives the masked row other numbers."""
    hf = hf_model(make_config())
    ours = Blip2QFormerModel.from_transformers(hf)
    x = cast_inputs(itm_inputs(t=0), torch.float32)
    del x["attention_mask"]
    one, mask = x["encoder_hidden_states"][:1], torch.ones(3, LK, dtype=torch.long)
    mask[1, -5:] = 0
    with torch.no_grad():
        got = ours(**{**x, "encoder_hidden_states": one, "encoder_attention_mask": mask}).last_hidden_state
        want = hf(**{**x, "encoder_hidden_states": one.expand(3, -1, -1),
                     "encoder_attention_mask": mask}).last_hidden_state
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("length", [torch.tensor(NQ), "numpy"], ids=["tensor", "numpy"])
def test_query_length_takes_any_integer(length):
    np = pytest.importorskip("numpy")
    length = np.int64(NQ) if isinstance(length, str) else length
    hf = hf_model(make_config())
    ours = Blip2QFormerModel.from_transformers(hf)
    x = cast_inputs(itm_inputs(), torch.float32)
    with torch.no_grad():
        want = ours(**x).last_hidden_state
        got = ours(**{**x, "query_length": length}).last_hidden_state
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    with pytest.raises(TypeError, match="query_length"):
        ours(**{**x, "query_length": float(NQ)})
    with pytest.raises(TypeError, match="query_length"):
        ours(**{**x, "query_length": torch.tensor(float(NQ))})


def test_model_attributes_user_code_reads():
    """``dtype``, ``device`` and ``num_parameters()`` of ``PreTrainedModel``, read of ``model.qformer``."""
    hf = hf_model(make_config())
    ours = Blip2QFormerModel.from_transformers(hf).to(torch.bfloat16)
    assert ours.dtype == torch.bfloat16 and ours.device == torch.device("cpu")
    assert ours.num_parameters() == hf.num_parameters()
    ours.layernorm.weight.requires_grad_(False)
    assert ours.num_parameters(only_trainable=True) == hf.num_parameters() - 64


@pytest.mark.slow
def test_parity_full_size_reference_fp32():
    """BLIP-2's real widths (768 hidden, 1408-wide image tokens, 257 of them), B=2, text padded; 4 of its 12
    layers (two with cross-attention, as in every pair of the full model), so that the fp64 oracle, the fp32
    baseline and vlmkern with their gradients keep the test suite's peak memory under 4 GB."""
    cfg = Blip2QFormerConfig(use_qformer_text_input=True, num_hidden_layers=4)
    cfg._attn_implementation = "eager"
    hf = randomize_(HFBlip2QFormerModel(cfg).eval(), std=0.02, weights=False)
    x = itm_inputs(batch=2, nq=32, t=8, lk=257, hidden=768, enc=1408)
    check_parity(hf, Blip2QFormerModel, x, torch.float32, no_grad=("encoder_hidden_states",))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_parity_full_size_cuda(dtype):
    cfg = Blip2QFormerConfig(use_qformer_text_input=True)
    cfg._attn_implementation = "eager"
    hf = randomize_(HFBlip2QFormerModel(cfg).eval(), std=0.02, weights=False).cuda()
    x = {k: v.cuda() if torch.is_tensor(v) else v
         for k, v in itm_inputs(batch=4, nq=32, t=32, lk=257, hidden=768, enc=1408).items()}
    check_parity(hf, Blip2QFormerModel, x, dtype)


@pytest.mark.cuda
def test_torch_compile_fullgraph_cuda():
    """The whole model compiles to one graph (the vlmkern ops are custom ops); forward and backward agree."""
    ours = Blip2QFormerModel.from_transformers(hf_model(make_config())).cuda()
    x = {k: v.cuda().float() if torch.is_tensor(v) and v.is_floating_point() else
         (v.cuda() if torch.is_tensor(v) else v) for k, v in itm_inputs().items()}
    eager = ours(**x).last_hidden_state
    compiled = torch.compile(lambda **kw: ours(**kw).last_hidden_state, fullgraph=True)
    out = compiled(**x)
    torch.testing.assert_close(out, eager, atol=1e-4, rtol=1e-4)
    ge = torch.autograd.grad(eager.sum(), list(ours.parameters()))
    gc = torch.autograd.grad(out.sum(), list(ours.parameters()))
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------ outputs, modes
def test_return_dict_false_hidden_states_and_attentions():
    hf = hf_model(make_config())
    ours = Blip2QFormerModel.from_transformers(hf)
    x = cast_inputs(itm_inputs(), torch.float32)
    a = hf(**x, return_dict=False)
    b = ours(**x, return_dict=False)
    assert isinstance(b, tuple) and len(b) == len(a) == 2
    for u, v in zip(a, b):
        torch.testing.assert_close(v, u)
    a = hf(**x, output_hidden_states=True, output_attentions=True)
    b = ours(**x, output_hidden_states=True, output_attentions=True)
    assert len(b.hidden_states) == len(a.hidden_states) == 3
    for u, v in zip(a.hidden_states, b.hidden_states):
        torch.testing.assert_close(v, u)
    assert len(b.cross_attentions) == len(a.cross_attentions) == 1
    torch.testing.assert_close(b.cross_attentions[0], a.cross_attentions[0])
    selfs = lambda atts: [t for t in atts if t.shape[-1] == t.shape[-2]]  # noqa: E731
    for u, v in zip(selfs(a.attentions), selfs(b.attentions), strict=True):
        torch.testing.assert_close(v, u)


def test_dense_4d_mask_takes_eager_path_and_agrees():
    hf = hf_model(make_config())
    ours = Blip2QFormerModel.from_transformers(hf)
    x = cast_inputs(itm_inputs(), torch.float32)
    m2 = x["attention_mask"]
    m4 = torch.where(m2.bool(), 0.0, torch.finfo(torch.float32).min)[:, None, None, :].expand(-1, 1, NQ + T, -1)
    out2 = ours(**x).last_hidden_state
    out4 = ours(**{**x, "attention_mask": m4}).last_hidden_state
    out3 = ours(**{**x, "attention_mask": m2[:, None, :].expand(-1, NQ + T, -1)}).last_hidden_state
    torch.testing.assert_close(out4, out2)
    torch.testing.assert_close(out3, out2)
    torch.testing.assert_close(hf(**{**x, "attention_mask": m4}).last_hidden_state, out4)


def test_train_mode_runs_attention_dropout_in_the_kernels(monkeypatch):
    """Training with attention-probability dropout: every attention runs a kernel with p (the eager fallback
    never), reproducibly for one seed; eval passes p = 0."""
    from vlmkern.nn import qformer as nn_qformer

    ours = Blip2QFormerModel.from_transformers(hf_model(make_config(hidden_dropout_prob=0.2,
                                                                    attention_probs_dropout_prob=0.2)))
    calls = []
    monkeypatch.setattr(nn_qformer, "eager_attention", lambda *a, **k: pytest.fail("eager attention ran"))
    for name in ("qformer_attention", "cross_attention"):
        def counted(*args, _fn=getattr(nn_qformer.ops, name), _name=name, **kw):
            calls.append((_name, kw["dropout_p"]))
            return _fn(*args, **kw)
        monkeypatch.setattr(nn_qformer.ops, name, counted)
    x = cast_inputs(itm_inputs(), torch.float32)
    ours.train()
    torch.manual_seed(123)
    a = ours(**x).last_hidden_state
    n_cross = sum(layer.has_cross_attention for layer in ours.encoder.layer)
    assert sorted(calls) == sorted([("qformer_attention", 0.2)] * len(ours.encoder.layer)
                                   + [("cross_attention", 0.2)] * n_cross)
    torch.manual_seed(123)
    torch.testing.assert_close(ours(**x).last_hidden_state, a)
    a.sum().backward()
    calls.clear()
    assert not torch.allclose(a, ours.eval()(**x).last_hidden_state)
    assert {p for _, p in calls} == {0.0}


def test_train_mode_hidden_dropout_matches_transformers():
    """Hidden dropout only (attention p = 0): same modules in the same order, so one seed gives transformers'
    result in training mode. (With attention p > 0 the kernels draw their own keep mask.)"""
    cfg0 = make_config(hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.0)
    hf0 = hf_model(cfg0).train()
    ours0 = Blip2QFormerModel.from_transformers(hf0)
    assert ours0.training
    x = cast_inputs(itm_inputs(), torch.float32)
    torch.manual_seed(7)
    a = hf0(**x).last_hidden_state
    torch.manual_seed(7)
    b = ours0(**x).last_hidden_state
    torch.testing.assert_close(b, a)
    b.sum().backward()


def test_gradient_checkpointing_matches():
    hf = hf_model(make_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    ours = Blip2QFormerModel.from_transformers(hf).train()
    x = cast_inputs(itm_inputs(), torch.float32)
    out = ours(**x).last_hidden_state
    g1 = torch.autograd.grad(out.sum(), list(ours.parameters()))
    ours.gradient_checkpointing_enable()
    out_ck = ours(**x).last_hidden_state
    g2 = torch.autograd.grad(out_ck.sum(), list(ours.parameters()))
    torch.testing.assert_close(out_ck, out)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("reentrant", [True, False])
def test_checkpointing_options_are_honoured(monkeypatch, reentrant):
    """``use_reentrant`` reaches ``torch.utils.checkpoint`` and ``every_n_layers`` picks the layers, as
    transformers' ``activation_checkpointing_enable``; the gradients are those without checkpointing."""
    import torch.utils.checkpoint as ckpt
    from vlmkern.nn import qformer as nn_qformer
    hf = hf_model(make_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_hidden_layers=3))
    ours = Blip2QFormerModel.from_transformers(hf).train()
    x = cast_inputs(itm_inputs(), torch.float32)
    x["query_embeds"].requires_grad_(True)     # a reentrant checkpoint needs an input that requires grad

    def grads():      # .backward(): a reentrant checkpoint refuses torch.autograd.grad
        ours.zero_grad(set_to_none=True)
        ours(**x).last_hidden_state.sum().backward()
        return [p.grad for p in ours.parameters()]
    g1 = grads()
    seen = []
    real = ckpt.checkpoint
    monkeypatch.setattr(nn_qformer, "checkpoint", lambda *a, **kw: seen.append(kw) or real(*a, **kw))
    ours.activation_checkpointing_enable({"use_reentrant": reentrant}, every_n_layers=2)
    assert ours.is_gradient_checkpointing
    g2 = grads()
    assert [kw["use_reentrant"] for kw in seen] == [reentrant] * 2        # layers 0 and 2 of 3
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)
    ours.gradient_checkpointing_disable()
    assert not ours.is_gradient_checkpointing


def test_gradient_checkpointing_recomputes_the_same_dropout_masks():
    """Checkpointed layers redraw (seed, offset) from the restored RNG state: same output and gradients."""
    ours = Blip2QFormerModel.from_transformers(hf_model(make_config(hidden_dropout_prob=0.1,
                                                                    attention_probs_dropout_prob=0.3))).train()
    x = cast_inputs(itm_inputs(), torch.float32)
    torch.manual_seed(5)
    out = ours(**x).last_hidden_state
    g1 = torch.autograd.grad(out.sum(), list(ours.parameters()))
    ours.gradient_checkpointing_enable()
    torch.manual_seed(5)
    out_ck = ours(**x).last_hidden_state
    g2 = torch.autograd.grad(out_ck.sum(), list(ours.parameters()))
    torch.testing.assert_close(out_ck, out)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


def test_encoder_batch_index_computes_each_image_once(monkeypatch):
    """ITM batch [pos, (text, neg image), (neg text, image)]: 2 distinct images for 3 rows (as LAVIS builds it)."""
    hf = hf_model(make_config())
    ours = Blip2QFormerModel.from_transformers(hf)
    x = cast_inputs(itm_inputs(), torch.float32)
    images = x["encoder_hidden_states"][:2].detach().requires_grad_()
    index = torch.tensor([0, 1, 0])
    expected = hf(**{**x, "encoder_hidden_states": images[index]})
    got = ours(**{**x, "encoder_hidden_states": images}, encoder_batch_index=index)
    torch.testing.assert_close(got.last_hidden_state, expected.last_hidden_state)
    g = torch.randn_like(got.last_hidden_state)
    torch.testing.assert_close(torch.autograd.grad(got.last_hidden_state, images, g)[0],
                               torch.autograd.grad(expected.last_hidden_state, images, g)[0])
    # image padding per distinct image (transformers cannot take an image mask with text: compare with ours)
    img_mask = torch.tensor([[1] * LK, [1] * (LK - 3) + [0] * 3])
    got = ours(**{**x, "encoder_hidden_states": images, "encoder_attention_mask": img_mask},
               encoder_batch_index=index)
    expected = ours(**{**x, "encoder_hidden_states": images[index], "encoder_attention_mask": img_mask[index]})
    torch.testing.assert_close(got.last_hidden_state, expected.last_hidden_state)
    calls = []
    linear = torch.nn.functional.linear

    def spy(inp, w, b=None):
        if w.shape[1] == 48:                      # the image-side (encoder width 48) projections
            calls.append(inp.shape[0])
        return linear(inp, w, b)

    monkeypatch.setattr(torch.nn.functional, "linear", spy)
    ours(**{**x, "encoder_hidden_states": images}, encoder_batch_index=index)
    assert calls == [2, 2]       # K and V GEMMs of layer 0 over the 2 distinct images only


def test_repeated_frozen_images_are_found_and_computed_once(monkeypatch):
    """Frozen image features with repeated rows (the ITM batch as BLIP-2 builds it, without an index): each
    distinct image's K/V is computed once on the CPU; outputs and parameter gradients equal transformers'."""
    hf = hf_model(make_config())
    ours = Blip2QFormerModel.from_transformers(hf)
    x = cast_inputs(itm_inputs(batch=4), torch.float32, no_grad=("encoder_hidden_states",))
    images = x["encoder_hidden_states"]
    images[2], images[3] = images[0], images[1]
    calls = []
    linear = torch.nn.functional.linear

    def spy(inp, w, b=None):
        if w.shape[1] == 48:                      # the image-side (encoder width 48) projections of layer 0
            calls.append(inp.shape[0])
        return linear(inp, w, b)

    def run(model, **kw):
        calls.clear()
        monkeypatch.setattr(torch.nn.functional, "linear", spy)
        try:
            return model(**{**x, **kw}).last_hidden_state
        finally:
            monkeypatch.setattr(torch.nn.functional, "linear", linear)

    got = run(ours)
    assert calls == [2, 2]
    expected = hf(**x).last_hidden_state
    torch.testing.assert_close(got, expected)
    g = torch.randn_like(got)
    leaves = [p for p in ours.parameters()] + [x["query_embeds"]]
    hf_leaves = [p for p in hf.parameters()] + [x["query_embeds"]]
    for a, b in zip(torch.autograd.grad(got, leaves, g, allow_unused=True),
                    torch.autograd.grad(expected, hf_leaves, g, allow_unused=True)):
        if a is not None or b is not None:
            torch.testing.assert_close(a, b)
    # row 3 repeats row 1's image but not its image mask: 3 distinct (image, mask) pairs
    img_mask = torch.ones(4, LK, dtype=torch.long)
    img_mask[3, -2:] = 0
    got = run(ours, encoder_attention_mask=img_mask)
    assert calls == [3, 3]
    unmerged = run(ours, encoder_attention_mask=img_mask, encoder_hidden_states=images.clone().requires_grad_())
    assert calls == [4, 4]                        # images that need a gradient keep their rows
    torch.testing.assert_close(got, unmerged)


# ------------------------------------------------------------------------------------------ bad input
def test_bad_input():
    ours = Blip2QFormerModel(make_config(text=False))
    x = cast_inputs(itm_inputs(), torch.float32)
    q = x["query_embeds"][:, :NQ]
    e = x["encoder_hidden_states"]
    with pytest.raises(ValueError, match="attention_mask"):
        ours(q, attention_mask=torch.ones(3, NQ + 1), encoder_hidden_states=e)
    with pytest.raises(ValueError, match="encoder_hidden_states must be given"):
        ours(q)
    with pytest.raises(ValueError, match="encoder_hidden_size"):
        ours(q, encoder_hidden_states=torch.randn(3, LK, 47))
    with pytest.raises(ValueError, match="batch"):
        ours(q, encoder_hidden_states=e[:2])
    with pytest.raises(ValueError, match="text FFN"):
        ours(x["query_embeds"], query_length=NQ, encoder_hidden_states=e)
    with pytest.raises(ValueError, match="hidden_size"):
        ours(torch.randn(3, NQ, 63), encoder_hidden_states=e)
    with pytest.raises(TypeError, match="query_embeds"):
        ours(torch.ones(3, NQ, 64, dtype=torch.long), encoder_hidden_states=e)
    with pytest.raises(ValueError, match="encoder_batch_index"):
        ours(q, encoder_hidden_states=e[:2], encoder_batch_index=torch.tensor([0, 1]))
    with pytest.raises(NotImplementedError, match="head_mask"):
        ours(q, encoder_hidden_states=e, head_mask=torch.ones(2, 2))


# --------------------------------------------------------------------------------------------- LAVIS
def _lavis_checkpoint(hf: torch.nn.Module) -> dict:
    """A LAVIS ``Blip2Qformer``-named state dict made by inverting the name mapping, plus non-Q-Former keys."""
    sd = lavis.qformer_state_dict_to_lavis(hf.state_dict(), "blip2")
    assert "Qformer.bert.embeddings.LayerNorm.weight" in sd
    assert "Qformer.bert.encoder.layer.0.attention.self.query.weight" in sd
    assert "Qformer.bert.encoder.layer.0.crossattention.self.key.weight" in sd
    assert "Qformer.bert.encoder.layer.0.attention.output.LayerNorm.bias" in sd
    assert not any(".attention.attention." in k for k in sd)
    sd.update({"query_tokens": torch.zeros(1, NQ, 64), "ln_vision.weight": torch.ones(48),
               "Qformer.bert.embeddings.word_embeddings.weight": torch.zeros(100, 64),
               "Qformer.bert.embeddings.position_embeddings.weight": torch.zeros(32, 64),
               "Qformer.bert.embeddings.position_ids": torch.arange(32)[None],
               "Qformer.cls.predictions.bias": torch.zeros(100), "temp": torch.tensor(0.07)})
    return sd


def test_lavis_loader_round_trip():
    hf = hf_model(make_config())
    sd = _lavis_checkpoint(hf)
    ours = Blip2QFormerModel(make_config()).eval()
    result = lavis.load_lavis_qformer(ours, sd)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert set(result.rest) == {"query_tokens", "ln_vision.weight", "Qformer.bert.embeddings.word_embeddings.weight",
                                "Qformer.bert.embeddings.position_embeddings.weight",
                                "Qformer.bert.embeddings.position_ids", "Qformer.cls.predictions.bias", "temp"}
    for k, v in hf.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k
    x = cast_inputs(itm_inputs(), torch.float32)
    torch.testing.assert_close(ours(**x).last_hidden_state, hf(**x).last_hidden_state)
    # the transformers class takes the same names
    hf2 = HFBlip2QFormerModel(make_config()).eval()
    lavis.load_lavis_qformer(hf2, sd)
    torch.testing.assert_close(hf2(**x).last_hidden_state, hf(**x).last_hidden_state)


def test_lavis_loader_strict_errors():
    sd = _lavis_checkpoint(hf_model(make_config()))           # stage-1: has the text FFN
    with pytest.raises(KeyError, match="unexpected"):
        lavis.load_lavis_qformer(Blip2QFormerModel(make_config(text=False)), sd)
    res = lavis.load_lavis_qformer(Blip2QFormerModel(make_config(text=False)), sd, strict=False)
    assert res.unexpected_keys and all(".intermediate." in k or ".output." in k for k in res.unexpected_keys)
    del sd["Qformer.bert.encoder.layer.1.output_query.dense.bias"]
    with pytest.raises(KeyError, match="missing"):
        lavis.load_lavis_qformer(Blip2QFormerModel(make_config()), sd)


def test_lavis_whole_checkpoint_names():
    f = lavis.lavis_key_to_hf
    assert f("Qformer.bert.encoder.layer.4.crossattention.self.value.bias", "blip2") == \
        "qformer.encoder.layer.4.crossattention.attention.value.bias"
    assert f("Qformer.bert.embeddings.LayerNorm.weight", "blip2") == "qformer.layernorm.weight"
    assert f("Qformer.bert.embeddings.LayerNorm.weight", "instructblip") == "qformer.embeddings.layernorm.weight"
    assert f("Qformer.bert.embeddings.word_embeddings.weight", "blip2") == "embeddings.word_embeddings.weight"
    assert f("Qformer.bert.embeddings.word_embeddings.weight", "instructblip") == \
        "qformer.embeddings.word_embeddings.weight"
    assert f("Qformer.bert.embeddings.position_ids", "blip2") is None
    assert f("Qformer.cls.predictions.decoder.weight", "blip2") is None
    assert f("ln_vision.bias", "blip2") == "vision_model.post_layernorm.bias"
    assert f("opt_proj.weight", "blip2") == "language_projection.weight"
    assert f("t5_proj.bias", "blip2") == "language_projection.bias"
    assert f("llm_proj.weight", "instructblip") == "language_projection.weight"
    assert f("vision_proj.weight", "blip2") == "vision_projection.weight"
    assert f("text_proj.weight", "blip2") == "text_projection.weight"
    assert f("query_tokens", "blip2") == "query_tokens"
    assert f("Qformer.bert.encoder.layer.0.output_query.LayerNorm.weight", "blip2") == \
        "qformer.encoder.layer.0.output_query.LayerNorm.weight"
    with pytest.raises(ValueError, match="variant"):
        f("query_tokens", "blip3")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_repeated_images_exact_match_only(dtype):
    """Rows are merged only when equal in every value (and mask); a difference outside the sampled values keeps
    them apart; images needing a gradient, a single row or a broadcast mask are left alone."""
    from vlmkern.models.blip2 import repeated_images
    x = torch.randn(5, 257, 48).to(dtype)
    x[3], x[4] = x[0], x[1]
    found = repeated_images(x, None)
    assert found[2].tolist() == [0, 1, 2, 0, 1] and torch.equal(found[0], x[:3])
    y = x.clone()
    y[3, 100, 5] += 1                               # not among the sampled values
    assert repeated_images(y, None)[2].tolist() == [0, 1, 2, 3, 1]
    mask = torch.ones(5, 257, dtype=torch.long)
    mask[4, -1] = 0
    found = repeated_images(x, mask)
    assert found[2].tolist() == [0, 1, 2, 0, 3] and torch.equal(found[1], mask[[0, 1, 2, 4]])
    assert repeated_images(x.clone().requires_grad_(), None) is None
    assert repeated_images(x[:1], None) is None
    assert repeated_images(x, mask[:1]) is None
    assert repeated_images(torch.randn(3, 4, 8), None) is None   # all distinct


def test_pretrained_model_attributes_user_code_reads():
    """Class attributes and embedding accessors of transformers' Q-Former that trainers and tests read."""
    hf = hf_model(make_config())
    ours = Blip2QFormerModel.from_transformers(hf)
    for name in ("main_input_name", "supports_gradient_checkpointing", "_supports_sdpa"):
        assert getattr(ours, name) == getattr(hf, name), name
    assert ours.get_input_embeddings() is None and hf.get_input_embeddings() is None
    for model in (hf, ours):
        with pytest.raises(NotImplementedError, match="does not own input embeddings"):
            model.set_input_embeddings(torch.nn.Embedding(2, 2))
