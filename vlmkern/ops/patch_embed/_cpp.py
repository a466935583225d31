"""The compiled-extension backends of ``vlmkern::patchify`` (``csrc/``, loaded through ``vlmkern._ext``): ``cpp``
(``vlmkern._C``, CPU tensors) and ``cuda`` (``vlmkern._cuda``). Both read uint8 or float32 pixels, write
float32 / float16 / bfloat16, and are bit-identical to the reference backend (``_torch.patchify``). The contract
checks that the extension is loaded and takes the inputs before either runs.
"""
from __future__ import annotations

import torch
from torch import Tensor

from vlmkern import _ext


def patchify_cpu(pixels: Tensor, patch_size: int, pad_value: float, rescale: float, mean: list[float],
                 std: list[float], out_dtype: torch.dtype) -> Tensor:
    return _ext.cpu_ext().patchify(pixels, patch_size, pad_value, rescale, mean, std, out_dtype)


def patchify_cuda(pixels: Tensor, patch_size: int, pad_value: float, rescale: float, mean: list[float],
                  std: list[float], out_dtype: torch.dtype) -> Tensor:
    return _ext.cuda_ext().patchify(pixels, patch_size, pad_value, rescale, mean, std, out_dtype)
