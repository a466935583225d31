"""Typed configs of the model parts that take a ``config``: the dataclass, duck-typed objects and a missing field."""
from dataclasses import asdict
from types import SimpleNamespace

import pytest
import torch

from vlmkern.models.cogagent import CogAgentCrossAttentionConfig, CrossAttention
from vlmkern.models.cogvlm import CogVLMConfig, VisionExpertAttention, VisionExpertMLP


def test_defaults_are_the_released_models_widths():
    assert asdict(CogVLMConfig()) == dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                                          hidden_act="silu", max_position_embeddings=2048)
    cfg = CogAgentCrossAttentionConfig()
    assert (cfg.hidden_size, cfg.cross_hidden_size, cfg.cross_compute_hidden_size, cfg.num_attention_heads) == \
        (4096, 1024, 1024, 32)


def test_dataclass_and_any_object_with_the_fields_build_the_same_module():
    small = CogVLMConfig(hidden_size=16, intermediate_size=24, num_attention_heads=2)
    for cfg in (small, SimpleNamespace(**asdict(small))):
        mlp, attn = VisionExpertMLP(cfg), VisionExpertAttention(cfg)
        assert mlp.vision_mlp.gate_proj.weight.shape == (24, 16) and attn.head_dim == 8
    cross = CogAgentCrossAttentionConfig(hidden_size=16, cross_hidden_size=12, cross_compute_hidden_size=8,
                                         num_attention_heads=2)
    layer = CrossAttention(cross)
    out, _, _ = layer(torch.randn(1, 3, 16), torch.randn(1, 5, 12))
    assert out.shape == (1, 3, 16) and layer.cross_head_dim == 4
    assert CrossAttention(SimpleNamespace(**asdict(cross))).key_value.weight.shape == (16, 12)


@pytest.mark.parametrize("build, cfg, missing, typed", [
    (VisionExpertMLP, SimpleNamespace(hidden_size=16), "intermediate_size", "CogVLMConfig"),
    (VisionExpertAttention, SimpleNamespace(hidden_size=16), "num_attention_heads", "CogVLMConfig"),
    (CrossAttention, SimpleNamespace(hidden_size=16, num_attention_heads=2, cross_compute_hidden_size=8),
     "cross_hidden_size", "CogAgentCrossAttentionConfig"),
])
def test_missing_field_is_named(build, cfg, missing, typed):
    with pytest.raises(ValueError, match=f"config has no field '{missing}' .*a {typed} or any object with the fields"):
        build(cfg)


def test_bad_field_value_is_named():
    with pytest.raises(ValueError, match="config.hidden_size must be a positive int, got 0"):
        VisionExpertMLP(CogVLMConfig(hidden_size=0))
