// Attention probabilities for a block of query rows of one (batch, head): the unit of work of
// the blocked CPU ops. Only a rows×T tile exists at a time, never H×T×T.
#pragma once

#include <ATen/ATen.h>

namespace wsss_fast {

// Query rows per tile: rows×T fp32 scores stay within L2 for ViT-S at 768² (T = 2324).
constexpr int64_t kQueryRowBlock = 32;

// softmax(q_rows · kᵀ · scale) over all keys: (rows, d) × (T, d) -> (rows, T), fp32.
inline at::Tensor attention_probs(const at::Tensor& q_rows, const at::Tensor& k, double scale) {
  at::Tensor scores = at::mm(q_rows, k.t());
  scores.mul_(scale);
  return at::_softmax(scores, /*dim=*/1, /*half_to_float=*/false);
}

// dst[j] += alpha * src[j]: the accumulator update (vectorized by the compiler).
inline void axpy(float* __restrict dst, const float* __restrict src, float alpha, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] += alpha * src[j];
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace wsss_fast
