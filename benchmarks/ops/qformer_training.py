"""BLIP-2 Q-Former stage-1 training step with dropout (LAVIS stage 1): forward + backward in training mode.

One group, ``qformer train step``: the BLIP-2 Q-Former (12 layers, 768 hidden, 32 queries, 257 x 1408 image
tokens, ``hidden_dropout_prob = attention_probs_dropout_prob = 0.1`` as in LAVIS's stage 1), an ITM-style joint
pass over ``[32 queries ; 32 text tokens]`` (text padded at random lengths, one image per row), gradients into
every parameter and the input embeddings. ``vlmkern.models.blip2.Blip2QFormerModel`` (attention-probability
dropout inside the attention ops) against ``transformers.Blip2QFormerModel`` with eager attention
(``nn.functional.dropout`` on the probabilities) and with SDPA (``dropout_p=0.1``), same weights;
``vlmkern attn p=0`` is vlmkern with attention dropout off (hidden dropout on), the cost of the keep mask.

The implementations draw different dropout masks, so their outputs are not compared (no max-abs-diff column);
``tests/ops/test_attention_dropout.py`` checks vlmkern's dropout against the reference given the same mask.
bf16 on the GPU, fp32 on the CPU.
"""
from __future__ import annotations

import torch

from benchmarks.harness import Case
from benchmarks.ops.qformer import D, ENCODER_WIDTH, H, NQ, T_TEXT, _backend, _dtype, _fwd_bwd, _qformer_counts, \
    _text_padding

DROPOUT = 0.1
SMOKE = dict(hidden_size=64, num_attention_heads=2, intermediate_size=128, encoder_hidden_size=48)


def _train_step_case(device: str, rows: int, lk: int, layers: int = 12, smoke: bool = False) -> Case:
    dtype = _dtype(device)
    from transformers import Blip2QFormerConfig

    def make_config(attn_implementation=None):
        return Blip2QFormerConfig(use_qformer_text_input=True, num_hidden_layers=layers,
                                  hidden_dropout_prob=DROPOUT, attention_probs_dropout_prob=DROPOUT,
                                  attn_implementation=attn_implementation, **(SMOKE if smoke else {}))

    cfg = make_config()
    width = cfg.encoder_hidden_size
    flops, nbytes = _qformer_counts(cfg, rows, rows, T_TEXT, lk, True, torch.finfo(dtype).bits // 8)

    def setup(case: Case) -> None:
        from transformers import Blip2QFormerModel as HFModel

        from vlmkern.models.blip2 import Blip2QFormerModel

        torch.manual_seed(0)
        hf = {a: HFModel(make_config(a)).to(device=device, dtype=dtype).train() for a in ("eager", "sdpa")}
        hf["sdpa"].load_state_dict(hf["eager"].state_dict())
        ours, ours_p0 = (Blip2QFormerModel.from_transformers(hf["eager"]).train() for _ in range(2))
        for m in ours_p0.modules():
            if hasattr(m, "attention_dropout"):
                m.attention_dropout = 0.0

        g = torch.Generator().manual_seed(0)
        x = torch.randn(rows, NQ + T_TEXT, cfg.hidden_size, generator=g).to(device, dtype).requires_grad_()
        images = torch.randn(rows, lk, width, generator=g).to(device, dtype)
        mask = torch.cat([torch.ones(rows, NQ, dtype=torch.long, device=device),
                          _text_padding(rows, T_TEXT, device).long()], 1)
        grad = torch.randn(rows, NQ + T_TEXT, cfg.hidden_size, device=device, dtype=dtype)

        def run(model):
            leaves = [x] + list(model.parameters())

            def step():          # outputs differ by their dropout masks: nothing returned to compare
                _fwd_bwd(lambda: model(x, attention_mask=mask, query_length=NQ,
                                       encoder_hidden_states=images).last_hidden_state, leaves, grad)
            return step

        probe = torch.empty(1, H, 1, D, device=device, dtype=dtype)
        backend = _backend("qformer_attention", probe, probe)
        for name, model, what in (("vlmkern", ours, backend), ("vlmkern attn p=0", ours_p0, backend),
                                  ("hf eager", hf["eager"], "transformers eager"),
                                  ("hf sdpa", hf["sdpa"], "transformers sdpa")):
            case.backends[name] = what
            case.impls[name] = run(model)
        for fn in case.impls.values():      # one extra untimed call each: first-call costs out of the timing
            fn()

    targets = {"hf eager": 1.0, "hf sdpa": 1.0} if device == "cpu" and not smoke else {}
    depth = "" if layers == 12 else f" {layers} layers"
    return Case(name=f"ITM train B={rows} Lk={lk}{depth}", group="qformer train step", flops=flops, bytes=nbytes,
                setup=setup, targets=targets,
                shape=f"BLIP-2 Q-Former{depth or ' (12 layers)'}{' (tiny widths)' if smoke else ''}, train mode, "
                      f"dropout {DROPOUT}, {rows} rows {NQ}+{T_TEXT} tokens, {lk}x{width} image tokens "
                      f"{str(dtype).replace('torch.', '')}",
                notes=["training mode, hidden and attention dropout 0.1; fwd + bwd into every parameter"])


def cases(device: str, quick: bool = False, smoke: bool = False) -> list[Case]:
    """The training step when transformers (baseline and config) is installed, else nothing."""
    try:
        import transformers  # noqa: F401
    except Exception:
        return []
    if smoke:
        return [_train_step_case(device, 2, 17, layers=2, smoke=True)]
    if device == "cuda":
        return [_train_step_case(device, 32, 257)]
    if quick:
        return [_train_step_case(device, 2, 257, layers=4)]
    return [_train_step_case(device, 4, 257)]
