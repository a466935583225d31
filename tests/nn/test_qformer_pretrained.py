"""The Q-Former drop-ins save and load as their transformers originals: ``save_pretrained`` writes what
transformers' ``from_pretrained`` loads, and ``from_pretrained`` loads what the original saved."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from vlmkern.models.blip2 import Blip2QFormerModel  # noqa: E402
from vlmkern.models.instructblip import InstructBlipQFormerModel  # noqa: E402

TINY = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
            encoder_hidden_size=24, max_position_embeddings=16, vocab_size=50)
PAIRS = [(Blip2QFormerModel, transformers.Blip2QFormerModel, transformers.Blip2QFormerConfig),
         (InstructBlipQFormerModel, transformers.InstructBlipQFormerModel, transformers.InstructBlipQFormerConfig)]


def _inputs(cls):
    torch.manual_seed(1)
    kw = dict(query_embeds=torch.randn(2, 4, 32), encoder_hidden_states=torch.randn(2, 6, 24))
    if cls is InstructBlipQFormerModel:
        kw["input_ids"] = torch.randint(0, 50, (2, 3))
    return kw


@pytest.mark.parametrize("ours_cls, hf_cls, cfg_cls", PAIRS, ids=["blip2", "instructblip"])
def test_save_and_load_pretrained_both_ways(tmp_path, ours_cls, hf_cls, cfg_cls):
    torch.manual_seed(0)
    original = hf_cls(cfg_cls(**TINY)).eval()
    original.save_pretrained(tmp_path / "original")
    ours = ours_cls.from_pretrained(tmp_path / "original").eval()
    assert type(ours) is ours_cls
    x = _inputs(ours_cls)
    with torch.no_grad():
        want = original(**x).last_hidden_state
        torch.testing.assert_close(ours(**x).last_hidden_state, want)
        ours.save_pretrained(tmp_path / "ours")
        back = hf_cls.from_pretrained(tmp_path / "ours").eval()
        torch.testing.assert_close(back(**x).last_hidden_state, want)
    loaded = ours_cls.from_pretrained(tmp_path / "ours", dtype=torch.float64)    # the original's arguments
    assert loaded.dtype == torch.float64


@pytest.mark.parametrize("ours_cls, hf_cls, cfg_cls", PAIRS, ids=["blip2", "instructblip"])
def test_to_transformers_runs_as_the_drop_in(ours_cls, hf_cls, cfg_cls):
    """The twin's buffers the state dict does not hold (InstructBLIP's ``position_ids``) are the constructor's."""
    ours = ours_cls(cfg_cls(**TINY)).eval()
    original = ours.to_transformers()
    assert type(original) is hf_cls and not original.training
    x = _inputs(ours_cls)
    with torch.no_grad():
        torch.testing.assert_close(original(**x).last_hidden_state, ours(**x).last_hidden_state)
