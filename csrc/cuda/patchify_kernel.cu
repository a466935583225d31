// One thread per padded pixel (looping over images): reads each channel plane coalesced along x and
// writes its C outputs contiguously. Arithmetic uses explicit round-to-nearest intrinsics so nvcc cannot
// contract (x * rescale - mean) into an FMA: results match the float32 PyTorch reference bit for bit.
#include "patchify_kernel.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace {

template <typename Out>
__device__ __forceinline__ Out from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

__device__ __forceinline__ float normalise(float x, float rescale, float mean, float std) {
  return __fdiv_rn(__fsub_rn(__fmul_rn(x, rescale), mean), std);
}

template <typename In, typename Out>
__global__ void patchify_kernel(const In* __restrict__ pixels, Out* __restrict__ out,
                                const vlmkern_patchify_params prm) {
  // grid: (padded columns / blockDim.x, padded rows, images); 32-bit index math except for offsets.
  const int p = prm.patch_size, C = prm.channels;
  const int x = blockIdx.x * blockDim.x + threadIdx.x, y = blockIdx.y;
  const int64_t H = prm.height, W = prm.width;
  const int nH = static_cast<int>((H + p - 1) / p), nW = static_cast<int>((W + p - 1) / p);
  if (x >= nW * p) return;
  const int i = y / p, r = y - i * p, j = x / p, c = x - j * p;
  const bool inside = y < H && x < W;
  for (int64_t b = blockIdx.z; b < prm.batch; b += gridDim.z) {
    Out* o = out + (((b * nH + i) * nW + j) * p * p + r * p + c) * C;
    const In* px = pixels + (b * C * H + y) * W + x;
    for (int ch = 0; ch < C; ++ch) {
      const float v = inside ? static_cast<float>(px[ch * H * W]) : prm.pad_value;
      o[ch] = from_float<Out>(normalise(v, prm.rescale, prm.mean[ch], prm.std[ch]));
    }
  }
}

template <typename In, typename Out>
cudaError_t launch(const In* pixels, void* out, const vlmkern_patchify_params& prm, cudaStream_t stream) {
  const int64_t p = prm.patch_size;
  const int64_t Hp = (prm.height + p - 1) / p * p, Wp = (prm.width + p - 1) / p * p;
  if (prm.batch == 0 || Hp == 0 || Wp == 0) return cudaSuccess;
  if (Hp > 65535 || Wp > INT32_MAX / 2) return cudaErrorInvalidValue;  // grid.y limit; 32-bit columns
  const int threads = 128;
  const dim3 grid(static_cast<unsigned>((Wp + threads - 1) / threads), static_cast<unsigned>(Hp),
                  static_cast<unsigned>(prm.batch < 65535 ? prm.batch : 65535));  // kernel loops over the rest
  patchify_kernel<In, Out><<<grid, threads, 0, stream>>>(pixels, static_cast<Out*>(out), prm);
  return cudaGetLastError();
}

template <typename In>
cudaError_t dispatch(const In* pixels, void* out, vlmkern_dtype out_dtype, const vlmkern_patchify_params& prm,
                     cudaStream_t stream) {
  if (prm.patch_size <= 0 || prm.channels <= 0 || prm.channels > VLMKERN_PATCHIFY_MAX_CHANNELS ||
      prm.batch < 0 || prm.height < 0 || prm.width < 0)
    return cudaErrorInvalidValue;
  switch (out_dtype) {
    case VLMKERN_FLOAT32: return launch<In, float>(pixels, out, prm, stream);
    case VLMKERN_FLOAT16: return launch<In, __half>(pixels, out, prm, stream);
    case VLMKERN_BFLOAT16: return launch<In, __nv_bfloat16>(pixels, out, prm, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t vlmkern_patchify_u8(const uint8_t* pixels, void* out, vlmkern_dtype out_dtype,
                                const vlmkern_patchify_params& params, cudaStream_t stream) {
  return dispatch(pixels, out, out_dtype, params, stream);
}

cudaError_t vlmkern_patchify_f32(const float* pixels, void* out, vlmkern_dtype out_dtype,
                                 const vlmkern_patchify_params& params, cudaStream_t stream) {
  return dispatch(pixels, out, out_dtype, params, stream);
}
