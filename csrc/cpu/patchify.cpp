// Fuyu patchify on the CPU, parallel over padded pixel rows; each row is written as nW runs of p*C outputs.
// Values are computed in float32 as (x * rescale - mean) / std, in that order and without FMA contraction
// (setup.py passes -ffp-contract=off), so they are bit-identical to the PyTorch reference.
#include "patchify.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace vlmkern {
namespace {

struct Geometry {
  int64_t B, C, H, W, p, nH, nW;
};

// uint8 pixels: 256 precomputed values per channel.
struct LutNorm {
  const float* lut;
  float operator()(int64_t ch, uint8_t v) const { return lut[ch * 256 + v]; }
};

// float pixels: the reference's arithmetic, constants hoisted.
struct ArithNorm {
  float rescale;
  const float* mean;
  const float* std;
  float operator()(int64_t ch, float v) const {
    float x = v * rescale;
    x = x - mean[ch];
    return x / std[ch];
  }
};

#if defined(__SSE2__)
inline __m128 load4(const float* p) { return _mm_loadu_ps(p); }
inline __m128 load4(const uint8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  const __m128i z = _mm_setzero_si128();
  return _mm_cvtepi32_ps(_mm_unpacklo_epi16(_mm_unpacklo_epi8(_mm_cvtsi32_si128(v), z), z));
}

// RGB fast path over n pixels of one patch row: 4 pixels per step, normalised with mulps/subps/divps (IEEE,
// same order as the reference, so still bit-identical) and interleaved into 12 consecutive floats.
// Returns the number of pixels written (n rounded down to a multiple of 4).
template <typename In>
int64_t rgb_sse2(const In* in, int64_t plane, int64_t n, const ArithNorm& a, float* o) {
  const __m128 rs = _mm_set1_ps(a.rescale);
  const __m128 m0 = _mm_set1_ps(a.mean[0]), m1 = _mm_set1_ps(a.mean[1]), m2 = _mm_set1_ps(a.mean[2]);
  const __m128 s0 = _mm_set1_ps(a.std[0]), s1 = _mm_set1_ps(a.std[1]), s2 = _mm_set1_ps(a.std[2]);
  int64_t c = 0;
  for (; c + 4 <= n; c += 4) {
    const __m128 R = _mm_div_ps(_mm_sub_ps(_mm_mul_ps(load4(in + c), rs), m0), s0);
    const __m128 G = _mm_div_ps(_mm_sub_ps(_mm_mul_ps(load4(in + plane + c), rs), m1), s1);
    const __m128 B = _mm_div_ps(_mm_sub_ps(_mm_mul_ps(load4(in + 2 * plane + c), rs), m2), s2);
    const __m128 rg_lo = _mm_unpacklo_ps(R, G), rg_hi = _mm_unpackhi_ps(R, G);  // r0 g0 r1 g1 | r2 g2 r3 g3
    _mm_storeu_ps(o + 3 * c, _mm_shuffle_ps(rg_lo, _mm_shuffle_ps(B, R, _MM_SHUFFLE(1, 1, 0, 0)),
                                            _MM_SHUFFLE(2, 0, 1, 0)));  // r0 g0 b0 r1
    _mm_storeu_ps(o + 3 * c + 4, _mm_shuffle_ps(_mm_shuffle_ps(G, B, _MM_SHUFFLE(1, 1, 1, 1)), rg_hi,
                                                _MM_SHUFFLE(1, 0, 2, 0)));  // g1 b1 r2 g2
    _mm_storeu_ps(o + 3 * c + 8, _mm_shuffle_ps(_mm_shuffle_ps(B, R, _MM_SHUFFLE(3, 3, 2, 2)),
                                                _mm_shuffle_ps(G, B, _MM_SHUFFLE(3, 3, 3, 3)),
                                                _MM_SHUFFLE(2, 0, 2, 0)));  // b2 r3 g3 b3
  }
  return c;
}
#endif

template <typename In, typename Out, typename Norm>
void patchify_rows(const In* src, Out* dst, const Geometry& g, const float* pad, Norm norm,
                   const ArithNorm& arith) {
  const int64_t C = g.C, W = g.W, H = g.H, p = g.p;
  const int64_t plane = g.H * g.W;
  const int64_t patch_len = p * p * C;
  const int64_t rows_per_image = g.nH * p;
  // ~16k outputs per task keeps scheduling overhead negligible.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, g.nW * p * C));
  at::parallel_for(0, g.B * rows_per_image, grain, [&](int64_t begin, int64_t end) {
    // Pixel-row order reads the planes sequentially; measured faster than patch-by-patch order, and than
    // normalising whole rows into a buffer then interleaving. Narrow outputs go through one float run.
    std::vector<float> tmp(std::is_same_v<Out, float> ? 0 : p * C);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / rows_per_image, y = row % rows_per_image;
      const int64_t i = y / p, r = y % p;
      Out* out_row = dst + (b * g.nH + i) * g.nW * patch_len + r * p * C;
      const In* in_row = src + b * C * plane + y * W;
      for (int64_t j = 0; j < g.nW; ++j) {
        Out* o = out_row + j * patch_len;
        float* __restrict__ f;
        if constexpr (std::is_same_v<Out, float>) f = o; else f = tmp.data();
        const int64_t x0 = j * p;
        const int64_t valid = y < H ? std::min(p, W - x0) : 0;
        const In* in = in_row + x0;
        int64_t c = 0;
#if defined(__SSE2__)
        if (C == 3) c = rgb_sse2(in, plane, valid, arith, f);
#endif
        for (; c < valid; ++c)
          for (int64_t ch = 0; ch < C; ++ch) f[c * C + ch] = norm(ch, in[ch * plane + c]);
        for (; c < p; ++c)
          for (int64_t ch = 0; ch < C; ++ch) f[c * C + ch] = pad[ch];
        if constexpr (!std::is_same_v<Out, float>)
          for (int64_t k = 0; k < p * C; ++k) o[k] = static_cast<Out>(f[k]);
      }
    }
  });
}

template <typename Out>
void run(const at::Tensor& x, at::Tensor& out, const Geometry& g, const float* pad, const float* lut,
         const ArithNorm& arith) {
  Out* dst = reinterpret_cast<Out*>(out.data_ptr());
  if (x.scalar_type() == at::kByte)
    patchify_rows(x.const_data_ptr<uint8_t>(), dst, g, pad, LutNorm{lut}, arith);
  else
    patchify_rows(x.const_data_ptr<float>(), dst, g, pad, arith, arith);
}

}  // namespace

at::Tensor patchify_cpu(const at::Tensor& pixels, int64_t patch_size, double pad_value, double rescale,
                        const std::vector<double>& mean, const std::vector<double>& std,
                        at::ScalarType out_dtype) {
  TORCH_CHECK(pixels.device().is_cpu(), "pixels must be a CPU tensor, got ", pixels.device());
  TORCH_CHECK(pixels.dim() == 4, "pixels must be 4-D (B, C, H, W), got ", pixels.dim(), "-D");
  TORCH_CHECK(pixels.scalar_type() == at::kByte || pixels.scalar_type() == at::kFloat,
              "pixels must be uint8 or float32, got ", pixels.scalar_type());
  TORCH_CHECK(out_dtype == at::kFloat || out_dtype == at::kHalf || out_dtype == at::kBFloat16,
              "out_dtype must be float32, float16 or bfloat16, got ", out_dtype);
  TORCH_CHECK(patch_size > 0, "patch_size must be positive, got ", patch_size);
  const at::Tensor x = pixels.contiguous();
  Geometry g{x.size(0), x.size(1), x.size(2), x.size(3), patch_size, 0, 0};
  g.nH = (g.H + g.p - 1) / g.p;
  g.nW = (g.W + g.p - 1) / g.p;
  TORCH_CHECK(static_cast<int64_t>(mean.size()) == g.C && static_cast<int64_t>(std.size()) == g.C,
              "mean and std must have one value per channel (", g.C, "), got ", mean.size(), " and ",
              std.size());
  at::Tensor out = at::empty({g.B, g.nH * g.nW, g.p * g.p * g.C}, x.options().dtype(out_dtype));
  if (out.numel() == 0) return out;

  // Constants rounded to float32 exactly as the reference's float32 tensors round them.
  const int64_t C = g.C;
  std::vector<float> m(C), s(C), pad(C), lut;
  ArithNorm arith{static_cast<float>(rescale), m.data(), s.data()};
  for (int64_t ch = 0; ch < C; ++ch) {
    m[ch] = static_cast<float>(mean[ch]);
    s[ch] = static_cast<float>(std[ch]);
    pad[ch] = arith(ch, static_cast<float>(pad_value));
  }
  if (x.scalar_type() == at::kByte) {
    lut.resize(C * 256);
    for (int64_t ch = 0; ch < C; ++ch)
      for (int v = 0; v < 256; ++v) lut[ch * 256 + v] = arith(ch, static_cast<float>(v));
  }
  switch (out_dtype) {
    case at::kHalf: run<c10::Half>(x, out, g, pad.data(), lut.data(), arith); break;
    case at::kBFloat16: run<c10::BFloat16>(x, out, g, pad.data(), lut.data(), arith); break;
    default: run<float>(x, out, g, pad.data(), lut.data(), arith); break;
  }
  return out;
}

}  // namespace vlmkern
