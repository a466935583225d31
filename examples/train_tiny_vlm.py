"""Train a tiny vision-language model built only from vlmkern parts, on synthetic data.

    PYTHONPATH=. python examples/train_tiny_vlm.py            # 200 steps of batch 32 on the CPU

pixels --PatchEmbedLinear.forward_images (fused normalise + patchify + GEMM)--> image tokens
       --Blip2QFormerModel (learned queries cross-attend the image)--> queries
       --MLPProjector (GELU fused)--> LLM-width image embeddings, placed before the text
       --InternLM2DecoderLayer (partial LoRA: adapter on image positions only)--> LM head -> next-token loss

The task is synthetic: each caption spells the colour levels (4 per channel) of its image's quadrants as
tokens; the loss first falls to ln(4) = 1.39 (what the text alone gives) and below it only as image information
flows through every part. ``TinyVLM`` and ``synthetic_batch`` are also used by ``tests/integrations/test_distributed.py``
(DDP / FSDP2 vs a single process).
"""
from __future__ import annotations

import argparse
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlmkern.models.blip2 import Blip2QFormerModel
from vlmkern.models.internlm_xcomposer2 import InternLM2DecoderLayer
from vlmkern.nn import MLPProjector, PatchEmbedLinear

IMAGE, PATCH, VOCAB, TEXT = 28, 14, 64, 6


def qformer_config(hidden: int, vision: int) -> SimpleNamespace:
    """The fields ``Blip2QFormerModel`` reads (a ``transformers.Blip2QFormerConfig`` works as well)."""
    return SimpleNamespace(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2, intermediate_size=2 * hidden,
                           hidden_act="gelu", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                           layer_norm_eps=1e-12, cross_attention_frequency=1, encoder_hidden_size=vision,
                           initializer_range=0.02, max_position_embeddings=64, pad_token_id=0, vocab_size=VOCAB,
                           use_qformer_text_input=False)


def llm_config(hidden: int) -> SimpleNamespace:
    return SimpleNamespace(hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=2,
                           num_key_value_heads=1, rms_norm_eps=1e-6, bias=False, hidden_act="silu",
                           rope_theta=10000, max_position_embeddings=128)


class TinyVLM(nn.Module):
    """``forward(pixels (B, 3, H, W) uint8, text (B, T) int64) -> scalar next-token loss over the text``."""

    def __init__(self, hidden: int = 32, vision: int = 24, queries: int = 4, lora_r: int = 8):
        super().__init__()
        self.patch_embed = PatchEmbedLinear(3 * PATCH * PATCH, vision)
        self.query_tokens = nn.Parameter(torch.randn(1, queries, hidden) * 0.02)
        self.qformer = Blip2QFormerModel(qformer_config(hidden, vision))
        self.projector = MLPProjector(hidden, hidden, hidden)
        self.embed = nn.Embedding(VOCAB, hidden)
        self.decoder = InternLM2DecoderLayer(llm_config(hidden), lora_r=lora_r, lora_alpha=lora_r,
                                             lora_dropout=0.0, lora_len=queries)
        self.norm = nn.LayerNorm(hidden)
        self.lm_head = nn.Linear(hidden, VOCAB, bias=False)

    def forward(self, pixels: Tensor, text: Tensor) -> Tensor:
        B, T = text.shape
        image = self.patch_embed.forward_images(pixels, patch_size=PATCH)            # (B, P, vision)
        q = self.qformer(query_embeds=self.query_tokens.expand(B, -1, -1),
                         encoder_hidden_states=image).last_hidden_state               # (B, Q, hidden)
        h = torch.cat([self.projector(q), self.embed(text)], 1)                       # (B, Q + T, hidden)
        Q, L = q.shape[1], q.shape[1] + T
        im_mask = torch.zeros(B, L, dtype=torch.bool, device=h.device)
        im_mask[:, :Q] = True
        causal = torch.full((L, L), torch.finfo(h.dtype).min, device=h.device).triu(1)[None, None]
        pos = torch.arange(L, device=h.device)[None].expand(B, -1)
        h = self.decoder(h, causal.expand(B, 1, L, L), pos, im_mask=im_mask)[0]
        logits = self.lm_head(self.norm(h))[:, Q - 1:-1]                              # predicts every text token
        return F.cross_entropy(logits.reshape(-1, VOCAB), text.reshape(-1))


def synthetic_batch(batch: int, seed: int) -> tuple[Tensor, Tensor]:
    """Images of four flat-coloured quadrants (plus noise) and captions that spell the colours as tokens."""
    g = torch.Generator().manual_seed(seed)
    levels = torch.randint(0, 4, (batch, 3, 2, 2), generator=g)
    colours = levels * 85
    noise = torch.randint(-8, 9, (batch, 3, IMAGE, IMAGE), generator=g)
    pixels = (colours.repeat_interleave(IMAGE // 2, 2).repeat_interleave(IMAGE // 2, 3) + noise).clamp(0, 255)
    tokens = levels.flatten(1)[:, :TEXT] + 4 * torch.arange(TEXT)   # token = (position, level)
    return pixels.to(torch.uint8), tokens


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-2)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model = TinyVLM()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    for step in range(args.steps):
        pixels, text = synthetic_batch(args.batch, seed=step)
        loss = model(pixels, text)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        print(f"step {step:3d}  loss {loss.item():.4f}")


if __name__ == "__main__":
    main()
