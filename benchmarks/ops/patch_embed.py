"""Fuyu patch embedding: ``vlmkern.ops.patch_embed`` / ``vlmkern.ops.patchify`` against what a user
would run instead, on Fuyu-8B's sizes (patch 30, 3 channels -> 2700, hidden 4096; images up to 1080x1920).

Groups (one plot panel each):

* ``e2e``: uint8 HWC images in host memory (as a data loader yields them) -> token embeddings on the device.
  Alternatives: HF ``FuyuImageProcessor`` (resize/pad/rescale/normalize, crop, ``patchify_image``) + ``nn.Linear``,
  ``vlmkern.ops.patchify`` + Linear, and the GEMM alone on pre-made patches (lower bound).
  GPU target: vlmkern >= 10x ``hf processor+linear``.
* ``fused`` (GPU only): uint8 ``(B, 3, H, W)`` already on the GPU -> tokens. Alternatives: torch unfold + Linear
  (eager; compiled at 1080x1920 outside ``--quick``), ``vlmkern.ops.patchify`` + Linear, GEMM alone.
  GPU target: vlmkern >= 0.8x ``gemm only`` (i.e. within 25 % of the GEMM alone).
* ``patchify``: uint8 image -> normalised fp32 patches ``(B, nP, 2700)``. CPU target: the C++ patchify >= 5x
  ``hf processor`` (the processor's uint8 -> patches path); ``hf patchify_image`` times HF's reshape step alone
  on an already-normalised image.

Weights: bf16 on the GPU, fp32 on the CPU. Inputs are seeded random pixels (timing does not depend on values).
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.harness import Case

PATCH = 30
CHANNELS = 3
K = PATCH * PATCH * CHANNELS      # 2700
HIDDEN = 4096                      # Fuyu-8B / Persimmon-8B hidden size
FULL = (1080, 1920)                # Fuyu's maximum image (H, W): 36 x 64 = 2304 patches


# ------------------------------------------------------------------------------------------ inputs
def _n_patches(h: int, w: int) -> int:
    return -(-h // PATCH) * -(-w // PATCH)


def _images_hwc(batch: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(batch, h, w, CHANNELS), dtype=np.uint8)


def _weights(hidden: int, dtype: torch.dtype, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(hidden, K, generator=g) * 0.02).to(device=device, dtype=dtype)
    b = (torch.randn(hidden, generator=g) * 0.02).to(device=device, dtype=dtype)
    return w, b


def _to_bchw(hwc: np.ndarray, device: str) -> torch.Tensor:
    """``(B, H, W, C)`` uint8 host array -> ``(B, C, H, W)`` uint8 view on ``device`` (one copy, no reorder)."""
    return torch.from_numpy(hwc).to(device).permute(0, 3, 1, 2)


# ------------------------------------------------------------------------------------ vlmkern pieces
def _vlmkern_patchify() -> tuple[Optional[Callable], str]:
    """``vlmkern.ops.patchify`` if it exists yet, else ``(None, why)``."""
    try:
        from vlmkern import ops
        fn = getattr(ops, "patchify", None)
        if fn is None:
            from vlmkern.ops import patch_embed as module
            fn = getattr(module, "patchify", None)
    except Exception as exc:
        return None, f"vlmkern not importable: {type(exc).__name__}: {exc}"
    return fn, "" if fn is not None else "vlmkern.ops.patchify does not exist yet"


def _backend(op: str, *args) -> str:
    """Which backend vlmkern's dispatch picks for these inputs (what was actually timed)."""
    try:
        from vlmkern.ops import dispatch as _dispatch
        return _dispatch.REGISTRY[op].select(*args)
    except Exception as exc:
        return f"? ({type(exc).__name__})"


# ----------------------------------------------------------------------------------------- baselines
def torch_unfold_linear(pixels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """What a PyTorch user writes (Fuyu's processor math on tensors): pad, rescale, normalise, unfold, Linear."""
    B, C, H, W = pixels.shape
    nH, nW = -(-H // PATCH), -(-W // PATCH)
    x = F.pad(pixels.float(), (0, nW * PATCH - W, 0, nH * PATCH - H), value=1.0)
    x = (x * (1 / 255) - 0.5) / 0.5
    x = x.unfold(2, PATCH, PATCH).unfold(3, PATCH, PATCH)                  # (B, C, nH, nW, p, p)
    x = x.permute(0, 2, 3, 4, 5, 1).reshape(B, nH * nW, K).to(weight.dtype)
    return F.linear(x, weight, bias)


@contextlib.contextmanager
def _quiet_transformers():
    try:
        from transformers.utils import logging as hf_logging
    except Exception:
        yield
        return
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


_HF: dict[str, Any] = {}


def hf_processor() -> tuple[Any, str]:
    """``transformers.FuyuImageProcessor()`` (``FuyuImageProcessorPil`` where torchvision is missing) or ``(None, why)``."""
    if "proc" not in _HF:
        proc, why = None, ""
        try:
            import transformers
            with _quiet_transformers():
                try:
                    proc = transformers.FuyuImageProcessor()
                except Exception:
                    proc = transformers.FuyuImageProcessorPil()
        except Exception as exc:
            why = f"transformers Fuyu image processor unavailable: {type(exc).__name__}: {exc}"
        _HF["proc"], _HF["why"] = proc, why
    return _HF["proc"], _HF["why"]


def hf_label(proc) -> str:
    """Which HF backend ran: the PIL/numpy one (no torchvision) or the torchvision one."""
    name = type(proc).__name__
    return "hf pil" if name.endswith("Pil") else "hf torchvision" if name == "FuyuImageProcessor" else name


def _patch_hw(proc) -> tuple[int, int]:
    ps = proc.patch_size
    return (ps["height"], ps["width"]) if isinstance(ps, dict) else (ps.height, ps.width)


def _first(x):
    while isinstance(x, (list, tuple)):
        x = x[0]
    return x


def hf_patches(proc, images_hwc: list[np.ndarray]) -> torch.Tensor:
    """HF's uint8 -> patches path, as ``FuyuProcessor._process_images`` runs it: ``(B, nP, 2700)`` fp32.

    The processor resizes (only if larger than 1080x1920), pads to 1080x1920 with 1.0, rescales and
    normalises; the image is then cropped to whole patches and ``patchify_image`` flattens it.
    """
    with _quiet_transformers():
        out = proc(images_hwc)
    ph, pw = _patch_hw(proc)
    result = []
    for i, img in enumerate(out["images"]):
        img = _first(img)
        h, w = img.shape[-2:]
        new_h = min(h, math.ceil(int(_first(out["image_unpadded_heights"][i])) / ph) * ph)
        new_w = min(w, math.ceil(int(_first(out["image_unpadded_widths"][i])) / pw) * pw)
        patches = _hf_patchify_image(proc, img[None, :, :new_h, :new_w])
        result.append(torch.as_tensor(patches).reshape(-1, patches.shape[-1]))
    return torch.stack(result)


def _hf_patchify_image(proc, img):
    """``proc.patchify_image``; older processors (v4.x) patchify torch tensors only, the PIL one numpy arrays."""
    try:
        return proc.patchify_image(img)
    except (AttributeError, TypeError):
        if isinstance(img, torch.Tensor):
            raise
        return proc.patchify_image(torch.from_numpy(np.ascontiguousarray(img)))


def _hf_normalised(proc, image_hwc: np.ndarray):
    """The processor's normalised, cropped ``(C, H', W')`` image: the input of ``patchify_image`` alone."""
    with _quiet_transformers():
        out = proc([image_hwc])
    ph, pw = _patch_hw(proc)
    img = _first(out["images"][0])
    h, w = image_hwc.shape[:2]
    return img[:, :min(img.shape[-2], -(-h // ph) * ph), :min(img.shape[-1], -(-w // pw) * pw)]


# --------------------------------------------------------------------------------------------- cases
def _gemm_counts(batch: int, h: int, w: int, hidden: int, wbytes: int) -> tuple[float, float]:
    m = batch * _n_patches(h, w)
    flops = 2.0 * m * hidden * K + m * hidden
    nbytes = batch * CHANNELS * h * w + (hidden * K + hidden) * wbytes + m * hidden * wbytes
    return flops, nbytes


def _shape_text(batch: int, h: int, w: int, hidden: int, dtype: torch.dtype) -> str:
    nH, nW = -(-h // PATCH), -(-w // PATCH)
    return (f"{batch}x uint8 {h}x{w} -> ({batch}, {nH}x{nW}={nH * nW}, {hidden}) "
            f"{str(dtype).replace('torch.', '')}, W {hidden}x{K}")


def _size_name(batch: int, h: int, w: int) -> str:
    return f"{batch}x{h}x{w}" if batch > 1 else f"{h}x{w}"


def _e2e_case(device: str, batch: int, h: int, w: int, hidden: int, dtype: torch.dtype) -> Case:
    flops, nbytes = _gemm_counts(batch, h, w, hidden, torch.finfo(dtype).bits // 8)
    targets = {"hf processor+linear": 10.0} if device == "cuda" else {}

    def setup(case: Case) -> None:
        hwc = _images_hwc(batch, h, w)
        images = list(hwc)
        weight, bias = _weights(hidden, dtype, device)
        from vlmkern import ops, reference
        pix = _to_bchw(hwc, device)
        case.backends["vlmkern"] = _backend("patch_embed", pix, weight)
        case.impls["vlmkern"] = lambda: ops.patch_embed(_to_bchw(hwc, device), weight, bias)

        patchify, why = _vlmkern_patchify()
        if patchify is not None:
            case.backends["vlmkern patchify+linear"] = _backend("patchify", pix, PATCH, torch.float32)
            case.impls["vlmkern patchify+linear"] = lambda: F.linear(
                patchify(_to_bchw(hwc, device)).to(dtype), weight, bias)
        else:
            case.skipped["vlmkern patchify+linear"] = why

        proc, why = hf_processor()
        if proc is not None:
            case.backends["hf processor+linear"] = hf_label(proc)
            case.notes.append(f"HF processor: transformers.{type(proc).__name__}")
            case.impls["hf processor+linear"] = lambda: F.linear(
                hf_patches(proc, images).to(device=device, dtype=dtype), weight, bias)
        else:
            case.skipped["hf processor+linear"] = why

        patches = reference.patchify(pix, PATCH, out_dtype=dtype)
        case.backends["gemm only"] = "torch"
        case.impls["gemm only"] = lambda: F.linear(patches, weight, bias)

    return Case(name=f"e2e {_size_name(batch, h, w)}", group="e2e", shape=_shape_text(batch, h, w, hidden, dtype)
                + " (host uint8 HWC in)", flops=flops, bytes=nbytes, setup=setup, targets=targets,
                notes=["'gemm only' runs F.linear on pre-made patches already on the device (lower bound)"])


def _fused_case(device: str, batch: int, h: int, w: int, hidden: int, dtype: torch.dtype,
                with_compile: bool) -> Case:
    flops, nbytes = _gemm_counts(batch, h, w, hidden, torch.finfo(dtype).bits // 8)

    def setup(case: Case) -> None:
        from vlmkern import ops, reference
        pix = _to_bchw(_images_hwc(batch, h, w), device).contiguous()
        weight, bias = _weights(hidden, dtype, device)
        case.backends["vlmkern"] = _backend("patch_embed", pix, weight)
        case.impls["vlmkern"] = lambda: ops.patch_embed(pix, weight, bias)
        patches = reference.patchify(pix, PATCH, out_dtype=dtype)
        case.backends["gemm only"] = "torch"
        case.impls["gemm only"] = lambda: F.linear(patches, weight, bias)
        case.backends["torch unfold+linear"] = "torch"
        case.impls["torch unfold+linear"] = lambda: torch_unfold_linear(pix, weight, bias)
        if with_compile:
            compiled = torch.compile(torch_unfold_linear, dynamic=False)
            case.backends["torch.compile unfold+linear"] = "inductor"
            case.impls["torch.compile unfold+linear"] = lambda: compiled(pix, weight, bias)
        patchify, why = _vlmkern_patchify()
        if patchify is not None:
            case.backends["vlmkern patchify+linear"] = _backend("patchify", pix, PATCH, torch.float32)
            case.impls["vlmkern patchify+linear"] = lambda: F.linear(patchify(pix).to(dtype), weight, bias)
        else:
            case.skipped["vlmkern patchify+linear"] = why

    return Case(name=f"fused {_size_name(batch, h, w)}", group="fused",
                shape=_shape_text(batch, h, w, hidden, dtype) + " (device uint8 NCHW in)", flops=flops,
                bytes=nbytes, setup=setup, targets={"gemm only": 0.8},
                notes=["target: vlmkern time <= 1.25x the GEMM alone (speedup over 'gemm only' >= 0.8)"])


def _patchify_case(device: str, batch: int, h: int, w: int) -> Case:
    m = batch * _n_patches(h, w)
    flops, nbytes = 2.0 * m * K, batch * CHANNELS * h * w + 4.0 * m * K
    targets = {"hf processor": 5.0} if device == "cpu" else {}

    def setup(case: Case) -> None:
        from vlmkern import reference
        hwc = _images_hwc(batch, h, w)
        images = list(hwc)
        pix = _to_bchw(hwc, device)
        patchify, why = _vlmkern_patchify()
        if patchify is not None:
            case.backends["vlmkern"] = _backend("patchify", pix, PATCH, torch.float32)
            case.impls["vlmkern"] = lambda: patchify(pix)
        else:
            case.skipped["vlmkern"] = why
        case.backends["torch reference"] = "torch"
        case.impls["torch reference"] = lambda: reference.patchify(pix, PATCH)
        if device == "cpu":
            proc, why = hf_processor()
            if proc is not None:
                case.backends["hf processor"] = case.backends["hf patchify_image"] = hf_label(proc)
                case.notes.append(f"HF processor: transformers.{type(proc).__name__}")
                case.impls["hf processor"] = lambda: hf_patches(proc, images)
                normalised = [_hf_normalised(proc, im) for im in images]
                case.impls["hf patchify_image"] = lambda: [_hf_patchify_image(proc, im[None]) for im in normalised]
            else:
                case.skipped["hf processor"] = case.skipped["hf patchify_image"] = why

    return Case(name=f"patchify {_size_name(batch, h, w)}", group="patchify",
                shape=f"{batch}x uint8 {h}x{w} -> ({batch}, {_n_patches(h, w)}, {K}) fp32", flops=flops,
                bytes=nbytes, setup=setup, targets=targets,
                notes=["'hf processor' = processor call (pad, rescale, normalise) + crop + patchify_image; "
                       "'hf patchify_image' = the reshape step alone on an already-normalised image"])


def cases(device: str, quick: bool = False, smoke: bool = False) -> list[Case]:
    """The patch-embedding cases for ``device`` ('cpu' or 'cuda')."""
    if smoke:  # plumbing check: tiny image and hidden size, every implementation still runs
        return [_e2e_case(device, 1, 61, 89, 64, torch.float32 if device == "cpu" else torch.bfloat16),
                _patchify_case(device, 1, 61, 89)]
    H, W = FULL
    if device == "cuda":
        dt = torch.bfloat16
        sizes = [(1, H, W), (8, H, W)] if quick else [(1, H, W), (1, 480, 640), (1, 300, 450), (8, H, W)]
        out = [_e2e_case(device, b, h, w, HIDDEN, dt) for b, h, w in (sizes[:1] if quick else sizes)]
        out += [_fused_case(device, b, h, w, HIDDEN, dt, with_compile=(not quick and (b, h, w) == (1, H, W)))
                for b, h, w in sizes]
        out.append(_patchify_case(device, 1, H, W))
        return out
    dt = torch.float32
    # --quick on the CPU: one e2e size (the 1080x1920 GEMM alone takes ~1 s on 2 cores), patchify still at 1080x1920
    sizes = [(1, 480, 640)] if quick else [(1, H, W), (1, 480, 640), (1, 300, 450), (4, 480, 640)]
    return [_e2e_case(device, b, h, w, HIDDEN, dt) for b, h, w in sizes] + [_patchify_case(device, 1, H, W)]
