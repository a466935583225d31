"""vlmkern.models.instructblip.InstructBlipQFormerModel against transformers.InstructBlipQFormerModel (eager).

Oracle: a float64 copy of the transformers model; baseline: the transformers model in the tested dtype.
Random weights everywhere; the instruction is padded differently per row.
"""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import InstructBlipQFormerConfig  # noqa: E402
from transformers import InstructBlipQFormerModel as HFInstructBlipQFormerModel  # noqa: E402

from vlmkern.models import lavis  # noqa: E402
from vlmkern.models.instructblip import InstructBlipQFormerModel  # noqa: E402
from vlmkern.testing import assert_close, cast_inputs, randomize_  # noqa: E402

TRITON = pytest.mark.parametrize("backend", ["triton"], indirect=True)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
            encoder_hidden_size=48, max_position_embeddings=32, vocab_size=100)
NQ, T, LK = 8, 5, 17


# ------------------------------------------------------------------------------------------ helpers
def make_config(**kw) -> InstructBlipQFormerConfig:
    cfg = InstructBlipQFormerConfig(**{**TINY, **kw})
    cfg._attn_implementation = "eager"
    return cfg


def hf_model(config) -> HFInstructBlipQFormerModel:
    return randomize_(HFInstructBlipQFormerModel(config).eval())


def instruction_inputs(batch=3, nq=NQ, t=T, lk=LK, hidden=64, enc=48, vocab=100) -> dict:
    """InstructBLIP call: queries + padded instruction ids, ``attention_mask = cat(ones(Q), instr_pad)``."""
    ids = torch.randint(1, vocab, (batch, t))
    mask = torch.ones(batch, nq + t, dtype=torch.long)
    for b in range(1, batch):
        keep = max(1, t - 2 * b)
        mask[b, nq + keep:] = 0
        ids[b, keep:] = 0                                   # pad id
    return dict(input_ids=ids, attention_mask=mask, query_embeds=torch.randn(batch, nq, hidden, dtype=torch.float64),
                encoder_hidden_states=torch.randn(batch, lk, enc, dtype=torch.float64))


def check_parity(hf, inputs: dict, dtype: torch.dtype, *, grads: bool = True, no_grad=()):
    """Outputs and the gradients of every parameter and float input of the vlmkern twin of ``hf``."""
    ref = copy.deepcopy(hf).to(torch.float64)
    base = copy.deepcopy(hf).to(dtype)
    ours = InstructBlipQFormerModel.from_transformers(base)
    runs = {}
    for name, model, dt in (("ours", ours, dtype), ("base", base, dtype), ("ref", ref, torch.float64)):
        x = cast_inputs(inputs, dt, no_grad)
        with torch.set_grad_enabled(grads):   # forward-only parity keeps no graph (peak memory)
            runs[name] = (model, x, model(**x))
    for field in ("last_hidden_state", "pooler_output"):
        a, b, r = (getattr(runs[n][2], field) for n in ("ours", "base", "ref"))
        assert a.dtype == b.dtype and a.shape == r.shape
        assert_close(a, b, r, name=field)
    if not grads:
        return
    g = torch.randn_like(runs["ref"][2].last_hidden_state)
    for name in runs:
        out = runs[name][2].last_hidden_state
        out.backward(g.to(out.dtype))
    params = {n: dict(runs[n][0].named_parameters()) for n in runs}
    for pname, p in params["ours"].items():
        rg = params["ref"][pname].grad
        if rg is None:
            assert p.grad is None or not p.grad.any(), pname
            continue
        assert_close(p.grad, params["base"][pname].grad, rg, kind="grad", dtype=dtype, name=f"d {pname}")
    for iname, v in runs["ours"][1].items():
        if torch.is_tensor(v) and v.requires_grad:
            assert_close(v.grad, runs["base"][1][iname].grad, runs["ref"][1][iname].grad, kind="grad",
                         dtype=dtype, name=f"d {iname}")


# ---------------------------------------------------------------------------------------- structure
def test_state_dict_keys_and_strict_load():
    hf = HFInstructBlipQFormerModel(make_config())
    ours = InstructBlipQFormerModel(make_config())
    assert list(ours.state_dict()) == list(hf.state_dict())
    ours.load_state_dict(hf.state_dict(), strict=True)
    hf.load_state_dict(ours.state_dict(), strict=True)
    assert "embeddings.layernorm.weight" in ours.state_dict()
    assert "embeddings.position_ids" not in ours.state_dict()          # non-persistent, as in transformers
    assert torch.equal(ours.embeddings.position_ids, hf.embeddings.position_ids)
    assert ours.get_input_embeddings() is ours.embeddings.word_embeddings


# ------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_parity_instruction_padding(dtype):
    check_parity(hf_model(make_config()), instruction_inputs(), dtype)


def test_parity_explicit_position_ids():
    x = instruction_inputs()
    x["position_ids"] = torch.arange(3, 3 + T)[None].expand(3, -1)
    check_parity(hf_model(make_config()), x, torch.float32)


def test_parity_queries_only_and_text_only():
    x = instruction_inputs()
    queries_only = dict(input_ids=None, query_embeds=x["query_embeds"],
                        encoder_hidden_states=x["encoder_hidden_states"])
    check_parity(hf_model(make_config()), queries_only, torch.float32)
    text_only = dict(input_ids=x["input_ids"], attention_mask=x["attention_mask"][:, NQ:])
    check_parity(hf_model(make_config()), text_only, torch.float32)


def test_parity_image_padding():
    """InstructBLIP builds the cross-attention mask for the query rows only, so image padding with text works."""
    x = instruction_inputs()
    m = torch.ones(3, LK, dtype=torch.long)
    m[2, LK // 2:] = 0
    x["encoder_attention_mask"] = m
    check_parity(hf_model(make_config()), x, torch.float32)


@TRITON
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_parity_triton_kernels(backend, dtype):
    """VLMKERN_BACKEND=triton (interpreter on the CPU): 2 heads of 32, 8 queries + 5 padded tokens, 17 image tokens."""
    x = instruction_inputs()
    m = torch.ones(3, LK, dtype=torch.long)
    m[2, LK // 2:] = 0
    x["encoder_attention_mask"] = m
    check_parity(hf_model(make_config()), x, dtype)


@pytest.mark.slow
def test_parity_full_size_reference_fp32_forward():
    """InstructBLIP's Q-Former widths (768 hidden, vocab 30523, 1408-wide image tokens, 257 of them), B=2, padded
    instruction; 4 of its 12 layers (two with cross-attention, as in every pair of the full model), so that the
    fp64 oracle, the fp32 baseline and vlmkern keep the test suite's peak memory under 4 GB. Forward only: the
    layers are the modules whose full-width gradients ``test_blip2_qformer.py::test_parity_full_size_reference_fp32``
    checks."""
    cfg = InstructBlipQFormerConfig(vocab_size=30523, num_hidden_layers=4)
    cfg._attn_implementation = "eager"
    hf = randomize_(HFInstructBlipQFormerModel(cfg).eval(), std=0.02, weights=False)
    x = instruction_inputs(batch=2, nq=32, t=12, lk=257, hidden=768, enc=1408, vocab=30523)
    check_parity(hf, x, torch.float32, grads=False)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_parity_full_size_cuda(dtype):
    cfg = InstructBlipQFormerConfig(vocab_size=30523)
    cfg._attn_implementation = "eager"
    hf = randomize_(HFInstructBlipQFormerModel(cfg).eval(), std=0.02, weights=False).cuda()
    x = {k: v.cuda() for k, v in instruction_inputs(batch=4, nq=32, t=24, lk=257, hidden=768, enc=1408,
                                                       vocab=30523).items()}
    check_parity(hf, x, dtype)


# ------------------------------------------------------------------------------------ outputs, extras
def test_return_dict_false_and_hidden_states():
    hf = hf_model(make_config())
    ours = InstructBlipQFormerModel.from_transformers(hf)
    x = cast_inputs(instruction_inputs(), torch.float32)
    a, b = hf(**x, return_dict=False), ours(**x, return_dict=False)
    assert isinstance(b, tuple) and len(b) == len(a)
    for u, v in zip(a, b):
        torch.testing.assert_close(v, u)
    a = hf(**x, output_hidden_states=True, output_attentions=True)
    b = ours(**x, output_hidden_states=True, output_attentions=True)
    for u, v in zip(a.hidden_states, b.hidden_states, strict=True):
        torch.testing.assert_close(v, u)
    for u, v in zip(a.cross_attentions, b.cross_attentions, strict=True):
        torch.testing.assert_close(v, u)


def test_encoder_batch_index_and_broadcast_image():
    hf = hf_model(make_config())
    ours = InstructBlipQFormerModel.from_transformers(hf)
    x = cast_inputs(instruction_inputs(), torch.float32)
    images = x["encoder_hidden_states"][:2]
    index = torch.tensor([1, 0, 1])
    expected = hf(**{**x, "encoder_hidden_states": images[index]}).last_hidden_state
    got = ours(**{**x, "encoder_hidden_states": images}, encoder_batch_index=index).last_hidden_state
    torch.testing.assert_close(got, expected)
    one = x["encoder_hidden_states"][:1]
    torch.testing.assert_close(ours(**{**x, "encoder_hidden_states": one}).last_hidden_state,
                               hf(**{**x, "encoder_hidden_states": one}).last_hidden_state)


def test_bad_input():
    ours = InstructBlipQFormerModel(make_config())
    x = cast_inputs(instruction_inputs(), torch.float32)
    with pytest.raises(ValueError, match="query_embeds when input_ids is None"):
        ours(None)
    with pytest.raises(ValueError, match="attention_mask"):
        ours(**{**x, "attention_mask": x["attention_mask"][:, NQ:]})
    with pytest.raises(TypeError, match="input_ids"):
        ours(**{**x, "input_ids": x["input_ids"].float()})
    with pytest.raises(ValueError, match="batch"):
        ours(**{**x, "input_ids": x["input_ids"][:2]})
    with pytest.raises(ValueError, match="encoder_hidden_states must be given"):
        ours(**{**x, "encoder_hidden_states": None})
    long_ids = torch.zeros(x["input_ids"].shape[0], 33, dtype=torch.long)       # 33 > max_position_embeddings
    with pytest.raises(ValueError, match="input_ids has 33 tokens, more than the 32 positions"):
        ours(**{**x, "input_ids": long_ids, "attention_mask": None})


# --------------------------------------------------------------------------------------------- LAVIS
def test_lavis_loader_round_trip():
    hf = hf_model(make_config())
    sd = lavis.qformer_state_dict_to_lavis(hf.state_dict(), "instructblip")
    assert "Qformer.bert.embeddings.LayerNorm.weight" in sd and "Qformer.bert.embeddings.word_embeddings.weight" in sd
    assert "Qformer.bert.encoder.layer.0.crossattention.self.query.weight" in sd
    sd.update({"query_tokens": torch.zeros(1, NQ, 64), "llm_proj.weight": torch.zeros(4, 64),
               "Qformer.bert.embeddings.position_ids": torch.arange(32)[None]})
    ours = InstructBlipQFormerModel(make_config()).eval()
    result = lavis.load_lavis_qformer(ours, sd)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert set(result.rest) == {"query_tokens", "llm_proj.weight", "Qformer.bert.embeddings.position_ids"}
    assert lavis.variant_of(ours) == "instructblip"
    x = cast_inputs(instruction_inputs(), torch.float32)
    torch.testing.assert_close(ours(**x).last_hidden_state, hf(**x).last_hidden_state)
