"""The Q-Former's submodules as transformers 5's: the activation module of ``intermediate*`` (hookable,
replaceable), what a forward hook receives from layers and attention blocks (a tensor), ``is_causal``.

Each check runs the same change (a hook, a swapped activation) on ``transformers``' model and on vlmkern's twin
of it (same weights) and compares the outputs; the fused GELU still runs where nothing was changed.
"""
import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
from transformers.activations import GELUActivation  # noqa: E402

from vlmkern import ops  # noqa: E402
from vlmkern.models.blip2 import Blip2QFormerModel  # noqa: E402
from vlmkern.models.instructblip import InstructBlipQFormerModel  # noqa: E402
from vlmkern.testing import randomize_  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")   # transformers' deprecation chatter

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            encoder_hidden_size=48, vocab_size=50, max_position_embeddings=16)
NQ, T, LK = 4, 3, 9
INTERMEDIATES = ("intermediate", "intermediate_query")


def blip2_pair(**kw):
    cfg = transformers.Blip2QFormerConfig(**{**TINY, **kw}, use_qformer_text_input=True)
    cfg._attn_implementation = "eager"
    hf = randomize_(transformers.Blip2QFormerModel(cfg)).eval()
    return hf, Blip2QFormerModel.from_transformers(hf)


def instructblip_pair(**kw):
    cfg = transformers.InstructBlipQFormerConfig(**{**TINY, **kw})
    cfg._attn_implementation = "eager"
    hf = randomize_(transformers.InstructBlipQFormerModel(cfg)).eval()
    return hf, InstructBlipQFormerModel.from_transformers(hf)


PAIRS = pytest.mark.parametrize("pair", [blip2_pair, instructblip_pair], ids=["blip2", "instructblip"])


def inputs(model) -> dict:
    """Queries plus text rows (so both FFNs run) and image tokens, the same for both models of a pair."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, LK, TINY["encoder_hidden_size"], generator=g)
    if "InstructBlip" in type(model).__name__:
        return dict(input_ids=torch.randint(1, TINY["vocab_size"], (2, T), generator=g),
                    query_embeds=torch.randn(2, NQ, TINY["hidden_size"], generator=g), encoder_hidden_states=images)
    return dict(query_embeds=torch.randn(2, NQ + T, TINY["hidden_size"], generator=g), query_length=NQ,
                encoder_hidden_states=images)


def run(model, **kw):
    with torch.no_grad():
        return model(**inputs(model), **kw)


def assert_same_output(hf, ours):
    want = run(hf).last_hidden_state
    torch.testing.assert_close(run(ours).last_hidden_state, want, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------- F2: activation
@PAIRS
def test_intermediate_act_fn_is_transformers_module(pair):
    hf, ours = pair()
    names = [f"encoder.layer.{i}.{n}.intermediate_act_fn" for i in range(TINY["num_hidden_layers"])
             for n in INTERMEDIATES]
    hf_modules, our_modules = dict(hf.named_modules()), dict(ours.named_modules())
    for name in names:
        assert type(our_modules[name]) is type(hf_modules[name]) is GELUActivation, name
    assert set(our_modules) == set(hf_modules)


@PAIRS
@pytest.mark.parametrize("act", [nn.ReLU, nn.Tanh])
def test_replaced_activation_takes_effect(pair, act):
    hf, ours = pair()
    for model in (hf, ours):
        for layer in model.encoder.layer:
            for n in INTERMEDIATES:
                getattr(layer, n).intermediate_act_fn = act()
    assert_same_output(hf, ours)


@PAIRS
def test_hook_on_activation_fires_and_changes_output(pair):
    hf, ours = pair()
    calls = []
    for model in (hf, ours):
        for layer in model.encoder.layer:
            act = layer.intermediate_query.intermediate_act_fn
            act.register_forward_hook(lambda m, i, o: calls.append(type(o)) or o * 0.5)
    assert_same_output(hf, ours)
    assert calls == [torch.Tensor] * (2 * TINY["num_hidden_layers"])     # once per layer in each model


@pytest.mark.parametrize("hidden_act", ["gelu_new", "silu", "relu", "gelu_pytorch_tanh"])
def test_other_activations_match(hidden_act):
    hf, ours = blip2_pair(hidden_act=hidden_act)
    assert type(ours.encoder.layer[0].intermediate_query.intermediate_act_fn) is \
        type(hf.encoder.layer[0].intermediate_query.intermediate_act_fn)
    assert_same_output(hf, ours)


def test_fused_gelu_runs_only_for_plain_exact_gelu(monkeypatch):
    """The default activation still takes ``vlmkern::linear_gelu``; any change to it is called instead."""
    from vlmkern.nn._linear import plain_gelu

    hf, ours = blip2_pair()
    fused = []
    real = ops.linear_gelu
    monkeypatch.setattr(ops, "linear_gelu", lambda *a, **kw: fused.append(1) or real(*a, **kw))
    run(ours)
    assert len(fused) == 2 * TINY["num_hidden_layers"]      # query + text FFN of every layer

    class SubGELU(GELUActivation):
        pass

    hooked = GELUActivation()
    hooked.register_forward_pre_hook(lambda m, i: None)
    swapped = GELUActivation()
    swapped.act = nn.functional.silu        # its function swapped on the instance
    for act in (GELUActivation(use_gelu_python=True), nn.GELU(approximate="tanh"), SubGELU(), hooked, swapped):
        assert not plain_gelu(act), act
    assert plain_gelu(GELUActivation()) and plain_gelu(nn.GELU())

    fused.clear()
    ours.encoder.layer[0].intermediate_query.intermediate_act_fn = GELUActivation(use_gelu_python=True)
    run(ours)
    assert len(fused) == 2 * TINY["num_hidden_layers"] - 1
    hf.encoder.layer[0].intermediate_query.intermediate_act_fn = GELUActivation(use_gelu_python=True)
    assert_same_output(hf, ours)

    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: None)   # a global hook
    try:
        fused.clear()
        run(ours)
        assert not fused
    finally:
        handle.remove()


# ------------------------------------------------------------------------------------ F3: what hooks receive
def _hook_output_types(model) -> dict:
    seen = {}

    def record(name):
        def hook(module, args, output):
            seen.setdefault(name, type(output))
        return hook

    handles = [m.register_forward_hook(record(n))
               for n, m in model.named_modules() if n.startswith("encoder.layer.") and n.count(".") <= 4]
    run(model)
    for h in handles:
        h.remove()
    return seen


@PAIRS
def test_hooks_receive_transformers_output_types(pair):
    hf, ours = pair()
    want = _hook_output_types(hf)
    assert want["encoder.layer.0"] is torch.Tensor                 # the premise: transformers 5's layer output
    assert want["encoder.layer.0.attention"] is torch.Tensor
    assert want["encoder.layer.0.crossattention"] is torch.Tensor
    assert want["encoder.layer.0.attention.attention"] is tuple
    got = _hook_output_types(ours)
    assert {n: got.get(n) for n in want} == want


@PAIRS
@pytest.mark.parametrize("where", ["encoder.layer.0", "encoder.layer.1", "encoder.layer.0.attention",
                                   "encoder.layer.0.crossattention"])
def test_transformers_style_steering_hook(pair, where):
    """``lambda m, i, o: o * 2``, written for transformers 5's tensors, runs and steers the same way."""
    hf, ours = pair()
    for model in (hf, ours):
        model.get_submodule(where).register_forward_hook(lambda m, i, o: o * 2)
    assert_same_output(hf, ours)


@PAIRS
@pytest.mark.parametrize("checkpointing", [None, False, True], ids=["plain", "checkpoint", "reentrant"])
def test_attention_weights_still_reach_the_output(pair, checkpointing):
    """The weights travel on the side channel only when asked for; checkpointed layers return them too."""
    hf, ours = pair(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if checkpointing is not None:
        ours.train().gradient_checkpointing_enable({"use_reentrant": checkpointing})
    x = inputs(ours)
    x["query_embeds"].requires_grad_(True)          # a reentrant checkpoint needs an input that requires grad
    got = ours(**x, output_attentions=True)
    with torch.no_grad():
        want = hf(**inputs(hf), output_attentions=True)
    for field in ("attentions", "cross_attentions"):
        a, b = getattr(got, field), getattr(want, field)
        assert len(a) == len(b) > 0, field
        for x_, y_ in zip(a, b):
            torch.testing.assert_close(x_.detach(), y_, rtol=1e-4, atol=1e-5)
    assert run(ours.eval()).attentions is None


# ----------------------------------------------------------------------------------------- F9: attributes
@PAIRS
def test_attention_modules_are_not_causal(pair):
    hf, ours = pair()
    for name in ("encoder.layer.0.attention.attention", "encoder.layer.0.crossattention.attention"):
        assert hf.get_submodule(name).is_causal is False
        assert ours.get_submodule(name).is_causal is False
