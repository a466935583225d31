"""Construction of the Q-Former models as transformers' ``PreTrainedModel`` does it: ``init_weights`` after a
meta-device build and ``to_empty()``, ``_init_weights``, ``post_init``, ``_from_config`` / ``from_config`` with
``dtype`` / ``torch_dtype``; compared with ``transformers.Blip2QFormerModel`` / ``InstructBlipQFormerModel``."""
import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from vlmkern.models.blip2 import Blip2QFormerModel  # noqa: E402
from vlmkern.models.instructblip import InstructBlipQFormerModel  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")   # transformers' deprecation chatter

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            encoder_hidden_size=48, vocab_size=50, max_position_embeddings=16, pad_token_id=0,
            initializer_range=0.05)
MODELS = pytest.mark.parametrize("hf_cls, cls, config_cls", [
    (transformers.Blip2QFormerModel, Blip2QFormerModel, transformers.Blip2QFormerConfig),
    (transformers.InstructBlipQFormerModel, InstructBlipQFormerModel, transformers.InstructBlipQFormerConfig),
], ids=["blip2", "instructblip"])


def config(config_cls, **kw):
    cfg = config_cls(**{**TINY, **kw})
    if config_cls is transformers.Blip2QFormerConfig:
        cfg.use_qformer_text_input = True
    return cfg


def materialise(model: nn.Module, seed: int) -> dict:
    """``to_empty()``, every tensor set to NaN (so that a missed init shows), then ``init_weights()`` seeded."""
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    torch.manual_seed(seed)
    model.init_weights()
    return model.state_dict()


@MODELS
def test_meta_to_empty_init_weights_matches_transformers(hf_cls, cls, config_cls):
    cfg = config(config_cls)
    with torch.device("meta"):
        hf, ours = hf_cls(cfg), cls(cfg)
    assert all(p.is_meta for p in ours.parameters())
    want, got = materialise(hf, 3), materialise(ours, 3)
    assert set(got) == set(want)
    for name, value in got.items():     # same distribution and, children before parents as there, same values
        assert torch.equal(value, want[name]), name
    std = cfg.initializer_range
    for name, m in ours.named_modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            assert abs(m.weight.std().item() - std) < 0.25 * std, name
        if isinstance(m, nn.Linear):
            assert not m.bias.any(), name
        if isinstance(m, nn.LayerNorm):
            assert torch.equal(m.weight, torch.ones_like(m.weight)) and not m.bias.any(), name
        if isinstance(m, nn.Embedding) and m.padding_idx is not None:
            assert not m.weight[m.padding_idx].any(), name
    if cls is InstructBlipQFormerModel:
        out = ours(input_ids=torch.tensor([[1, 2, 3]]))
    else:
        out = ours(query_embeds=torch.randn(1, 3, cfg.hidden_size), query_length=0)
    assert torch.isfinite(out.last_hidden_state).all()


@MODELS
def test_init_weights_and_post_init_reinitialise(hf_cls, cls, config_cls):
    """Both initialise every tensor on every call (a constructed model too), from the RNG's current state."""
    ours = cls(config(config_cls))
    for p in ours.parameters():
        p.data.fill_(7.0)
    torch.manual_seed(0)
    ours.post_init()
    first = {k: v.clone() for k, v in ours.state_dict().items()}
    assert not any((v == 7.0).all() for v in first.values())
    torch.manual_seed(0)
    ours.init_weights()
    assert all(torch.equal(v, first[k]) for k, v in ours.state_dict().items())
    ours.init_weights()                  # the RNG moved on: new draws
    key = "encoder.layer.0.attention.attention.query.weight"
    assert not torch.equal(ours.state_dict()[key], first[key])


@MODELS
def test_init_weights_of_one_module(hf_cls, cls, config_cls):
    """``_init_weights(module)`` initialises that module's own tensors as transformers' does, not its children."""
    cfg = config(config_cls)
    hf, ours = hf_cls(cfg), cls(cfg)
    for model in (hf, ours):
        for p in model.parameters():
            p.data.fill_(7.0)
    for name in ("encoder.layer.0.attention.attention.query", "encoder.layer.0.output.LayerNorm"):
        torch.manual_seed(1)
        hf._init_weights(hf.get_submodule(name))
        torch.manual_seed(1)
        ours._init_weights(ours.get_submodule(name))
        for k, v in ours.get_submodule(name).state_dict().items():
            assert torch.equal(v, hf.get_submodule(name).state_dict()[k]), f"{name}.{k}"
    ours._init_weights(ours.encoder.layer[1])                     # a container: nothing of its own
    assert all((p == 7.0).all() for p in ours.encoder.layer[1].parameters())


@MODELS
@pytest.mark.parametrize("kwargs", [{}, {"dtype": torch.bfloat16}, {"torch_dtype": torch.float16},
                                    {"dtype": "bfloat16"}, {"dtype": torch.float16, "torch_dtype": torch.bfloat16}],
                         ids=["default", "dtype", "torch_dtype", "dtype-name", "both"])
@pytest.mark.parametrize("method", ["_from_config", "from_config"])
def test_from_config_dtype_as_transformers(hf_cls, cls, config_cls, kwargs, method):
    cfg_hf, cfg_ours = config(config_cls), config(config_cls)
    default = torch.get_default_dtype()
    hf = hf_cls._from_config(cfg_hf, **kwargs)
    ours = getattr(cls, method)(cfg_ours, **kwargs)
    assert isinstance(ours, cls)
    assert torch.get_default_dtype() == default
    assert ours.dtype == hf.dtype
    assert {p.dtype for p in ours.parameters()} == {hf.dtype}
    assert cfg_ours.dtype == cfg_hf.dtype
    assert ours.state_dict().keys() == hf.state_dict().keys()


@MODELS
def test_from_config_refuses_a_non_float_dtype(hf_cls, cls, config_cls):
    with pytest.raises(ValueError, match="floating-point"):
        cls._from_config(config(config_cls), dtype=torch.int32)
    with pytest.raises(ValueError, match="dtype"):
        cls._from_config(config(config_cls), dtype="not_a_dtype")
    assert torch.get_default_dtype() == torch.float32
