"""``vlmkern.integrations.hf.apply`` on tiny random transformers models of every family: what it swaps,
logits and greedy ``generate`` tokens before/after, dtype/device/mode/requires_grad kept, gradients, skips."""
import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from vlmkern.integrations import hf  # noqa: E402
from vlmkern.integrations.hf import tiny  # noqa: E402
from vlmkern.testing import assert_close  # noqa: E402

EXPECTED = {
    "blip2": [("qformer", "Blip2QFormerModel", "Blip2QFormerModel")],
    "instructblip": [("qformer", "InstructBlipQFormerModel", "InstructBlipQFormerModel")],
    "fuyu": [("model.vision_embed_tokens", "Linear", "FuyuPatchEmbed")],
    "llava": [("model.multi_modal_projector", "LlavaMultiModalProjector", "MLPProjector")],
    "llava_next": [("model.multi_modal_projector", "LlavaNextMultiModalProjector", "PackingProjector")],
}


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.mark.parametrize("family", list(tiny.BUILDERS))
def test_apply_keeps_logits_and_generated_tokens(family):
    model, inputs = tiny.BUILDERS[family]()
    keys = list(model.state_dict())
    with torch.no_grad():
        ref = model(**inputs).logits
        tokens_ref = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    replaced = hf.apply(model)
    assert [tuple(r) for r in replaced] == EXPECTED[family]
    module = model.get_submodule(replaced[0].qualified_name)
    assert type(module).__module__.startswith("vlmkern.")
    with torch.no_grad():
        out = model(**inputs).logits
        tokens = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    # fp32 model: the original is the oracle; vlmkern may differ only by summation order (the floor).
    assert_close(out, ref, ref, name=f"{family} logits")
    assert torch.equal(tokens, tokens_ref), (tokens, tokens_ref)
    assert hf.apply(model) == []  # idempotent
    assert list(model.state_dict()) == keys  # save_pretrained / load_state_dict see the same checkpoint layout


def test_gradient_checkpointing_carries_over():
    model, _ = tiny.tiny_blip2()
    model.gradient_checkpointing_enable()
    assert model.qformer.encoder.gradient_checkpointing
    hf.apply(model)
    assert model.qformer.encoder.gradient_checkpointing


@pytest.mark.parametrize("before_apply", [True, False])
def test_checkpointing_options_reach_the_patched_qformer(before_apply):
    """transformers' checkpoint function (with the caller's ``use_reentrant``) runs the patched layers, whether
    checkpointing was enabled before or after ``apply``."""
    model, _ = tiny.tiny_blip2()
    enable = lambda: model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})  # noqa
    if before_apply:
        enable()
    hf.apply(model)
    if not before_apply:
        enable()
    func = model.qformer.encoder._gradient_checkpointing_func
    assert model.qformer.encoder.gradient_checkpointing and func.keywords == {"use_reentrant": True}


def test_blip2_model_classes_are_all_patched():
    for kind in ("Blip2Model", "Blip2ForImageTextRetrieval"):
        model, _ = tiny.tiny_blip2(kind)
        assert [r.qualified_name for r in hf.apply(model)] == ["qformer"], kind


def test_blip2_retrieval_scores_unchanged():
    model, inputs = tiny.tiny_blip2("Blip2ForImageTextRetrieval")
    kw = {k: inputs[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    with torch.no_grad():
        itm = model(**kw, use_image_text_matching_head=True).logits_per_image
        itc = model(**kw, use_image_text_matching_head=False).logits_per_image
    hf.apply(model)
    with torch.no_grad():
        assert_close(model(**kw, use_image_text_matching_head=True).logits_per_image, itm, itm, name="itm")
        assert_close(model(**kw, use_image_text_matching_head=False).logits_per_image, itc, itc, name="itc")


@pytest.mark.parametrize("family", ["blip2", "llava"])
def test_gradients_match_after_apply(family):
    model, inputs = tiny.BUILDERS[family]()
    model.train()
    for m in model.modules():   # no dropout (modules, float probabilities, configs): both runs see one function
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        for attr in ("attention_dropout", "dropout"):
            if isinstance(getattr(m, attr, None), float):
                setattr(m, attr, 0.0)
        if hasattr(getattr(m, "config", None), "attention_probs_dropout_prob"):
            m.config.attention_probs_dropout_prob = 0.0
    patched = copy.deepcopy(model)
    hf.apply(patched)
    labels = inputs["input_ids"]
    grads = []
    for m in (model, patched):
        m.zero_grad()
        m(**inputs, labels=labels).loss.backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        assert_close(grads[1][name], g, g, kind="grad", name=name)


def test_apply_keeps_dtype_device_mode_and_requires_grad():
    model, _ = tiny.tiny_llava()
    model = model.to(torch.bfloat16).train()
    model.model.multi_modal_projector.linear_2.weight.requires_grad_(False)
    hf.apply(model)
    proj = model.model.multi_modal_projector
    assert proj.training and proj.linear_1.weight.dtype == torch.bfloat16
    assert proj.linear_1.weight.device.type == "cpu"
    assert proj.linear_1.weight.requires_grad and not proj.linear_2.weight.requires_grad
    model, _ = tiny.tiny_blip2()
    model.eval()
    hf.apply(model, families=["blip2"])
    assert not model.qformer.training


def test_families_filter_and_nested_names():
    model, _ = tiny.tiny_llava()
    assert hf.apply(model, families="fuyu") == []
    wrapper = torch.nn.ModuleDict({"vlm": model})
    assert [r.qualified_name for r in hf.apply(wrapper, families=["llava"])] == ["vlm.model.multi_modal_projector"]
    with pytest.raises(ValueError, match="families"):
        hf.apply(model, families=["nope"])
    with pytest.raises(TypeError, match="model"):
        hf.apply("not a model")


def test_non_gelu_projector_is_skipped_with_reason():
    cfg = transformers.LlavaConfig(vision_config=tiny._clip(), text_config=tiny._llama(),
                                   image_token_id=tiny.IMAGE_TOKEN, projector_hidden_act="gelu_pytorch_tanh")
    model = transformers.LlavaForConditionalGeneration(cfg)
    assert hf.apply(model) == []
    (skip,) = hf.skipped(model)
    assert skip.qualified_name == "model.multi_modal_projector" and "exact GELU" in skip.reason


def test_registry_has_one_entry_per_family():
    assert set(hf.REGISTRY) == set(EXPECTED)
    for name, fam in hf.REGISTRY.items():
        assert fam.swaps and fam.name == name


def test_llava_next_runs_the_fused_project_and_pack(monkeypatch):
    """After apply, LLaVA-NeXT's projector work happens in project_and_pack (only kept rows projected), logits
    are unchanged, and the projector called directly still projects."""
    from vlmkern.integrations.hf import llava_next as integration
    model, inputs = tiny.tiny_llava_next()
    with torch.no_grad():
        ref = model(**inputs).logits
    hf.apply(model)
    calls = []
    fused = integration.packing.project_and_pack
    monkeypatch.setattr(integration.packing, "project_and_pack", lambda *a, **k: calls.append(1) or fused(*a, **k))
    with torch.no_grad():
        out = model(**inputs).logits
    assert calls == [1]
    assert_close(out, ref, ref, name="llava_next logits")
    proj = model.model.multi_modal_projector
    x = torch.randn(3, proj.linear_1.in_features)
    assert not proj.deferred and proj(x).shape == (3, proj.linear_2.out_features)


@pytest.mark.parametrize("family", ["blip2", "instructblip"])
def test_qformer_output_hidden_states_selects_as_transformers(family):
    """transformers v5 takes ``output_hidden_states`` as a flag or as the indices to keep (others ``None``)."""
    model, _ = tiny.BUILDERS[family]()
    original = copy.deepcopy(model.qformer)
    hf.apply(model)
    g = torch.Generator().manual_seed(0)
    kw = dict(query_embeds=torch.randn(2, 4, 32, generator=g), encoder_hidden_states=torch.randn(2, 5, 24, generator=g))
    if family == "instructblip":
        kw["input_ids"] = torch.randint(3, tiny.VOCAB, (2, 3), generator=g)
    for sel in (True, False, [0, 2, -1], [1], (0,), 1, -1, [5, -7], 0, []):
        with torch.no_grad():
            want = original(**kw, output_hidden_states=sel).hidden_states
            got = model.qformer(**kw, output_hidden_states=sel).hidden_states
        assert (got is None) == (want is None), sel
        if want is not None:
            assert [h is None for h in got] == [h is None for h in want], sel
            for a, b in zip(got, want):
                if b is not None:
                    assert_close(a, b, b, name=f"hidden state {sel}")
    for bad in ("all", [1.5], [True]):
        with pytest.raises(TypeError, match="output_hidden_states"):
            model.qformer(**kw, output_hidden_states=bad)
