// Fuyu patchify as a plain CUDA kernel on raw pointers (no torch headers; the binding lives in
// patchify_binding.cpp). Semantics are those of vlmkern.reference.patchify (FuyuImageProcessor's).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#define VLMKERN_PATCHIFY_MAX_CHANNELS 64

enum vlmkern_dtype { VLMKERN_FLOAT32 = 0, VLMKERN_FLOAT16 = 1, VLMKERN_BFLOAT16 = 2 };

// Passed by value to the kernel (~0.5 KiB), so per-channel constants need no device allocation.
struct vlmkern_patchify_params {
  int64_t batch, height, width;  // pixels: contiguous (batch, channels, height, width)
  int channels;                  // <= VLMKERN_PATCHIFY_MAX_CHANNELS
  int patch_size;
  float pad_value;  // raw units, applied to the bottom/right border before normalising
  float rescale;
  float mean[VLMKERN_PATCHIFY_MAX_CHANNELS];
  float std[VLMKERN_PATCHIFY_MAX_CHANNELS];
};

// out: contiguous (batch, ceil(H/p)*ceil(W/p), p*p*channels) of out_dtype.
// Returns cudaErrorInvalidValue for bad params, else the launch error (asynchronous on stream).
cudaError_t vlmkern_patchify_u8(const uint8_t* pixels, void* out, vlmkern_dtype out_dtype,
                                const vlmkern_patchify_params& params, cudaStream_t stream);
cudaError_t vlmkern_patchify_f32(const float* pixels, void* out, vlmkern_dtype out_dtype,
                                 const vlmkern_patchify_params& params, cudaStream_t stream);
