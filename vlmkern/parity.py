"""``python -m vlmkern parity``: every drop-in against its original, on random weights, as a table of errors.

The original is the transformers class where transformers has it, else the faithful port in
:mod:`vlmkern.reference.originals` (Qwen-VL, InternLM-XComposer2, CogVLM, CogAgent, Mini-Gemini), so every row
runs from an installed package. Each row runs the original in float64 (the oracle) and in the working dtype
(the baseline), and vlmkern in the working dtype, and applies the library's one tolerance rule
(:mod:`vlmkern.testing`): ``err(vlmkern) <= 2 * err(original) + floor``. Rows ``apply:*`` run a tiny
transformers model before and after :func:`vlmkern.integrations.hf.apply` (logits).
"""
from __future__ import annotations

import copy
import importlib
import math
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from vlmkern.reference.originals import cogagent, cogvlm, internlm_xcomposer2 as ixc2, mini_gemini, qwen_vl
from vlmkern.testing import FLOOR, bound, max_error


@dataclass
class Row:
    component: str
    original: str
    dtype: str = "float32"
    error: Optional[float] = None     # max |vlmkern - oracle|
    baseline: Optional[float] = None  # max |original in dtype - oracle|
    limit: Optional[float] = None
    note: str = ""
    seconds: float = 0.0

    @property
    def status(self) -> str:
        if self.error is None:
            return "skip"
        return "ok" if self.error <= self.limit else "FAIL"


# A case returns (ours, baseline, oracle) tensors or raises ``Unavailable``.
class Unavailable(Exception):
    pass


def _need(module: str):
    try:
        return importlib.import_module(module)
    except Exception as exc:
        raise Unavailable(f"{module} not importable ({type(exc).__name__})") from None


def _randomize_(module: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("weight") and ("norm" in name.lower() or "ln" in name.lower()) and p.dim() == 1:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return module


def _trio(original: nn.Module, ours: nn.Module, run: Callable[[nn.Module, torch.dtype], Tensor]):
    """Load ours from the original (strict), then run ours, the original, and the original in float64."""
    ours.load_state_dict(original.state_dict(), strict=True)
    exact = copy.deepcopy(original).double()
    with torch.no_grad():
        return run(ours.eval(), torch.float32), run(original.eval(), torch.float32), run(exact.eval(), torch.float64)


# ----------------------------------------------------------------------------------------------- cases
def case_projector():
    tf = _need("transformers")
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    from vlmkern.integrations.hf.tiny import _clip, _llama
    from vlmkern.nn import MLPProjector
    cfg = tf.LlavaConfig(vision_config=_clip(), text_config=_llama(), projector_hidden_act="gelu")
    x = torch.randn(2, 577, 24)
    return _trio(_randomize_(LlavaMultiModalProjector(cfg)), MLPProjector(24, 32, 32), lambda m, dt: m(x.to(dt)))


def case_patch_embed():
    from vlmkern.models.fuyu import patchify
    from vlmkern.nn import PatchEmbedLinear
    lin = _randomize_(nn.Linear(2700, 64))
    pixels = torch.randint(0, 256, (2, 3, 61, 95), dtype=torch.uint8)
    patches = patchify(pixels)

    def run(m, dt):
        return m.forward_images(pixels) if isinstance(m, PatchEmbedLinear) else m(patches.to(dt))
    return _trio(lin, PatchEmbedLinear(2700, 64), run)


def _qformer_kwargs(**kw):
    return dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                encoder_hidden_size=48, max_position_embeddings=32, vocab_size=100, **kw)


def case_blip2_qformer():
    tf = _need("transformers")
    from vlmkern.models.blip2 import Blip2QFormerModel
    cfg = tf.Blip2QFormerConfig(**_qformer_kwargs(use_qformer_text_input=True))
    cfg._attn_implementation = "eager"
    B, Q, T, Lk = 3, 8, 5, 17
    x = torch.randn(B, Q + T, 64)
    mask = torch.ones(B, Q + T, dtype=torch.long)
    mask[1, -2:] = 0
    img = torch.randn(B, Lk, 48)

    def run(m, dt):
        return m(query_embeds=x.to(dt), query_length=Q, attention_mask=mask,
                 encoder_hidden_states=img.to(dt)).last_hidden_state
    return _trio(_randomize_(tf.Blip2QFormerModel(cfg)), Blip2QFormerModel(cfg), run)


def case_instructblip_qformer():
    tf = _need("transformers")
    from vlmkern.models.instructblip import InstructBlipQFormerModel
    cfg = tf.InstructBlipQFormerConfig(**_qformer_kwargs())
    cfg._attn_implementation = "eager"
    B, Q, T, Lk = 3, 8, 6, 17
    ids = torch.randint(0, 100, (B, T))
    q = torch.randn(B, Q, 64)
    mask = torch.ones(B, Q + T, dtype=torch.long)
    mask[2, -3:] = 0
    img = torch.randn(B, Lk, 48)

    def run(m, dt):
        return m(input_ids=ids, attention_mask=mask, query_embeds=q.to(dt),
                 encoder_hidden_states=img.to(dt)).last_hidden_state
    return _trio(_randomize_(tf.InstructBlipQFormerModel(cfg)), InstructBlipQFormerModel(cfg), run)


def case_llava_next_pack():
    _need("transformers")
    from transformers.models.llava_next import modeling_llava_next as hf_ln

    from vlmkern.integrations.hf.tiny import tiny_llava_next
    from vlmkern.models import llava_next as ln
    model, _ = tiny_llava_next()
    cfg = model.config
    pins, tile, patch = cfg.image_grid_pinpoints, cfg.vision_config.image_size, cfg.vision_config.patch_size
    sizes = [(40, 50), (30, 20), (25, 60)]
    counts = [ln.num_tiles(s, pins, tile) for s in sizes]
    side = tile // patch
    feats = torch.randn(sum(counts), side * side, 24)

    def run(m, dt):
        proj = m.model.multi_modal_projector
        if getattr(m, "_vlmkern", False):
            out, _ = ln.project_and_pack(feats.to(dt), sizes, proj, m.model.image_newline,
                                         image_grid_pinpoints=pins, tile_size=tile, patch_size=patch)
        else:
            projected = torch.split(proj(feats.to(dt)), counts)
            out, _ = hf_ln.LlavaNextModel.pack_image_features(m.model, projected, torch.tensor(sizes), "default",
                                                              image_newline=m.model.image_newline)
        return torch.cat(out)
    ours = copy.deepcopy(model)
    ours._vlmkern = True
    return _trio(model, ours, run)


def case_qwen_resampler():
    from vlmkern.models.qwen_vl import Resampler
    x = torch.randn(2, 7 * 7, 48)   # 49 tokens: the key-side table is interpolated from the 4x4 grid
    return _trio(_randomize_(qwen_vl.Resampler(4, 64, 4, 48)), Resampler(4, 64, 4, 48), lambda m, dt: m(x.to(dt)))


def case_plora():
    from vlmkern.nn import PLoRA
    x = torch.randn(2, 257, 64)
    m = torch.zeros(2, 257, dtype=torch.bool)
    m[0, 1:200] = True
    m[1, 5:9] = True
    kw = dict(lora_r=16, lora_alpha=16, lora_dropout=0.05)
    return _trio(_randomize_(ixc2.PLoRA(64, 96, **kw)), PLoRA(64, 96, **kw), lambda mod, dt: mod(x.to(dt), m))


def case_cogvlm_mlp():
    _need("transformers.activations")   # the original's MLP builds its act_fn with ACT2FN
    from vlmkern.models.cogvlm import VisionExpertMLP
    cfg = cogvlm.tiny_config()
    types, _, _ = cogvlm.example_inputs("cpu")
    x = torch.randn(*types.shape, cfg.hidden_size)
    return _trio(_randomize_(cogvlm.VisionExpertMLP(cfg)), VisionExpertMLP(cfg), lambda m, dt: m(x.to(dt), types))


def case_cogvlm_attention():
    from vlmkern.models.cogvlm import VisionExpertAttention
    cfg = cogvlm.tiny_config()
    types, pos, mask = cogvlm.example_inputs("cpu")
    x = torch.randn(*types.shape, cfg.hidden_size)

    def run(m, dt):
        return m(x.to(dt), types, pos, attention_mask=mask.to(dt))[0]
    return _trio(_randomize_(cogvlm.VisionExpertAttention(cfg)), VisionExpertAttention(cfg), run)


def case_cogagent_cross():
    from vlmkern.models.cogagent import CrossAttention
    cfg = cogagent.make_config()
    h, e = torch.randn(2, 9, cfg.hidden_size), torch.randn(2, 65, cfg.cross_hidden_size)
    mask = torch.zeros(2, 1, 1, 1)   # the original needs a tensor; zeros = attend to every image token
    return _trio(_randomize_(cogagent.CrossAttention(cfg)), CrossAttention(cfg),
                 lambda m, dt: m(h.to(dt), e.to(dt), attention_mask=mask.to(dt))[0])


def case_mini_gemini():
    from vlmkern.models.mini_gemini import PatchInfoMining
    lr, hr = torch.randn(2, 16, 32), torch.randn(2, 24, 16, 16)
    return _trio(_randomize_(mini_gemini.UniModules(32, 24)), PatchInfoMining(32, 24),
                 lambda m, dt: m(lr.to(dt), hr.to(dt))[1])


def _apply_case(family: str):
    def case():
        _need("transformers")
        from vlmkern.integrations import hf
        from vlmkern.integrations.hf import tiny
        model, inputs = tiny.BUILDERS[family]()
        with torch.no_grad():
            ref = model(**inputs).logits
            hf.apply(model, families=[family])
            out = model(**inputs).logits
        return out, ref, ref
    return case


CASES: list[tuple[str, str, Callable]] = [
    ("nn.MLPProjector", "transformers LlavaMultiModalProjector", case_projector),
    ("nn.PatchEmbedLinear.forward_images", "nn.Linear(fuyu.patchify(pixels))", case_patch_embed),
    ("models.blip2.Blip2QFormerModel", "transformers Blip2QFormerModel", case_blip2_qformer),
    ("models.instructblip.InstructBlipQFormerModel", "transformers InstructBlipQFormerModel",
     case_instructblip_qformer),
    ("models.llava_next.project_and_pack", "transformers projector + pack_image_features", case_llava_next_pack),
    ("models.qwen_vl.Resampler", "Qwen-VL visual.Resampler (port)", case_qwen_resampler),
    ("nn.PLoRA", "IXC2 build_mlp.PLoRA (port)", case_plora),
    ("models.cogvlm.VisionExpertMLP", "CogVLM VisionExpertMLP (port)", case_cogvlm_mlp),
    ("models.cogvlm.VisionExpertAttention", "CogVLM VisionExpertAttention (port)", case_cogvlm_attention),
    ("models.cogagent.CrossAttention", "CogAgent CrossAttention (port)", case_cogagent_cross),
    ("models.mini_gemini.PatchInfoMining", "Mini-Gemini unified_resampler (port)", case_mini_gemini),
] + [(f"apply:{f}", f"transformers tiny {f} (logits)", _apply_case(f))
     for f in ("blip2", "instructblip", "fuyu", "llava", "llava_next")]


def run_parity(only: Optional[str] = None) -> list[Row]:
    rows = []
    for component, original, case in CASES:
        if only and only not in component:
            continue
        row = Row(component, original)
        t0 = time.perf_counter()
        torch.manual_seed(0)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ours, base, ref = case()
            row.error, row.baseline = max_error(ours, ref), max_error(base, ref)
            row.limit = bound(base, ref, torch.float32)
            row.dtype = str(ours.dtype).replace("torch.", "")
        except Unavailable as exc:
            row.note = str(exc)
        except Exception as exc:  # a crashing drop-in is a failure, reported in the table
            row.error, row.limit, row.note = math.inf, 0.0, f"{type(exc).__name__}: {exc}"[:120]
        row.seconds = time.perf_counter() - t0
        rows.append(row)
    return rows


def format_table(rows: list[Row]) -> str:
    def f(v):
        return "-" if v is None else f"{v:.2e}"
    head = f"{'component':<46} {'original':<46} {'dtype':<8} {'max err':>9} {'orig err':>9} {'bound':>9} status"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.component:<46} {r.original:<46} {r.dtype:<8} {f(r.error):>9} {f(r.baseline):>9} "
                     f"{f(r.limit):>9} {r.status}" + (f"  ({r.note})" if r.note else ""))
    lines.append(f"\nerrors are max |x - float64 original|; bound = 2 x orig err + {FLOOR[torch.float32]:.0e} x "
                 f"max(1, |ref|) (vlmkern.testing). apply:* rows compare logits after hf.apply with before.")
    return "\n".join(lines)


def main(only: Optional[str] = None) -> int:
    from vlmkern.ops import dispatch as _dispatch
    dev = "cpu"
    print(f"vlmkern parity on {dev}, backend {_dispatch.forced_backend() or 'auto'}, random weights\n")
    rows = run_parity(only)
    print(format_table(rows))
    return 1 if any(r.status == "FAIL" for r in rows) else 0
