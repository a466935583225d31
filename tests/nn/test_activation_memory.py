"""Activation memory of every drop-in against its original: a user who swaps ours in for training must not need
more memory for the backward than the original kept.

What a forward keeps for its backward is counted on the CPU by :func:`vlmkern.testing.saved_activation_memory`
(the autograd saved tensors, unique storages, parameters, buffers and inputs left out). Ours is measured on the
default CPU path and on the Triton path that GPUs run (forced under the interpreter), in fp32 and bf16 (bf16 shows
a saved fp32 copy, which fp32 cannot), each against the original on the same inputs and weights.

Each bound is the original's bytes (factor 1.0) plus ``ALLOWANCE_PER_ROW`` bytes per row of per-row state that a
fused kernel keeps where the original keeps a full tensor or nothing: an fp32 softmax statistic (``lse``) per
attention row ``(batch, head, query)``, an int32 gather index or a routing flag per token; plus ``SEEDS`` for
dropout's ``(seed, offset)`` int64 pairs. Everything else must fit in what the original saved.

Shapes are small but keep the real proportions (32 queries, 9 text tokens, 257 image tokens, hidden 64, 2-4
heads). Figures per module are in the failure message.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from vlmkern import reference
from vlmkern.models import internlm_xcomposer2_hd as ixc
from vlmkern.models import llava_next as ln
from vlmkern.models.blip2 import Blip2QFormerModel
from vlmkern.models.cogagent import CrossAttention
from vlmkern.models.cogvlm import VisionExpertAttention, VisionExpertMLP
from vlmkern.models.instructblip import InstructBlipQFormerModel
from vlmkern.models.mini_gemini import PatchInfoMining
from vlmkern.models.qwen_vl import Resampler
from vlmkern.nn import MLPProjector, PatchEmbedLinear, PLoRA
from vlmkern.reference.originals import (cogagent, cogvlm, internlm_xcomposer2, internlm_xcomposer2_hd, mini_gemini,
                                         qwen_vl)
from vlmkern.testing import randomize_, saved_activation_memory

try:        # imported with the module, so that no test's time includes it
    import transformers
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector
    from transformers.models.llava_next import modeling_llava_next
except ImportError:
    transformers = None

ALLOWANCE_PER_ROW = 8     # bytes: an fp32 lse plus an int32 index per row
SEEDS = 64                # bytes: a few dropout (seed, offset) int64 pairs
B, NQ, T, LK, D = 2, 32, 9, 257, 64


def _need_transformers() -> None:
    if transformers is None:
        pytest.skip("the original is a transformers class")


def _leaf(*shape) -> torch.Tensor:
    return torch.randn(*shape).requires_grad_()


# ----------------------------------------------------------------------------------------------- the pairs
# Each builder gives (original, ours loaded with the original's state_dict, args, kwargs, rows): ``rows`` counts
# the per-row state ours may keep beyond the original (see the module docstring).
def _qformer(name: str):
    _need_transformers()
    blip2 = name == "blip2"
    config_cls = transformers.Blip2QFormerConfig if blip2 else transformers.InstructBlipQFormerConfig
    extra = dict(use_qformer_text_input=True) if blip2 else {}
    config = config_cls(hidden_size=D, num_hidden_layers=1, num_attention_heads=2, intermediate_size=2 * D,
                        encoder_hidden_size=48, max_position_embeddings=64, vocab_size=100, **extra)
    config._attn_implementation = "eager"
    original = randomize_((transformers.Blip2QFormerModel if blip2 else transformers.InstructBlipQFormerModel)(config))
    ours = (Blip2QFormerModel if blip2 else InstructBlipQFormerModel).from_transformers(original)
    mask = torch.ones(B, NQ + T, dtype=torch.long)
    mask[1, NQ + 5:] = 0                                              # padded text in the second row
    kwargs = dict(attention_mask=mask, encoder_hidden_states=_leaf(B, LK, 48))
    if blip2:
        kwargs.update(query_embeds=_leaf(B, NQ + T, D), query_length=NQ)
    else:
        ids = torch.randint(1, 100, (B, T))
        ids[1, 5:] = 0
        kwargs.update(input_ids=ids, query_embeds=_leaf(B, NQ, D))
    heads = config.num_attention_heads
    # one layer: self-attention over queries + text, cross-attention of the queries, both FFNs
    return original, ours, (), kwargs, heads * B * ((NQ + T) + NQ)


def _resampler():
    original = qwen_vl.Resampler(4, D, 2, 48)
    ours = Resampler(4, D, 2, 48)
    ours.load_state_dict(original.state_dict(), strict=True)
    return original, ours, (_leaf(B, 256, 48),), {}, B * 2 * 16      # 16 = 4x4 queries, 2 heads


def _plora():
    original = internlm_xcomposer2.PLoRA(D, 96, lora_r=8, lora_alpha=16, lora_dropout=0.05)
    ours = PLoRA(D, 96, lora_r=8, lora_alpha=16, lora_dropout=0.05)
    ours.load_state_dict(original.state_dict(), strict=True)
    L = 1 + LK + T
    im_mask = torch.zeros(B, L, dtype=torch.bool)
    im_mask[0, 1:1 + LK] = True
    im_mask[1, 1:100] = True
    return original, ours, (_leaf(B, L, D), im_mask), {}, B * L


def _cogvlm(kind: str):
    config = cogvlm.tiny_config()
    ours_cls, original_cls = ((VisionExpertMLP, cogvlm.VisionExpertMLP) if kind == "mlp" else
                              (VisionExpertAttention, cogvlm.VisionExpertAttention))
    original, ours = original_cls(config), ours_cls(config)
    ours.load_state_dict(original.state_dict(), strict=True)
    types, positions, mask = cogvlm.example_inputs("cpu")
    x = _leaf(*types.shape, config.hidden_size)
    args = (x, types) if kind == "mlp" else (x, types, positions, mask)
    return original, ours, args, {}, types.numel() * (1 + config.num_attention_heads)


def _cogagent():
    config = cogagent.make_config(D, 2, 32)
    original, ours = cogagent.CrossAttention(config), CrossAttention(config)
    ours.load_state_dict(original.state_dict(), strict=True)
    Lq = NQ + T
    return (original, ours, (_leaf(B, Lq, D), _leaf(B, LK, D)), dict(attention_mask=torch.zeros(B, 1, 1, 1)),
            B * 2 * Lq)


def _patch_embed(fused: bool):
    if not fused:                      # the drop-in nn.Linear on patches
        original, ours = nn.Linear(2700, D), PatchEmbedLinear(2700, D)
        ours.load_state_dict(original.state_dict(), strict=True)
        return original, ours, (_leaf(B, 12, 2700),), {}, 0

    class Patchify(nn.Linear):         # FuyuImageProcessor's patches, then vision_embed_tokens
        def forward(self, pixels):
            return super().forward(reference.patchify(pixels, 30, out_dtype=self.weight.dtype))

    class Fused(PatchEmbedLinear):
        def forward(self, pixels):
            return self.forward_images(pixels)

    original, ours = Patchify(2700, D), Fused(2700, D)
    ours.load_state_dict(original.state_dict(), strict=True)
    return original, ours, (torch.randint(0, 256, (B, 3, 61, 47), dtype=torch.uint8),), {}, 0


def _projector():
    _need_transformers()
    config = transformers.LlavaConfig(vision_config=transformers.CLIPVisionConfig(hidden_size=48),
                                      text_config=transformers.LlamaConfig(hidden_size=D), projector_hidden_act="gelu")
    original, ours = LlavaMultiModalProjector(config), MLPProjector(48, D)
    ours.load_state_dict(original.state_dict(), strict=True)
    return original, ours, (_leaf(B, LK, 48),), {}, 0


def _mini_gemini():
    original, ours = mini_gemini.UniModules(D, 48), PatchInfoMining(D, 48)
    ours.load_state_dict(original.state_dict(), strict=True)
    pn, m = 4, 2            # 16 LR tokens, 2x2 HR windows: the smallest window, where ours saves the most per HR cell
    return original, ours, (_leaf(B, pn * pn, D), _leaf(B, 48, pn * m, pn * m)), {}, B * pn * pn


def _llava_next():
    _need_transformers()
    pins = [[28, 56], [56, 28], [56, 56], [84, 28], [28, 84]]        # v1.6 pinpoints scaled to 28 px tiles
    config = transformers.LlavaNextConfig(
        vision_config=transformers.CLIPVisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=1,
                                                    num_attention_heads=2, image_size=28, patch_size=7),
        text_config=transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, num_key_value_heads=2, vocab_size=100),
        image_grid_pinpoints=pins, image_token_id=99, projector_hidden_act="gelu", vision_feature_layer=-2,
        vision_feature_select_strategy="default")
    model = transformers.LlavaNextForConditionalGeneration(config).model
    sizes = [(10, 50), (50, 11), (30, 40)]
    counts = [ln.num_tiles(s, pins, 28) for s in sizes]

    class Original(nn.Module):         # transformers: the projector on every tile, then pack_image_features
        def __init__(self):
            super().__init__()
            self.multi_modal_projector, self.image_newline = model.multi_modal_projector, model.image_newline

        def forward(self, features, image_sizes):
            projected = [self.multi_modal_projector(f) for f in torch.split(features, counts)]
            pack = modeling_llava_next.LlavaNextModel.pack_image_features
            return pack(model, projected, torch.tensor(image_sizes), "default", image_newline=self.image_newline)

    original, ours = Original(), ln.LlavaNextImagePacker(24, 32, pins, 28, 7)
    ours.load_state_dict(original.state_dict(), strict=True)
    features = torch.randn(sum(counts), 17, 24)[:, 1:].requires_grad_()       # CLS dropped: a strided view
    return original, ours, (features, sizes), {}, features.shape[0] * features.shape[1]    # gather indices


def _xcomposer2_hd():
    grids, width = [(2, 3), (1, 2)], 8

    class Original(nn.Module):         # CLIPVisionTower's layout, then vision_proj
        def __init__(self):
            super().__init__()
            self.vision_proj = nn.Sequential(nn.Linear(4 * width, 40), nn.GELU(), nn.Linear(40, 40))
            self.plora_glb_GN = nn.Parameter(torch.randn(1, 1, 4 * width))
            self.plora_sub_GN = nn.Parameter(torch.randn(1, 1, 1, 4 * width))

        def forward(self, features, image_grids):
            seq, lens = internlm_xcomposer2_hd.tower_layout(features, image_grids, self.plora_glb_GN, self.plora_sub_GN)
            return list(torch.split(self.vision_proj(seq)[0], lens)), lens

    original, ours = Original(), ixc.InternLMXComposer2HDImagePacker(width, 40)
    ours.load_state_dict(original.state_dict(), strict=True)
    tiles = sum(1 + h * w for h, w in grids)
    features = torch.randn(tiles, 17, width)[:, 1:].requires_grad_()
    return original, ours, (features, grids), {}, features.shape[0] * features.shape[1]    # gather indices


CASES = {
    "blip2_qformer": lambda: _qformer("blip2"),
    "instructblip_qformer": lambda: _qformer("instructblip"),
    "qwen_vl_resampler": _resampler,
    "plora": _plora,
    "cogvlm_expert_mlp": lambda: _cogvlm("mlp"),
    "cogvlm_expert_attention": lambda: _cogvlm("attention"),
    "cogagent_cross_attention": _cogagent,
    "patch_embed_linear": lambda: _patch_embed(False),
    "patch_embed_images": lambda: _patch_embed(True),
    "mlp_projector": _projector,
    "mini_gemini": _mini_gemini,
    "llava_next_pack": _llava_next,
    "xcomposer2_hd_pack": _xcomposer2_hd,
}


def _cast(value, dtype):
    """A float tensor argument in ``dtype`` (a leaf requiring grad if it was one); anything else as it is."""
    if torch.is_tensor(value) and value.is_floating_point():
        return value.detach().to(dtype).requires_grad_(value.requires_grad)
    return value


def build(name: str, dtype: torch.dtype):
    """``CASES[name]`` with both modules and the float arguments in ``dtype``."""
    original, ours, args, kwargs, rows = CASES[name]()
    args = tuple(_cast(a, dtype) for a in args)
    kwargs = {k: _cast(v, dtype) for k, v in kwargs.items()}
    return original.to(dtype), ours.to(dtype), args, kwargs, rows


# ------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("path", ["default", "triton"])
@pytest.mark.parametrize("name", list(CASES))
def test_saves_no_more_than_the_original(request, name, path, dtype):
    if path == "triton":
        request.getfixturevalue("backend")          # VLMKERN_BACKEND=triton (the interpreter on the CPU)
    original, ours, args, kwargs, rows = build(name, dtype)
    theirs = saved_activation_memory(original, *args, **kwargs)
    mine = saved_activation_memory(ours, *args, **kwargs)
    assert theirs.bytes > 0 or name == "patch_embed_linear"      # the measure sees the original's activations
    limit = theirs.bytes + ALLOWANCE_PER_ROW * rows + SEEDS
    assert mine.bytes <= limit, (f"{name} ({path}, {dtype}) keeps {mine.bytes} B for the backward, more than the "
                                 f"original's {theirs.bytes} B + {limit - theirs.bytes} B allowed.\n"
                                 f"ours:     {mine.describe()}\noriginal: {theirs.describe()}")


def _cuda_dropout_bytes(theirs_cpu: int, dropped_elements: int, dtype: torch.dtype) -> int:
    """The original's saved bytes as its CUDA run keeps them, from its CPU count: CPU ``nn.Dropout`` saves a noise
    tensor in the input's dtype (``input * noise``), CUDA's fused dropout a bool mask, 1 B per element. The
    dropped copy that ``Plora_A`` saves is in both counts."""
    return theirs_cpu - dropped_elements * (dtype.itemsize - 1)


@pytest.mark.parametrize("path", ["default", "triton"])
def test_plora_text_heavy_keeps_less_than_the_original_on_cuda(request, path):
    """Text-heavy IXC2 fine-tuning (10 % image rows, the original's default lora_dropout, bf16): the original keeps
    ~3 B per element of the image rows only (bool mask + dropped bf16 copy on CUDA); ours keeps a dropout mask of
    every row, which must be bit-packed to stay below that (a bool mask, 1 B per element of every row, did not)."""
    if path == "triton":
        request.getfixturevalue("backend")
    torch.manual_seed(0)
    width, length, image_rows, dtype = 512, 100, 10, torch.bfloat16
    original = randomize_(internlm_xcomposer2.PLoRA(width, 96, lora_r=8, lora_alpha=16, lora_dropout=0.05))
    ours = PLoRA(width, 96, lora_r=8, lora_alpha=16, lora_dropout=0.05)
    ours.load_state_dict(original.state_dict(), strict=True)
    original, ours = original.to(dtype), ours.to(dtype)
    im_mask = torch.zeros(B, length, dtype=torch.bool)
    im_mask[:, 1:1 + image_rows] = True
    x = _leaf(B, length, width).to(dtype).detach().requires_grad_()
    theirs = saved_activation_memory(original, x, im_mask)
    mine = saved_activation_memory(ours, x, im_mask)
    theirs_cuda = _cuda_dropout_bytes(theirs.bytes, B * image_rows * width, dtype)
    limit = theirs_cuda + ALLOWANCE_PER_ROW * B * length + SEEDS
    assert mine.bytes <= limit, (f"plora at {image_rows} % image rows ({path}) keeps {mine.bytes} B for the "
                                 f"backward, more than the original's {theirs_cuda} B on CUDA (CPU count "
                                 f"{theirs.bytes} B) + {limit - theirs_cuda} B allowed.\nours:     "
                                 f"{mine.describe()}\noriginal: {theirs.describe()}")


# ------------------------------------------------------------------------------------------ the measure itself
class _KeepsOnCtx(torch.autograd.Function):
    """Squares, keeping its input as a ``ctx`` attribute instead of saving it."""

    @staticmethod
    def forward(ctx, x):
        ctx.x = x.detach().clone()
        return x * x

    @staticmethod
    def backward(ctx, grad):
        return 2 * ctx.x * grad


class _Probe(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.first, self.second = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)

    def forward(self, x, keep_on_ctx: bool = False):
        h = torch.nn.functional.gelu(self.first(x))        # gelu saves its input, second saves h
        y = self.second(h)
        y = y + h.view(-1, 2 * y.shape[-1])[:, : y.shape[-1]].view_as(y).sin()   # sin saves a view of h
        return _KeepsOnCtx.apply(y) if keep_on_ctx else y


def test_saved_activation_memory_counts_storages_once_and_leaves_out_parameters_and_inputs():
    rows, width = 5, 8
    probe = _Probe(width).eval()
    x = torch.randn(rows, width, requires_grad=True)
    hidden = rows * 2 * width * 4                            # one fp32 (rows, 2·width) activation
    got = saved_activation_memory(probe, x)
    assert got.bytes == 2 * hidden and got.count == 2        # first's output (gelu's input) and h (its views too)
    assert max(n for n, *_ in got.largest) == hidden and not probe.training
    on_ctx = saved_activation_memory(probe, x, keep_on_ctx=True)
    assert on_ctx.bytes == 2 * hidden + rows * width * 4 and on_ctx.count == 3    # + ctx.x, no hook sees it
    assert "_KeepsOnCtx" in on_ctx.describe()
