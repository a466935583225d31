"""Token-routed GEMMs: partial LoRA on image rows (InternLM-XComposer2) and visual-expert
linears (CogVLM), against what a user would run instead.

PLoRA groups ``plora fwd`` / ``plora fwd+bwd``: T tokens with 0 / 25 / 50 / 100 % image rows in one contiguous
run, r = 256, scaling 1 (IXC2's settings), eval mode. Alternatives: the original ``build_mlp.PLoRA`` (boolean
gather/scatter, a host sync per call; the port in ``vlmkern.reference.originals.internlm_xcomposer2``),
all-tokens-then-mask (adapter on every row, multiplied by the mask), and plain ``nn.Linear`` (the lower bound). GPU targets (bf16): <= 1.12x plain Linear at
50 % image rows, >= 2x the original.
Expert groups ``experts fwd`` / ``experts fwd+bwd``: CogVLM's two experts, half the tokens vision-routed.
Alternatives: the original boolean split (``out[mask] = vision(x[mask])``..., a host sync per call), the
sync-free MoE formulation (sort tokens by expert, one ``grouped_mm`` over the stacked weights, unsort), and one
dense Linear of the same FLOPs (lower bound). GPU targets (issue 15, 4096 -> {4096, 6144, 14336}): <= 1.05x the
dense lower bound, at least as fast as sort + grouped_mm and as the original. On CUDA the target shapes of both
ops run first, so that a run cut short has measured them.
Full GPU runs (or ``VLMKERN_BENCH_COMPILE=1``) add ``torch.compile`` of vlmkern's pure-PyTorch references
(``vlmkern.reference.partial_lora_linear`` / ``expert_linear``) as baselines. fwd+bwd calls take fresh
gradients each call (``torch.autograd.grad``; nothing accumulates).
"""
from __future__ import annotations

import torch
from torch import nn

from benchmarks.harness import Case, compiled_baselines, runner

IXC2_SHAPES = [(4096, 6144), (4096, 4096), (4096, 14336), (14336, 4096)]   # wqkv, wo, w1/w3, w2
TARGET_SHAPES = IXC2_SHAPES[:3]                  # issue 15's target shapes, for PLoRA and the experts alike
COGVLM_SHAPES = [(4096, 12288), (4096, 11008), (11008, 4096)]               # CogVLM-17B: qkv, w1/w3, w2
RANK = 256


def _image_mask(tokens: int, frac: float, device) -> torch.Tensor:
    m = torch.zeros(1, tokens, dtype=torch.bool, device=device)
    n = int(round(tokens * frac))
    start = (tokens - n) // 2                           # one contiguous image run mid-sequence
    m[:, start:start + n] = True
    return m


def grouped_mm():
    """``torch.nn.functional.grouped_mm`` (newer torch) or ``torch._grouped_mm`` (torch 2.8-2.11), or None."""
    return getattr(nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def sorted_grouped_experts(x: torch.Tensor, w_t: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """MoE-style expert linear without a host sync: tokens sorted by expert, one grouped GEMM, unsorted.

    ``x (..., K)``, ``w_t (E, K, N)`` (the experts' ``(N, K)`` weights transposed), ``ids x.shape[:-1]``
    -> ``(..., N)``."""
    flat, fid = x.reshape(-1, x.shape[-1]), ids.reshape(-1).long()
    order = torch.argsort(fid, stable=True)
    bounds = torch.arange(1, w_t.shape[0] + 1, device=x.device, dtype=fid.dtype)
    offs = torch.searchsorted(fid[order], bounds).to(torch.int32)     # end row of each expert, on the device
    y = grouped_mm()(flat[order], w_t, offs=offs)
    return y[torch.argsort(order)].reshape(*x.shape[:-1], w_t.shape[-1])


def _plora_case(device, tokens, shape, frac, dtype, train, compile_ref=False) -> Case:
    k, n = shape
    rows = tokens * frac
    flops = (2.0 * tokens * k * n + 2.0 * rows * RANK * (k + n)) * (3 if train else 1)
    wb = torch.finfo(dtype).bits // 8
    nbytes = wb * (tokens * (k + n) + k * n + RANK * (k + n)) * (2 if train else 1)

    def setup(case: Case) -> None:
        from vlmkern import reference
        from vlmkern.nn import PLoRA
        from vlmkern.ops import dispatch as _dispatch
        from vlmkern.reference.originals.internlm_xcomposer2 import PLoRA as OriginalPLoRA
        torch.manual_seed(0)
        kw = dict(bias=False, lora_r=RANK, lora_alpha=RANK, lora_dropout=0.0, device=device, dtype=dtype)
        ours = PLoRA(k, n, **kw).eval()
        orig = OriginalPLoRA(k, n, **kw).eval()     # its init leaves the weights empty: ours' are loaded
        orig.load_state_dict(ours.state_dict(), strict=True)
        plain = nn.Linear(k, n, bias=False, device=device, dtype=dtype)
        plain.weight.data.copy_(orig.weight.data)
        x = torch.randn(1, tokens, k, device=device, dtype=dtype, requires_grad=train)
        mask = _image_mask(tokens, frac, device)
        grad = torch.randn(1, tokens, n, device=device, dtype=dtype)
        m = mask[..., None].to(dtype)

        def all_then_mask():
            return nn.functional.linear(x, orig.weight) + orig.Plora_B(orig.Plora_A(x)) * m

        g = grad if train else None
        case.backends["vlmkern"] = _dispatch.REGISTRY["partial_lora_linear"].select(x.reshape(-1, k))
        case.impls["vlmkern"] = runner(lambda: ours(x, mask), [x, *ours.parameters()], g)
        case.backends["original"] = case.backends["all-then-mask"] = case.backends["nn.Linear"] = "torch"
        case.impls["original"] = runner(lambda: orig(x, mask), [x, *orig.parameters()], g)
        case.impls["all-then-mask"] = runner(all_then_mask, [x, *orig.parameters()], g)
        case.impls["nn.Linear"] = runner(lambda: plain(x), [x, *plain.parameters()], g)
        if compile_ref:
            ref = torch.compile(reference.partial_lora_linear, dynamic=False)
            case.backends["torch.compile reference"] = "inductor"
            case.impls["torch.compile reference"] = runner(
                lambda: ref(x, orig.weight, None, orig.Plora_A.weight, orig.Plora_B.weight, mask, 1.0),
                [x, *orig.parameters()], g)

    mode = "fwd+bwd" if train else "fwd"
    targets = {"original": 2.0, "nn.Linear": 1 / 1.12} if device == "cuda" and frac == 0.5 else {}
    return Case(name=f"plora {mode} {k}->{n} img {int(frac * 100)}%", group=f"plora {mode}", flops=flops,
                bytes=nbytes, setup=setup, targets=targets,
                shape=f"T={tokens} x {k} -> {n}, r={RANK}, image rows {int(frac * 100)}% "
                      f"{str(dtype).replace('torch.', '')}")


def _expert_case(device, tokens, shape, dtype, train, compile_ref=False) -> Case:
    k, n = shape
    flops = 2.0 * tokens * k * n * (3 if train else 1)
    wb = torch.finfo(dtype).bits // 8
    nbytes = wb * (tokens * (k + n) + 2 * k * n) * (2 if train else 1)

    def setup(case: Case) -> None:
        from vlmkern import reference
        from vlmkern.ops import cogvlm_expert_ids, dispatch as _dispatch, expert_linear
        from vlmkern.reference.originals.cogvlm import get_expert_mask
        torch.manual_seed(0)
        lang = nn.Linear(k, n, bias=False, device=device, dtype=dtype)
        vis = nn.Linear(k, n, bias=False, device=device, dtype=dtype)
        x = torch.randn(1, tokens, k, device=device, dtype=dtype, requires_grad=train)
        types = torch.zeros(1, tokens, dtype=torch.long, device=device)
        types[:, 1:1 + tokens // 2] = 1                   # [BOS] + vision run + text
        ids = cogvlm_expert_ids(types)
        vmask, lmask = get_expert_mask(types)
        grad = torch.randn(1, tokens, n, device=device, dtype=dtype)

        def original():
            out = torch.empty(1, tokens, n, device=device, dtype=dtype)
            out[vmask] = vis(x[vmask])
            out[lmask] = lang(x[lmask])
            return out

        g = grad if train else None
        weights = [lang.weight, vis.weight]
        case.backends["vlmkern"] = _dispatch.REGISTRY["expert_linear"].select(x.reshape(-1, k))
        case.impls["vlmkern"] = runner(lambda: expert_linear(x, weights, ids), [x, *weights], g)
        case.backends["original"] = case.backends["dense"] = "torch"
        case.impls["original"] = runner(original, [x, *weights], g)
        case.impls["dense"] = runner(lambda: lang(x), [x, lang.weight], g)
        # A grouped-GEMM user keeps the experts stacked: (E, N, K) stored, viewed as (E, K, N) column-major.
        stacked = torch.stack([w.detach() for w in weights]).requires_grad_(train)
        grouped = runner(lambda: sorted_grouped_experts(x, stacked.transpose(1, 2), ids), [x, stacked], g)
        try:
            if grouped_mm() is None:
                raise RuntimeError("this torch has neither F.grouped_mm nor torch._grouped_mm")
            grouped()
        except Exception as exc:
            case.skipped["sort+grouped_mm"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        else:
            case.backends["sort+grouped_mm"] = "torch grouped_mm"
            case.impls["sort+grouped_mm"] = grouped
        if compile_ref:
            ref = torch.compile(reference.expert_linear, dynamic=False)
            case.backends["torch.compile reference"] = "inductor"
            case.impls["torch.compile reference"] = runner(lambda: ref(x, weights, ids), [x, *weights], g)

    mode = "fwd+bwd" if train else "fwd"
    return Case(name=f"experts {mode} {k}->{n}", group=f"experts {mode}", flops=flops, bytes=nbytes, setup=setup,
                targets={"dense": 1 / 1.05, "sort+grouped_mm": 1.0, "original": 1.0} if device == "cuda" else {},
                shape=f"T={tokens} x {k} -> {n}, 2 experts, half vision {str(dtype).replace('torch.', '')}")


def cases(device: str, quick: bool = False, smoke: bool = False) -> list[Case]:
    global RANK
    comp = compiled_baselines(device, quick)
    if smoke:
        RANK = 16
        return [_plora_case(device, 64, (32, 48), 0.5, torch.float32, False, comp),
                _expert_case(device, 64, (32, 48), torch.float32, True, comp)]
    if device == "cuda":
        RANK = 256
        dt, tokens = torch.bfloat16, 8192
        # First the target cases (50 % image rows, 4096 -> {4096, 6144, 14336}, fwd and fwd+bwd, for both
        # ops), so that a run cut by its time limit has measured them; then the other image fractions, IXC2's
        # w2 and CogVLM's own expert shapes.
        targets = TARGET_SHAPES[:1] if quick else TARGET_SHAPES
        out = [_plora_case(device, tokens, s, 0.5, dt, train, comp) for train in (False, True) for s in targets]
        out += [_expert_case(device, tokens, s, dt, train, comp) for train in (False, True) for s in targets]
        fracs = (0.0,) if quick else (0.0, 0.25, 1.0)
        out += [_plora_case(device, tokens, s, f, dt, train) for train in (False, True)
                for s in (IXC2_SHAPES[:1] if quick else IXC2_SHAPES) for f in fracs]
        out += [] if quick else [_plora_case(device, tokens, (14336, 4096), 0.5, dt, train) for train in (False, True)]
        out += [] if quick else [_expert_case(device, tokens, s, dt, train) for train in (False, True)
                                 for s in COGVLM_SHAPES]
        return out
    RANK = 64
    dt, tokens = torch.float32, 1024
    fracs = (0.5,) if quick else (0.0, 0.25, 0.5, 1.0)
    return ([_plora_case(device, tokens, (1024, 1536), f, dt, train, comp and f == 0.5)
             for train in (False, True) for f in fracs]
            + [_expert_case(device, tokens, (1024, 1536), dt, train, comp) for train in (False, True)])
