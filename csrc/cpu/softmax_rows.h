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
__attribute__((target("avx2,fma"))) inline __m256 exp_avx2(__m256 x) {
  // exp(x) = 2^n · e^r, n = round(x / ln 2), r = x − n ln 2 in [−ln2/2, ln2/2]. x ≤ 0 here;
  // below −87.3 the result is flushed to 0 (as expf underflows to denormals / 0).
  const __m256 lower = _mm256_set1_ps(-87.33654f);
  const __m256 underflow = _mm256_cmp_ps(x, lower, _CMP_LT_OQ);
  x = _mm256_max_ps(x, lower);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fmadd_ps(n, _mm256_set1_ps(-0.693359375f), x);
  r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
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
#endif

}  // namespace softmax_detail

// x[j] <- exp(scale·(x[j] − max x)) for j < n (scale > 0); returns the sum.
inline float exp_sum_row(float* x, int64_t n, float scale) {
#ifdef WSSS_HAVE_AVX2_SOFTMAX
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx2) return softmax_detail::exp_sum_avx2(x, n, scale);
#endif
  return softmax_detail::exp_sum_scalar(x, n, scale);
}

}  // namespace wsss_fast
