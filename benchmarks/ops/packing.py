"""Dynamic-resolution packing fused with the projector (LLaVA-NeXT AnyRes, IXC2-4KHD).

``llava-next``: ``vlmkern.models.llava_next.project_and_pack`` (projects only the rows unpadding keeps, writes
the newline rows in the same pass) against transformers' computation (projector on every tile, then reshape /
unpad / newline; ``unfused_project_and_pack``) and the bare GEMMs on the kept rows (lower bound), llava-v1.6-7B
shapes (CLIP-L 1024 -> 4096 -> 4096), images (h, w) 672x672 and 1080x1920.
``4khd``: ``vlmkern.models.internlm_xcomposer2_hd.project_and_pack`` (2x2 merge, separators, projector in one
gather-GEMM + one GEMM) against the original layout code + projector, 1024x768 at hd_num 16 and 55.
GPU target (bf16): fused >= 0.9x the bare GEMMs on the kept rows. CPU: smaller widths (1024 -> 512 -> 512).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.harness import Case


def _no_grad(fn):
    def run():
        with torch.no_grad():
            return fn()
    return run


def _backend(x) -> str:
    from vlmkern.ops import dispatch as _dispatch
    return _dispatch.REGISTRY["gather_linear"].select(x.reshape(-1, x.shape[-1]))


def _gemm_lower_bound(projector, rows: int, c_in: int, device, dtype):
    x = torch.randn(rows, c_in, device=device, dtype=dtype)
    w1, b1 = projector.linear_1.weight, projector.linear_1.bias
    w2, b2 = projector.linear_2.weight, projector.linear_2.bias
    return _no_grad(lambda: F.linear(F.linear(x, w1, b1), w2, b2))


def _llava_case(device, size, dims, dtype) -> Case:
    from vlmkern.models import llava_next as ln
    c_in, hidden = dims
    work = ln.projector_work(size)
    rows = work["projected"]
    flops = 2.0 * rows * (c_in * hidden + hidden * hidden)
    wb = torch.finfo(dtype).bits // 8
    nbytes = wb * (work["reference"] * c_in + c_in * hidden + hidden * hidden + work["packed_tokens"] * hidden)

    def setup(case: Case) -> None:
        d = ln.benchmark_inputs([size], vision_hidden_size=c_in, text_hidden_size=hidden, device=device, dtype=dtype)
        args = (d["features"], d["image_sizes"], d["projector"], d["image_newline"])
        case.backends["vlmkern"] = _backend(d["features"])
        case.impls["vlmkern"] = _no_grad(lambda: ln.project_and_pack(*args, **d["kwargs"])[0][0])
        case.impls["transformers"] = _no_grad(lambda: ln.unfused_project_and_pack(*args, **d["kwargs"])[0][0])
        case.backends["transformers"] = case.backends["gemm on kept rows"] = "torch"
        case.impls["gemm on kept rows"] = _gemm_lower_bound(d["projector"], rows, c_in, device, dtype)

    return Case(name=f"llava-next {size[0]}x{size[1]}", group="llava-next", flops=flops, bytes=nbytes, setup=setup,
                targets={"gemm on kept rows": 0.9} if device == "cuda" else {},
                shape=f"(h, w)={size}: {work['reference']} tile rows, {rows} projected ({work['skipped']} skipped), "
                      f"{work['packed_tokens']} tokens, {c_in}->{hidden}->{hidden} {str(dtype).replace('torch.', '')}",
                notes=["'gemm on kept rows' omits the newline rows and the gather: the lower bound"])


def _ixc_case(device, hd_num, dims, dtype) -> Case:
    from vlmkern.models import internlm_xcomposer2_hd as hd
    c, hidden = dims
    h, w = hd.hd_geometry(1024, 768, hd_num).grid
    rows = hd.tokens_per_image(h, w)
    flops = 2.0 * rows * (4 * c * hidden + hidden * hidden)
    wb = torch.finfo(dtype).bits // 8
    nbytes = wb * ((1 + h * w) * 576 * c + 4 * c * hidden + hidden * hidden + rows * hidden)

    def setup(case: Case) -> None:
        d = hd.benchmark_inputs([(1024, 768)], hd_num, vit_hidden_size=c, hidden_size=hidden, device=device,
                                dtype=dtype)
        args = (d["features"], d["grids"], d["glb_GN"], d["sub_GN"], d["projector"])
        case.backends["vlmkern"] = _backend(d["features"])
        case.impls["vlmkern"] = _no_grad(lambda: hd.project_and_pack(*args)[0][0])
        case.impls["original"] = _no_grad(lambda: hd.unfused_project_and_pack(*args)[0][0])
        case.backends["original"] = case.backends["gemm on all rows"] = "torch"
        case.impls["gemm on all rows"] = _gemm_lower_bound(d["projector"], rows, 4 * c, device, dtype)

    return Case(name=f"4khd hd_num={hd_num}", group="4khd", flops=flops, bytes=nbytes, setup=setup,
                targets={"gemm on all rows": 0.9} if device == "cuda" else {},
                shape=f"1024x768, grid {h}x{w}, {rows} tokens, {4 * c}->{hidden}->{hidden} "
                      f"{str(dtype).replace('torch.', '')}")


def cases(device: str, quick: bool = False, smoke: bool = False) -> list[Case]:
    if smoke:
        return [_llava_case(device, (672, 672), (32, 64), torch.float32)]
    if device == "cuda":
        dt = torch.bfloat16
        out = [_llava_case(device, s, (1024, 4096), dt) for s in ((672, 672), (1080, 1920))]
        return out + [_ixc_case(device, n, (1024, 4096), dt) for n in ((16,) if quick else (16, 55))]
    dt = torch.float32
    out = [_llava_case(device, s, (1024, 512), dt) for s in (((1080, 1920),) if quick else ((672, 672), (1080, 1920)))]
    return out + [_ixc_case(device, 16, (256, 512), dt)]
