// Unnormalized softmax rows for the attention tiles: x[j] <- exp(scale·(x[j] − max_j x)) in
// place, returning Σ_j x[j]. The caller keeps 1/Σ and applies it to the tile's few products
// (P·V rows, head sums), so the rows×T tile is read twice (max, exp+sum) instead of four times
// (scale, max, exp+sum, normalize) as with a scaled copy and ATen's softmax.
//
// The exp is a Cephes-style degree-6 polynomial on a range-reduced argument (~2 ulp), written
// with AVX2/FMA intrinsics and picked at load time; other CPUs take the std::exp loop.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define WSSS_HAVE_AVX2_SOFTMAX 1
#endif

namespace wsss_fast {
namespace softmax_detail {

inline float exp_sum_scalar(float* x, int64_t n, float scale) {
  float max_value = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < n; ++j) max_value = std::max(max_value, x[j]);
  const float shift = scale * max_value;
  float sum = 0.0f;
  for (int64_t j = 0; j < n; ++j) {
    x[j] = std::exp(scale * x[j] - shift);
    sum += x[j];
  }
  return sum;
}

#ifdef WSSS_HAVE_AVX2_SOFTMAX
// The vector exps' constants, shared by the AVX2 and AVX-512 paths so that both give the same
// exps: the flush-to-0 bound, log2(e), ln 2 split in a high and a low part (Cody-Waite), and the
// degree-5 polynomial of (e^r − 1 − r) / r².
constexpr float kExpLower = -87.33654f, kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = -0.693359375f, kLn2Lo = 2.12194440e-4f;
constexpr float kExpP0 = 1.9875691500e-4f, kExpP1 = 1.3981999507e-3f, kExpP2 = 8.3334519073e-3f,
                kExpP3 = 4.1665795894e-2f, kExpP4 = 1.6666665459e-1f, kExpP5 = 5.0000001201e-1f;

__attribute__((target("avx2,fma"))) inline __m256 exp_avx2(__m256 x) {
  // exp(x) = 2^n · e^r, n = round(x / ln 2), r = x − n ln 2 in [−ln2/2, ln2/2]. x ≤ 0 here;
  // below −87.3 the result is flushed to 0 (as expf underflows to denormals / 0).
  const __m256 lower = _mm256_set1_ps(kExpLower);
  const __m256 underflow = _mm256_cmp_ps(x, lower, _CMP_LT_OQ);
  x = _mm256_max_ps(x, lower);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fmadd_ps(n, _mm256_set1_ps(kLn2Hi), x);
  r = _mm256_fmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
  __m256 p = _mm256_set1_ps(kExpP0);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpP1));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpP2));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpP3));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpP4));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpP5));
  const __m256 r2 = _mm256_mul_ps(r, r);
  const __m256 e_r = _mm256_add_ps(_mm256_fmadd_ps(p, r2, r), _mm256_set1_ps(1.0f));
  const __m256i biased = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
  const __m256 two_n = _mm256_castsi256_ps(_mm256_slli_epi32(biased, 23));
  return _mm256_andnot_ps(underflow, _mm256_mul_ps(e_r, two_n));
}

__attribute__((target("avx2,fma"))) inline float horizontal_sum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

__attribute__((target("avx2,fma"))) inline float horizontal_max(__m256 v) {
  const __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(t, _mm_shuffle_ps(t, t, 1)));
}

__attribute__((target("avx2,fma"))) inline float exp_sum_avx2(float* x, int64_t n, float scale) {
  const int64_t full = n - n % 8;
  __m256 vmax = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < full; j += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(x + j));
  float max_value = horizontal_max(vmax);
  for (int64_t j = full; j < n; ++j) max_value = std::max(max_value, x[j]);
  const __m256 vscale = _mm256_set1_ps(scale);
  const __m256 vshift = _mm256_set1_ps(-scale * max_value);
  __m256 vsum = _mm256_setzero_ps();
  for (int64_t j = 0; j < full; j += 8) {
    const __m256 e = exp_avx2(_mm256_fmadd_ps(_mm256_loadu_ps(x + j), vscale, vshift));
    _mm256_storeu_ps(x + j, e);
    vsum = _mm256_add_ps(vsum, e);
  }
  float sum = horizontal_sum(vsum);
  if (full < n) {  // the tail through the same exp, on a padded vector
    alignas(32) float tail[8];
    for (int64_t j = 0; j < 8; ++j) tail[j] = full + j < n ? x[full + j] : max_value;
    alignas(32) float e[8];
    _mm256_store_ps(e, exp_avx2(_mm256_fmadd_ps(_mm256_load_ps(tail), vscale, vshift)));
    for (int64_t j = full; j < n; ++j) {
      x[j] = e[j - full];
      sum += x[j];
    }
  }
  return sum;
}

// The AVX-512 twin of exp_avx2: the same range reduction, polynomial and flush in 16 lanes, so
// both paths give the same exps (their sums differ only in the order of additions).
__attribute__((target("avx512f"))) inline __m512 exp_avx512(__m512 x) {
  const __m512 lower = _mm512_set1_ps(kExpLower);
  const __mmask16 keep = _mm512_cmp_ps_mask(x, lower, _CMP_GE_OQ);
  x = _mm512_max_ps(x, lower);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(kLn2Hi), x);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
  __m512 p = _mm512_set1_ps(kExpP0);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpP1));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpP2));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpP3));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpP4));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpP5));
  const __m512 r2 = _mm512_mul_ps(r, r);
  const __m512 e_r = _mm512_add_ps(_mm512_fmadd_ps(p, r2, r), _mm512_set1_ps(1.0f));
  const __m512i biased = _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127));
  const __m512 two_n = _mm512_castsi512_ps(_mm512_slli_epi32(biased, 23));
  return _mm512_maskz_mul_ps(keep, e_r, two_n);
}

// exp_sum_avx2 in 16 lanes; the tail is one masked vector. Two accumulators for the max and the
// sum keep their dependency chains off the critical path.
__attribute__((target("avx512f"))) inline float exp_sum_avx512(float* x, int64_t n,
                                                               float scale) {
  const int64_t full = n - n % 16;
  const __mmask16 tail = static_cast<__mmask16>((1u << (n - full)) - 1u);
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 max0 = neg_inf, max1 = neg_inf;
  int64_t j = 0;
  for (; j + 32 <= full; j += 32) {
    max0 = _mm512_max_ps(max0, _mm512_loadu_ps(x + j));
    max1 = _mm512_max_ps(max1, _mm512_loadu_ps(x + j + 16));
  }
  if (j < full) max0 = _mm512_max_ps(max0, _mm512_loadu_ps(x + j));
  max0 = _mm512_max_ps(_mm512_max_ps(max0, max1), _mm512_mask_loadu_ps(neg_inf, tail, x + full));
  const float max_value = _mm512_reduce_max_ps(max0);
  const __m512 vscale = _mm512_set1_ps(scale);
  const __m512 vshift = _mm512_set1_ps(-scale * max_value);
  __m512 sum0 = _mm512_setzero_ps(), sum1 = _mm512_setzero_ps();
  for (j = 0; j + 32 <= full; j += 32) {
    const __m512 e0 = exp_avx512(_mm512_fmadd_ps(_mm512_loadu_ps(x + j), vscale, vshift));
    const __m512 e1 = exp_avx512(_mm512_fmadd_ps(_mm512_loadu_ps(x + j + 16), vscale, vshift));
    _mm512_storeu_ps(x + j, e0);
    _mm512_storeu_ps(x + j + 16, e1);
    sum0 = _mm512_add_ps(sum0, e0);
    sum1 = _mm512_add_ps(sum1, e1);
  }
  if (j < full) {
    const __m512 e = exp_avx512(_mm512_fmadd_ps(_mm512_loadu_ps(x + j), vscale, vshift));
    _mm512_storeu_ps(x + j, e);
    sum0 = _mm512_add_ps(sum0, e);
  }
  if (tail) {
    const __m512 e = exp_avx512(
        _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, x + full), vscale, vshift));
    _mm512_mask_storeu_ps(x + full, tail, e);
    sum1 = _mm512_add_ps(sum1, _mm512_maskz_mov_ps(tail, e));
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(sum0, sum1));
}
#endif

}  // namespace softmax_detail

// The vector width of the exp pass: picked once from the CPU (kAuto), or forced (tests compare
// every path the CPU can run against the reference).
enum class ExpPath { kAuto, kScalar, kAvx2, kAvx512 };

// Whether this CPU can run `path` (kAuto and kScalar: always).
inline bool exp_path_supported(ExpPath path) {
#ifdef WSSS_HAVE_AVX2_SOFTMAX
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  if (path == ExpPath::kAvx2) return avx2;
  if (path == ExpPath::kAvx512) return avx512;
#else
  if (path == ExpPath::kAvx2 || path == ExpPath::kAvx512) return false;
#endif
  return true;
}

// kAuto resolved: the widest path this CPU has.
inline ExpPath resolve_exp_path(ExpPath path) {
  if (path != ExpPath::kAuto) return path;
  if (exp_path_supported(ExpPath::kAvx512)) return ExpPath::kAvx512;
  if (exp_path_supported(ExpPath::kAvx2)) return ExpPath::kAvx2;
  return ExpPath::kScalar;
}

// x[j] <- exp(scale·(x[j] − max x)) for j < n (scale > 0); returns the sum. `path` must be
// resolved and supported (resolve_exp_path, exp_path_supported).
inline float exp_sum_row(float* x, int64_t n, float scale, ExpPath path = ExpPath::kAuto) {
  if (path == ExpPath::kAuto) {
    static const ExpPath best = resolve_exp_path(ExpPath::kAuto);
    path = best;
  }
#ifdef WSSS_HAVE_AVX2_SOFTMAX
  if (path == ExpPath::kAvx512) return softmax_detail::exp_sum_avx512(x, n, scale);
  if (path == ExpPath::kAvx2) return softmax_detail::exp_sum_avx2(x, n, scale);
#endif
  return softmax_detail::exp_sum_scalar(x, n, scale);
}

}  // namespace wsss_fast
