// Attention probabilities for a tile of query rows of one (batch, head): the unit of work of the
// blocked CPU ops. Only a rows×T tile exists at a time (per thread), never H×T×T.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include <vector>

namespace wsss_fast {

// Query rows per tile, at most. Measured at ViT-S 768² (T = 2324, d = 64) on one core: 32 rows
// leave sgemm short of its peak (1.54 s/img), 64-128 reach it (1.46/1.44 s).
constexpr int64_t kQueryRowBlock = 128;

// Rows per tile for `rows_total` query rows in each of `batch` items: at most kQueryRowBlock, and
// as many tiles as make the work divide evenly over the threads (19 tiles on 2 threads idle one
// thread for a whole tile; 20 do not).
inline int64_t tile_rows(int64_t rows_total, int64_t batch) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t tiles = (rows_total + kQueryRowBlock - 1) / kQueryRowBlock;
  while ((batch * tiles) % threads != 0 && tiles < rows_total) ++tiles;
  return (rows_total + tiles - 1) / tiles;
}

// Per-thread scratch for one tile: reused across heads and tiles, so the hot loop allocates
// nothing (fresh rows×T buffers would each be an mmap + page faults).
class AttentionTile {
 public:
  AttentionTile(int64_t tokens, int64_t head_dim, const at::TensorOptions& options)
      : scores_(at::empty({kQueryRowBlock, tokens}, options)),
        q_scaled_(at::empty({kQueryRowBlock, head_dim}, options)) {}

  // softmax(q_rows · kᵀ · scale) over all keys: (rows, d) × (d, T) -> (rows, T) fp32, valid until
  // the next call. `k_transposed` is (d, T): contiguous is the fastest sgemm layout, a transposed
  // view of a (T, d) k avoids a copy. The scale is applied to the rows×d queries, not to rows×T.
  const at::Tensor& probs(const at::Tensor& q_rows, const at::Tensor& k_transposed,
                          double scale) {
    const int64_t rows = q_rows.size(0);
    at::Tensor queries = q_rows;
    if (scale != 1.0) {  // callers that can afford a scaled copy of q pass scale 1
      queries = q_scaled_.narrow(0, 0, rows);
      at::mul_out(queries, q_rows, at::Scalar(scale));
    }
    at::Tensor scores = scores_.narrow(0, 0, rows);
    at::mm_out(scores, queries, k_transposed);
    at::_softmax_out(scores, scores, /*dim=*/1, /*half_to_float=*/false);
    current_ = scores;
    return current_;
  }

 private:
  at::Tensor scores_;
  at::Tensor q_scaled_;
  at::Tensor current_;
};

// One (batch, head) slice per entry of a (..., T, d) tensor flattened over its leading dims, so
// the hot loop does not build views by repeated indexing.
inline std::vector<at::Tensor> matrices(const at::Tensor& t) {
  const at::Tensor flat = t.reshape({-1, t.size(-2), t.size(-1)});
  std::vector<at::Tensor> out;
  out.reserve(flat.size(0));
  for (int64_t i = 0; i < flat.size(0); ++i) out.push_back(flat[i]);
  return out;
}

// dst[j] += alpha * src[j]: the accumulator update (vectorized by the compiler).
inline void axpy(float* __restrict dst, const float* __restrict src, float alpha, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] += alpha * src[j];
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace wsss_fast
