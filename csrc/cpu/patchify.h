// Fuyu patchify on the CPU (FuyuImageProcessor's): raw pixels -> padded, rescaled, normalised patches.
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

namespace vlmkern {

// pixels (B, C, H, W) uint8 or float32, any strides -> (B, ceil(H/p)*ceil(W/p), p*p*C) in out_dtype
// (float32, float16 or bfloat16). P[b, i*nW + j, (r*p + c)*C + ch] = norm(img[b, ch, p*i + r, p*j + c]),
// norm(x) = (x * rescale - mean[ch]) / std[ch] in float32, in that order, with the bottom/right border
// padded by pad_value (raw units) first.
at::Tensor patchify_cpu(const at::Tensor& pixels, int64_t patch_size, double pad_value, double rescale,
                        const std::vector<double>& mean, const std::vector<double>& std,
                        at::ScalarType out_dtype);

}  // namespace vlmkern
