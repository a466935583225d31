"""MLP projector (LLaVA-1.5): ``vlmkern.nn.MLPProjector`` (bias + exact GELU in the first GEMM's epilogue)
against LLaVA's ``nn.Sequential(Linear, GELU, Linear)`` (= transformers' ``LlavaMultiModalProjector``),
eager and, on the GPU outside ``--quick`` (or with ``VLMKERN_BENCH_COMPILE=1``), compiled.

Shapes: LLaVA-1.5-7B, CLIP ViT-L/14-336 penultimate features ``(B, 576, 1024)`` -> ``(B, 576, 4096)``;
groups ``fwd`` (inference) and ``fwd+bwd`` (projector training, stage 1). bf16 on the GPU, fp32 on the CPU.
"""
from __future__ import annotations

import torch
from torch import nn

from benchmarks.harness import Case, compiled_baselines, runner

TOKENS, VISION, LLM = 576, 1024, 4096


def _modules(dtype, device, c_in, hidden, c_out):
    from vlmkern.nn import MLPProjector
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(c_in, hidden), nn.GELU(), nn.Linear(hidden, c_out)).to(device, dtype)
    ours = MLPProjector(c_in, hidden, c_out).to(device, dtype)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


def _case(device: str, batch: int, dtype: torch.dtype, train: bool, dims=(VISION, LLM, LLM),
          with_compile: bool = False) -> Case:
    c_in, hidden, c_out = dims
    m = batch * TOKENS
    flops = 2.0 * m * (c_in * hidden + hidden * c_out) * (3 if train else 1)
    wb = torch.finfo(dtype).bits // 8
    nbytes = wb * (m * c_in + c_in * hidden + hidden * c_out + m * c_out) * (2 if train else 1)

    def setup(case: Case) -> None:
        from vlmkern.ops import dispatch as _dispatch
        ours, ref = _modules(dtype, device, c_in, hidden, c_out)
        x = torch.randn(batch, TOKENS, c_in, device=device, dtype=dtype, requires_grad=train)
        g = torch.randn(batch, TOKENS, c_out, device=device, dtype=dtype)

        def run(module):        # fresh gradients (input and parameters) each call
            return runner(lambda: module(x), [x, *module.parameters()], g if train else None)()

        case.backends["vlmkern"] = _dispatch.REGISTRY["linear_gelu"].select(x, ours.linear_1.weight)
        case.impls["vlmkern"] = lambda: run(ours)
        case.backends["nn.Sequential"] = "torch eager"
        case.impls["nn.Sequential"] = lambda: run(ref)
        if with_compile:
            compiled = torch.compile(ref)
            case.backends["torch.compile"] = "inductor"
            case.impls["torch.compile"] = lambda: run(compiled)

    mode = "fwd+bwd" if train else "fwd"
    return Case(name=f"{mode} B={batch}", group=mode, flops=flops, bytes=nbytes, setup=setup,
                shape=f"({batch}, {TOKENS}, {c_in}) -> {hidden} -> {c_out} {str(dtype).replace('torch.', '')}")


def cases(device: str, quick: bool = False, smoke: bool = False) -> list[Case]:
    if smoke:
        return [_case(device, 1, torch.float32, False, dims=(32, 64, 64)),
                _case(device, 1, torch.float32, True, dims=(32, 64, 64))]
    comp = compiled_baselines(device, quick)
    if device == "cuda":
        batches = [1, 16] if quick else [1, 4, 16, 32]
        return ([_case(device, b, torch.bfloat16, False, with_compile=comp and b == 16) for b in batches]
                + [_case(device, b, torch.bfloat16, True, with_compile=comp and b == 16) for b in batches])
    # --quick on the CPU: LLaVA's 576 tokens at a quarter of its widths (1024 -> 1024 -> 1024), so that the whole
    # quick run stays near 2 min on 2 cores
    dims = (VISION, VISION, VISION) if quick else (VISION, LLM, LLM)
    return [_case(device, 1, torch.float32, False, dims=dims), _case(device, 1, torch.float32, True, dims=dims)]
