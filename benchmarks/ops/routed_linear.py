"""Token-routed GEMMs: partial LoRA on image rows (InternLM-XComposer2) and visual-expert
linears (CogVLM), against what a user would run instead.

PLoRA groups ``plora fwd`` / ``plora fwd+bwd``: T tokens with 0 / 25 / 50 / 100 % image rows in one contiguous
run, r = 256, scaling 1 (IXC2's settings), eval mode. Alternatives: the original ``build_mlp.PLoRA`` (boolean
gather/scatter, a host sync per call; ported from IXC2's ``build_mlp.py``), all-tokens-then-mask (adapter on every row,
multiplied by the mask), and plain ``nn.Linear`` (the lower bound). GPU targets (bf16): <= 1.12x plain Linear at
50 % image rows, >= 2x the original.
Expert groups ``experts fwd`` / ``experts fwd+bwd``: CogVLM's two experts, half the tokens vision-routed.
Alternatives: the original boolean split (``out[mask] = vision(x[mask])``...) and one dense Linear of the same
FLOPs (lower bound). GPU target: <= 1.05x the dense lower bound.
"""
from __future__ import annotations

import torch
from torch import nn

from benchmarks.harness import Case

IXC2_SHAPES = [(4096, 6144), (4096, 4096), (4096, 14336), (14336, 4096)]   # wqkv, wo, w1/w3, w2
RANK = 256


class OriginalPLoRA(nn.Linear):
    """InternLM-XComposer2 ``build_mlp.PLoRA.forward`` as published, eval mode."""

    def __init__(self, in_features, out_features, lora_r, device=None, dtype=None):
        super().__init__(in_features, out_features, False, device, dtype)
        self.lora_scaling = 1.0
        self.Plora_A = nn.Linear(in_features, lora_r, bias=False, device=device, dtype=dtype)
        self.Plora_B = nn.Linear(lora_r, out_features, bias=False, device=device, dtype=dtype)

    def forward(self, x, im_mask=None):
        res = super().forward(x)
        if im_mask is not None:
            if torch.sum(im_mask) > 0:
                part_x = x[im_mask]
                res[im_mask] += self.Plora_B(self.Plora_A(part_x)) * self.lora_scaling
            else:
                part_x = x[:, :1]
                res[:, :1] += self.Plora_B(self.Plora_A(part_x)) * 0
        return res


def _image_mask(tokens: int, frac: float, device) -> torch.Tensor:
    m = torch.zeros(1, tokens, dtype=torch.bool, device=device)
    n = int(round(tokens * frac))
    start = (tokens - n) // 2                           # one contiguous image run mid-sequence
    m[:, start:start + n] = True
    return m


def _run(fn, inputs, grad, train):
    if not train:
        with torch.no_grad():
            return fn()
    out = fn()
    out.backward(grad)
    return out


def _plora_case(device, tokens, shape, frac, dtype, train) -> Case:
    k, n = shape
    rows = tokens * frac
    flops = (2.0 * tokens * k * n + 2.0 * rows * RANK * (k + n)) * (3 if train else 1)
    wb = torch.finfo(dtype).bits // 8
    nbytes = wb * (tokens * (k + n) + k * n + RANK * (k + n)) * (2 if train else 1)

    def setup(case: Case) -> None:
        from vlmkern.nn import PLoRA
        from vlmkern.ops import _dispatch
        torch.manual_seed(0)
        orig = OriginalPLoRA(k, n, RANK, device=device, dtype=dtype).eval()
        ours = PLoRA(k, n, bias=False, lora_r=RANK, lora_alpha=RANK, device=device, dtype=dtype).eval()
        ours.load_state_dict(orig.state_dict(), strict=True)
        plain = nn.Linear(k, n, bias=False, device=device, dtype=dtype)
        plain.weight.data.copy_(orig.weight.data)
        x = torch.randn(1, tokens, k, device=device, dtype=dtype, requires_grad=train)
        mask = _image_mask(tokens, frac, device)
        grad = torch.randn(1, tokens, n, device=device, dtype=dtype)
        m = mask[..., None].to(dtype)

        def all_then_mask():
            return nn.functional.linear(x, orig.weight) + orig.Plora_B(orig.Plora_A(x)) * m

        case.backends["vlmkern"] = _dispatch.REGISTRY["partial_lora_linear"].select(x.reshape(-1, k))
        case.impls["vlmkern"] = lambda: _run(lambda: ours(x, mask), x, grad, train)
        case.backends["original"] = case.backends["all-then-mask"] = case.backends["nn.Linear"] = "torch"
        case.impls["original"] = lambda: _run(lambda: orig(x, mask), x, grad, train)
        case.impls["all-then-mask"] = lambda: _run(all_then_mask, x, grad, train)
        case.impls["nn.Linear"] = lambda: _run(lambda: plain(x), x, grad, train)

    mode = "fwd+bwd" if train else "fwd"
    targets = {"original": 2.0, "nn.Linear": 1 / 1.12} if device == "cuda" and frac == 0.5 else {}
    return Case(name=f"plora {mode} {k}->{n} img {int(frac * 100)}%", group=f"plora {mode}", flops=flops,
                bytes=nbytes, setup=setup, targets=targets,
                shape=f"T={tokens} x {k} -> {n}, r={RANK}, image rows {int(frac * 100)}% "
                      f"{str(dtype).replace('torch.', '')}")


def _expert_case(device, tokens, shape, dtype, train) -> Case:
    k, n = shape
    flops = 2.0 * tokens * k * n * (3 if train else 1)
    wb = torch.finfo(dtype).bits // 8
    nbytes = wb * (tokens * (k + n) + 2 * k * n) * (2 if train else 1)

    def setup(case: Case) -> None:
        from vlmkern.ops import _dispatch, cogvlm_expert_ids, expert_linear
        torch.manual_seed(0)
        lang = nn.Linear(k, n, bias=False, device=device, dtype=dtype)
        vis = nn.Linear(k, n, bias=False, device=device, dtype=dtype)
        x = torch.randn(1, tokens, k, device=device, dtype=dtype, requires_grad=train)
        types = torch.zeros(1, tokens, dtype=torch.long, device=device)
        types[:, 1:1 + tokens // 2] = 1                   # [BOS] + vision run + text
        ids = cogvlm_expert_ids(types)
        vmask = ids.bool()
        grad = torch.randn(1, tokens, n, device=device, dtype=dtype)

        def original():
            out = torch.empty(1, tokens, n, device=device, dtype=dtype)
            out[vmask] = vis(x[vmask])
            out[~vmask] = lang(x[~vmask])
            return out

        case.backends["vlmkern"] = _dispatch.REGISTRY["expert_linear"].select(x.reshape(-1, k))
        case.impls["vlmkern"] = lambda: _run(lambda: expert_linear(x, [lang.weight, vis.weight], ids), x, grad,
                                             train)
        case.backends["original"] = case.backends["dense"] = "torch"
        case.impls["original"] = lambda: _run(original, x, grad, train)
        case.impls["dense"] = lambda: _run(lambda: lang(x), x, grad, train)

    mode = "fwd+bwd" if train else "fwd"
    return Case(name=f"experts {mode} {k}->{n}", group=f"experts {mode}", flops=flops, bytes=nbytes, setup=setup,
                targets={"dense": 1 / 1.05} if device == "cuda" else {},
                shape=f"T={tokens} x {k} -> {n}, 2 experts, half vision {str(dtype).replace('torch.', '')}")


def cases(device: str, quick: bool = False, smoke: bool = False) -> list[Case]:
    global RANK
    if smoke:
        RANK = 16
        return [_plora_case(device, 64, (32, 48), 0.5, torch.float32, False),
                _expert_case(device, 64, (32, 48), torch.float32, True)]
    if device == "cuda":
        RANK = 256
        dt, tokens = torch.bfloat16, 8192
        shapes = IXC2_SHAPES[:1] if quick else IXC2_SHAPES
        fracs = (0.0, 0.5) if quick else (0.0, 0.25, 0.5, 1.0)
        out = [_plora_case(device, tokens, s, f, dt, train) for train in (False, True) for s in shapes for f in fracs]
        out += [_expert_case(device, tokens, (4096, 12288), dt, train) for train in (False, True)]
        out += [] if quick else [_expert_case(device, tokens, s, dt, True) for s in ((4096, 11008), (11008, 4096))]
        return out
    RANK = 64
    dt, tokens = torch.float32, 1024
    fracs = (0.0, 0.5) if quick else (0.0, 0.25, 0.5, 1.0)
    return ([_plora_case(device, tokens, (1024, 1536), f, dt, train) for train in (False, True) for f in fracs]
            + [_expert_case(device, tokens, (1024, 1536), dt, train) for train in (False, True)])
