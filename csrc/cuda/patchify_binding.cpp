// Python module vlmkern._cuda: torch binding of the raw-pointer CUDA kernels (built only with CUDA torch).
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/utils/pybind.h>  // pybind11 + Tensor/dtype casters, much lighter than torch/extension.h

#include <vector>

#include "patchify_kernel.cuh"

namespace {

vlmkern_dtype to_vlmkern(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return VLMKERN_FLOAT32;
    case at::kHalf: return VLMKERN_FLOAT16;
    case at::kBFloat16: return VLMKERN_BFLOAT16;
    default: TORCH_CHECK(false, "out_dtype must be float32, float16 or bfloat16, got ", t);
  }
}

at::Tensor patchify_cuda(const at::Tensor& pixels, int64_t patch_size, double pad_value, double rescale,
                         const std::vector<double>& mean, const std::vector<double>& std,
                         at::ScalarType out_dtype) {
  TORCH_CHECK(pixels.is_cuda(), "pixels must be a CUDA tensor, got ", pixels.device());
  TORCH_CHECK(pixels.dim() == 4, "pixels must be 4-D (B, C, H, W), got ", pixels.dim(), "-D");
  TORCH_CHECK(pixels.scalar_type() == at::kByte || pixels.scalar_type() == at::kFloat,
              "pixels must be uint8 or float32, got ", pixels.scalar_type());
  TORCH_CHECK(patch_size > 0, "patch_size must be positive, got ", patch_size);
  const int64_t B = pixels.size(0), C = pixels.size(1), H = pixels.size(2), W = pixels.size(3);
  TORCH_CHECK(C >= 1 && C <= VLMKERN_PATCHIFY_MAX_CHANNELS, "pixels must have 1..",
              VLMKERN_PATCHIFY_MAX_CHANNELS, " channels, got ", C);
  TORCH_CHECK(static_cast<int64_t>(mean.size()) == C && static_cast<int64_t>(std.size()) == C,
              "mean and std must have one value per channel (", C, "), got ", mean.size(), " and ", std.size());
  const vlmkern_dtype odt = to_vlmkern(out_dtype);

  const c10::cuda::CUDAGuard guard(pixels.device());
  const at::Tensor x = pixels.contiguous();
  const int64_t nH = (H + patch_size - 1) / patch_size, nW = (W + patch_size - 1) / patch_size;
  TORCH_CHECK(nH * patch_size <= 65535, "padded height ceil(H/p)*p must be <= 65535 (CUDA grid.y), got ",
              nH * patch_size);
  at::Tensor out = at::empty({B, nH * nW, patch_size * patch_size * C}, x.options().dtype(out_dtype));
  if (out.numel() == 0) return out;

  vlmkern_patchify_params prm{};
  prm.batch = B;
  prm.height = H;
  prm.width = W;
  prm.channels = static_cast<int>(C);
  prm.patch_size = static_cast<int>(patch_size);
  prm.pad_value = static_cast<float>(pad_value);
  prm.rescale = static_cast<float>(rescale);
  for (int64_t ch = 0; ch < C; ++ch) {
    prm.mean[ch] = static_cast<float>(mean[ch]);
    prm.std[ch] = static_cast<float>(std[ch]);
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const cudaError_t err = x.scalar_type() == at::kByte
                              ? vlmkern_patchify_u8(x.const_data_ptr<uint8_t>(), out.data_ptr(), odt, prm, stream)
                              : vlmkern_patchify_f32(x.const_data_ptr<float>(), out.data_ptr(), odt, prm, stream);
  TORCH_CHECK(err == cudaSuccess, "vlmkern patchify kernel failed: ", cudaGetErrorString(err));
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() = "vlmkern CUDA kernels";
  m.attr("PATCHIFY_MAX_CHANNELS") = VLMKERN_PATCHIFY_MAX_CHANNELS;
  m.def("patchify", &patchify_cuda,
        "Fuyu patchify: (B, C, H, W) uint8/float32 CUDA pixels -> (B, nP, p*p*C) normalised patches",
        py::arg("pixels"), py::arg("patch_size"), py::arg("pad_value"), py::arg("rescale"), py::arg("mean"),
        py::arg("std"), py::arg("out_dtype") = at::kFloat);
}
