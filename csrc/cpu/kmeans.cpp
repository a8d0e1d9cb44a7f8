// kmeans, CPU face (DESIGN §3.6; semantics in wsss_fast/ops/kmeans.py). Per iteration, one
// parallel sweep over fixed chunks of rows: an ATen GEMM of the chunk against the unit centres,
// the first-maximum argmax, and the chunk's float64 per-cluster sums. The chunk partials are then
// reduced in chunk order, so the result does not depend on the thread count. Nothing of size
// N×K×D exists; the per-chunk sums are at most 64·K·D doubles.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <tuple>
#include <vector>

#include "cpu/parallel.h"

namespace wsss_fast {
namespace {

constexpr double kNormEps = 1e-8;   // as F.cosine_similarity (and the reference face)
constexpr int64_t kMinChunkRows = 256;
constexpr int64_t kMaxChunks = 64;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The re-seeding rule of the reference face: for each empty cluster in ascending order, move
// the point of lowest cosine to its centre (stable order: ties go to the lowest index) whose
// cluster keeps another point. Updates `sums` and `counts` for the moved points.
void reseed_empty_clusters(int64_t* assign, const float* cos_to_centre, const float* x,
                           int64_t n, int64_t d, std::vector<int64_t>& counts,
                           std::vector<double>& sums) {
  const int64_t k = static_cast<int64_t>(counts.size());
  std::vector<int64_t> empty;
  for (int64_t j = 0; j < k; ++j) {
    if (counts[j] == 0) empty.push_back(j);
  }
  if (empty.empty()) return;
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    return cos_to_centre[a] < cos_to_centre[b];
  });
  int64_t position = 0;
  for (const int64_t j : empty) {
    while (position < n && counts[assign[order[position]]] <= 1) ++position;
    TORCH_CHECK(position < n, "kmeans: no point left to re-seed an empty cluster (N < k?)");
    const int64_t point = order[position++];
    const int64_t from = assign[point];
    const float* row = x + point * d;
    double* from_sum = sums.data() + from * d;
    double* to_sum = sums.data() + j * d;
    for (int64_t c = 0; c < d; ++c) {
      from_sum[c] -= row[c];
      to_sum[c] = row[c];
    }
    --counts[from];
    counts[j] = 1;
    assign[point] = j;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kmeans_cpu(const at::Tensor& features,
                                                          const at::Tensor& init_in,
                                                          int64_t max_iter, double tol) {
  TORCH_CHECK(features.dim() == 2 && init_in.dim() == 1,
              "kmeans: the cpu face takes features (N, D) and init (k,)");
  TORCH_CHECK(max_iter >= 1, "kmeans: max_iter must be >= 1");
  const at::Tensor x = features.to(at::kFloat).contiguous();
  const at::Tensor init = init_in.to(at::kLong).contiguous();
  const int64_t n = x.size(0), d = x.size(1), k = init.size(0);
  TORCH_CHECK(k >= 1 && k <= n && d >= 1, "kmeans: need 1 <= k <= N and D >= 1");
  TORCH_CHECK(init.min().item<int64_t>() >= 0 && init.max().item<int64_t>() < n,
              "kmeans: init indices out of range");

  const float* x_ptr = x.data_ptr<float>();
  at::Tensor x_norm = at::empty({n}, x.options());
  float* x_norm_ptr = x_norm.data_ptr<float>();
  parallel_for(0, n, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      double squares = 0.0;
      for (int64_t c = 0; c < d; ++c) squares += double(x_ptr[i * d + c]) * x_ptr[i * d + c];
      x_norm_ptr[i] = static_cast<float>(std::max(std::sqrt(squares), kNormEps));
    }
  });

  at::Tensor centres = x.index_select(0, init).contiguous();
  at::Tensor assign = at::empty({n}, x.options().dtype(at::kLong));
  at::Tensor cos_to_centre = at::empty({n}, x.options());
  int64_t* assign_ptr = assign.data_ptr<int64_t>();
  float* cos_ptr = cos_to_centre.data_ptr<float>();

  const int64_t chunk_rows = std::max(kMinChunkRows, ceil_div(n, kMaxChunks));
  const int64_t chunks = ceil_div(n, chunk_rows);
  std::vector<double> chunk_sums(chunks * k * d);
  std::vector<int64_t> chunk_counts(chunks * k);
  std::vector<double> sums(k * d);
  std::vector<int64_t> counts(k);

  int64_t iteration = 0;
  while (iteration < max_iter) {
    ++iteration;
    const at::Tensor unit = centres / centres.norm(2, {1}, true).clamp_min(kNormEps);
    const at::Tensor unit_t = unit.t().contiguous();
    parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t chunk = begin; chunk < end; ++chunk) {
        const int64_t r0 = chunk * chunk_rows, rows = std::min(chunk_rows, n - r0);
        const at::Tensor scores = at::mm(x.narrow(0, r0, rows), unit_t).contiguous();
        const float* s = scores.data_ptr<float>();
        double* part = chunk_sums.data() + chunk * k * d;
        int64_t* part_counts = chunk_counts.data() + chunk * k;
        std::fill(part, part + k * d, 0.0);
        std::fill(part_counts, part_counts + k, 0);
        for (int64_t r = 0; r < rows; ++r) {
          const float* row_scores = s + r * k;
          int64_t best = 0;
          for (int64_t j = 1; j < k; ++j) {
            if (row_scores[j] > row_scores[best]) best = j;  // first maximum on ties
          }
          const int64_t i = r0 + r;
          assign_ptr[i] = best;
          cos_ptr[i] = row_scores[best] / x_norm_ptr[i];
          ++part_counts[best];
          double* sum = part + best * d;
          const float* row = x_ptr + i * d;
          for (int64_t c = 0; c < d; ++c) sum[c] += row[c];
        }
      }
    });
    std::fill(counts.begin(), counts.end(), 0);
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      for (int64_t j = 0; j < k; ++j) counts[j] += chunk_counts[chunk * k + j];
    }
    parallel_for(0, k * d, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t e = begin; e < end; ++e) {
        double total = 0.0;
        for (int64_t chunk = 0; chunk < chunks; ++chunk) total += chunk_sums[chunk * k * d + e];
        sums[e] = total;
      }
    });
    reseed_empty_clusters(assign_ptr, cos_ptr, x_ptr, n, d, counts, sums);

    float* centre_ptr = centres.data_ptr<float>();
    double shift = 0.0;
    for (int64_t j = 0; j < k; ++j) {
      double moved = 0.0;
      for (int64_t c = 0; c < d; ++c) {
        const float updated = static_cast<float>(sums[j * d + c] / double(counts[j]));
        const double delta = double(updated) - double(centre_ptr[j * d + c]);
        moved += delta * delta;
        centre_ptr[j * d + c] = updated;
      }
      shift += std::sqrt(moved);
    }
    if (shift * shift < tol) break;
  }
  return {assign, centres, at::scalar_tensor(iteration, x.options().dtype(at::kLong))};
}

}  // namespace

TORCH_LIBRARY_IMPL(wsss_fast_C, CPU, m) { m.impl("kmeans", &kmeans_cpu); }

}  // namespace wsss_fast
