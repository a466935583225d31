"""Tiny random-weight transformers models of every patched family, with matching inputs.

Used by the tests and ``python -m vlmkern parity`` to check ``apply`` end to end (logits and ``generate``)
without downloading a checkpoint. Each builder returns ``(model, inputs)`` where ``model(**inputs)`` runs
and ``model.generate(**inputs, ...)`` works; weights are random with non-trivial biases.
"""
from __future__ import annotations

import inspect
from typing import Callable

import torch
from torch import nn

IMAGE_TOKEN = 99
VOCAB = 128


def _randomize_(model: nn.Module, std: float = 0.05) -> nn.Module:
    """Random values everywhere (norm weights around 1) so no bias or norm weight is trivial."""
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * std
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + noise)
            elif p.dim() >= 2 and "embed" not in name:
                p.copy_(noise / std * p.shape[-1] ** -0.5)   # fan-in scaled: signals survive the depth
            else:
                p.copy_(noise * 10 if "embed" in name else noise)
    return model


def _llama(**kw):
    import transformers
    return transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=2, vocab_size=VOCAB,
                                    pad_token_id=0, bos_token_id=1, eos_token_id=2, **kw)


def _clip(image_size: int = 28, patch_size: int = 14):
    import transformers
    return transformers.CLIPVisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=2, image_size=image_size, patch_size=patch_size)


def _qformer_kwargs():
    return dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                encoder_hidden_size=24, max_position_embeddings=32, vocab_size=VOCAB)


def _text_ids(batch: int, n_image: int, n_text: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    text = torch.randint(3, IMAGE_TOKEN, (batch, n_text), generator=g)
    return torch.cat([torch.full((batch, n_image), IMAGE_TOKEN), torch.ones(batch, 1, dtype=torch.long), text], 1)


def tiny_blip2(kind: str = "Blip2ForConditionalGeneration"):
    import transformers
    nq = 4
    qformer = transformers.Blip2QFormerConfig(**_qformer_kwargs(),
                                              use_qformer_text_input=kind == "Blip2ForImageTextRetrieval")
    cfg = transformers.Blip2Config(vision_config=_clip().to_dict() | {"model_type": "blip_2_vision_model"},
                                   qformer_config=qformer.to_dict(),
                                   text_config=_llama().to_dict() | {"model_type": "llama"},
                                   num_query_tokens=nq, image_token_index=IMAGE_TOKEN)
    model = _randomize_(getattr(transformers, kind)(cfg)).eval()
    g = torch.Generator().manual_seed(3)
    pixels = torch.randn(2, 3, 28, 28, generator=g)
    ids = _text_ids(2, nq)
    return model, dict(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids))


def tiny_instructblip():
    import transformers
    nq = 4
    cfg = transformers.InstructBlipConfig(
        vision_config=_clip().to_dict() | {"model_type": "instructblip_vision_model"},
        qformer_config=transformers.InstructBlipQFormerConfig(**_qformer_kwargs()).to_dict(),
        text_config=_llama().to_dict() | {"model_type": "llama"}, num_query_tokens=nq,
        image_token_index=IMAGE_TOKEN)
    model = _randomize_(transformers.InstructBlipForConditionalGeneration(cfg)).eval()
    g = torch.Generator().manual_seed(3)
    pixels = torch.randn(2, 3, 28, 28, generator=g)
    ids = _text_ids(2, nq)
    qids = torch.randint(3, VOCAB, (2, 6), generator=g)
    qmask = torch.ones_like(qids)
    qmask[1, -2:] = 0   # instruction padding exercises the key-padding mask
    return model, dict(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids),
                       qformer_input_ids=qids, qformer_attention_mask=qmask)


def tiny_fuyu():
    import transformers
    cfg = transformers.FuyuConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=2, image_token_id=IMAGE_TOKEN, patch_size=30, num_channels=3,
                                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = _randomize_(transformers.FuyuForCausalLM(cfg)).eval()
    g = torch.Generator().manual_seed(3)
    n_patches = 3
    patches = torch.randn(2, n_patches, 2700, generator=g)
    ids = _text_ids(2, n_patches)
    pos = torch.arange(n_patches).expand(2, -1)
    pix_idx = torch.cat([pos, torch.full((2, ids.shape[1] - n_patches), -1)], 1)
    inputs = dict(input_ids=ids, image_patches=patches, attention_mask=torch.ones_like(ids))
    if "image_patches_indices" in inspect.signature(model.forward).parameters:   # transformers < 5
        inputs["image_patches_indices"] = pix_idx
    return model, inputs


NEWLINE_TOKEN = 100


def tiny_fuyu_processor():
    """A ``FuyuProcessor`` with a tiny word-level tokenizer over the ids of ``tiny_fuyu`` (``|SPEAKER|`` =
    ``IMAGE_TOKEN``, ``|NEWLINE|`` = ``NEWLINE_TOKEN``). Like Fuyu's tokenizer it puts a ``▁`` before the image
    placeholders (the processor strips that first token). Prompt words: ``a cat what is this ?``."""
    import transformers
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers

    words = ["<pad>", "<s>", "</s>", "<unk>", "\u2581", "<0x04>", "a", "cat", "what", "is", "this", "?", "\n"]
    vocab = {w: i for i, w in enumerate(words)} | {"|SPEAKER|": IMAGE_TOKEN, "|NEWLINE|": NEWLINE_TOKEN}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("\u2581|" + r"\|SPEAKER\||\|NEWLINE\||<0x04>|\?|\n"), "isolated")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>", unk_token="<unk>")
    return transformers.FuyuProcessor(image_processor=transformers.FuyuImageProcessor(), tokenizer=fast)


def tiny_llava():
    import transformers
    cfg = transformers.LlavaConfig(vision_config=_clip(), text_config=_llama(), image_token_id=IMAGE_TOKEN,
                                   projector_hidden_act="gelu", vision_feature_layer=-2,
                                   vision_feature_select_strategy="default")
    model = _randomize_(transformers.LlavaForConditionalGeneration(cfg)).eval()
    g = torch.Generator().manual_seed(3)
    pixels = torch.randn(2, 3, 28, 28, generator=g)
    ids = _text_ids(2, 4)   # (28 / 14)^2 patches, CLS dropped
    return model, dict(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids))


def tiny_llava_next():
    import transformers

    from vlmkern.models import llava_next as ln
    tile, patch = 28, 14
    pins = [[28, 56], [56, 28], [56, 56]]
    cfg = transformers.LlavaNextConfig(vision_config=_clip(tile, patch), text_config=_llama(),
                                       image_grid_pinpoints=pins, image_token_id=IMAGE_TOKEN,
                                       projector_hidden_act="gelu", vision_feature_layer=-2,
                                       vision_feature_select_strategy="default")
    model = _randomize_(transformers.LlavaNextForConditionalGeneration(cfg)).eval()
    sizes = [(40, 50), (30, 20)]
    n_tiles = [ln.num_tiles(s, pins, tile) for s in sizes]
    g = torch.Generator().manual_seed(3)
    pixels = torch.zeros(len(sizes), max(n_tiles), 3, tile, tile)
    for i, n in enumerate(n_tiles):
        pixels[i, :n] = torch.randn(n, 3, tile, tile, generator=g)
    n_img = [ln.packed_length(s, pins, tile, patch) for s in sizes]
    ids = [torch.cat([torch.full((n,), IMAGE_TOKEN), torch.tensor([1, 5, 6, 7])]) for n in n_img]
    L = max(len(t) for t in ids)
    input_ids = torch.zeros(len(ids), L, dtype=torch.long)
    mask = torch.zeros(len(ids), L, dtype=torch.long)
    for i, t in enumerate(ids):   # left padding, as for generation
        input_ids[i, L - len(t):] = t
        mask[i, L - len(t):] = 1
    return model, dict(input_ids=input_ids, pixel_values=pixels, image_sizes=torch.tensor(sizes),
                       attention_mask=mask)


BUILDERS: dict[str, Callable] = {
    "blip2": tiny_blip2,
    "instructblip": tiny_instructblip,
    "fuyu": tiny_fuyu,
    "llava": tiny_llava,
    "llava_next": tiny_llava_next,
}
