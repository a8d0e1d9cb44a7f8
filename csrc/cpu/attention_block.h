// Attention probabilities for a tile of query rows of one (batch, head): the unit of work of the
// blocked CPU ops. Only a rows×T tile exists at a time (per thread), never H×T×T.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "cpu/softmax_rows.h"

namespace wsss_fast {

// Query rows per tile, at most. Measured at ViT-S 768² (T = 2324, d = 64) on one core: 32 rows
// leave sgemm short of its peak (1.54 s/img), 64-128 reach it (1.46/1.44 s).
constexpr int64_t kQueryRowBlock = 128;

// Tuning override (WSSS_FAST_CPU_QUERY_ROWS, 8..kQueryRowBlock), read once.
inline int64_t query_row_block() {
  static const int64_t rows = [] {
    const char* env = std::getenv("WSSS_FAST_CPU_QUERY_ROWS");
    if (!env || !*env) return kQueryRowBlock;
    const int64_t value = std::atoll(env);
    TORCH_CHECK(value >= 8 && value <= kQueryRowBlock, "WSSS_FAST_CPU_QUERY_ROWS must be in [8, ",
                kQueryRowBlock, "], got '", env, "'");
    return value;
  }();
  return rows;
}

// Rows per tile for `rows_total` query rows in each of `batch` items: at most kQueryRowBlock, and
// as many tiles as make the work divide evenly over the threads (19 tiles on 2 threads idle one
// thread for a whole tile; 20 do not).
inline int64_t tile_rows(int64_t rows_total, int64_t batch) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t block = query_row_block();
  int64_t tiles = (rows_total + block - 1) / block;
  while ((batch * tiles) % threads != 0 && tiles < rows_total) ++tiles;
  return (rows_total + tiles - 1) / tiles;
}

// Whether bf16 inputs run their two GEMMs in bf16 (fp32 softmax statistics and accumulators
// either way) or are widened to fp32 first. bf16 GEMMs only pay where oneDNN has bf16 kernels
// (AVX-512 / AMX); elsewhere ATen's bf16 GEMM is a slow reference loop (7× sgemm on AVX2), so
// "auto" widens. WSSS_FAST_CPU_BF16_GEMM=on|off overrides (tests force both paths).
inline bool bf16_gemm_enabled() {
  const char* env = std::getenv("WSSS_FAST_CPU_BF16_GEMM");
  const std::string mode = env ? env : "auto";
  if (mode == "on") return true;
  if (mode == "off") return false;
  TORCH_CHECK(mode == "auto" || mode.empty(),
              "WSSS_FAST_CPU_BF16_GEMM must be auto, on or off, got '", mode, "'");
  static const bool native = [] {
    const auto op = c10::Dispatcher::singleton()
                        .findSchemaOrThrow("mkldnn::_is_mkldnn_bf16_supported", "")
                        .typed<bool()>();
    return op.call();
  }();
  return native;
}

// The dtype the GEMMs of a tile run in, for inputs of dtype `input`.
inline at::ScalarType gemm_dtype(at::ScalarType input) {
  return input == at::kBFloat16 && bf16_gemm_enabled() ? at::kBFloat16 : at::kFloat;
}

// The exp pass's vector width (softmax_rows.h): WSSS_FAST_CPU_EXP=auto (the widest the CPU has:
// AVX-512, else AVX2 + FMA, else scalar) | avx512 | avx2 | scalar. Tests force each path; a path
// the CPU lacks is an error, not a silent fallback.
inline ExpPath exp_path() {
  const char* env = std::getenv("WSSS_FAST_CPU_EXP");
  const std::string mode = env ? env : "auto";
  ExpPath path = ExpPath::kAuto;
  if (mode == "avx512") {
    path = ExpPath::kAvx512;
  } else if (mode == "avx2") {
    path = ExpPath::kAvx2;
  } else if (mode == "scalar") {
    path = ExpPath::kScalar;
  } else {
    TORCH_CHECK(mode == "auto" || mode.empty(),
                "WSSS_FAST_CPU_EXP must be auto, avx512, avx2 or scalar, got '", mode, "'");
  }
  TORCH_CHECK(exp_path_supported(path), "WSSS_FAST_CPU_EXP=", mode,
              ": this CPU does not have that instruction set");
  return resolve_exp_path(path);
}

// ---------------------------------------------------------------------------- row kernels
// Written as plain loops the compiler vectorizes; target_clones builds copies for x86-64-v4 / v3
// (AVX-512, AVX2 + FMA) picked at load time; the extension is compiled for the baseline ISA.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define WSSS_VECTORIZED \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define WSSS_VECTORIZED
#endif

// dst[j] = alpha·src[j] (first) or dst[j] += alpha·src[j].
WSSS_VECTORIZED static void scaled_add(float* __restrict dst, const float* __restrict src,
                                       float alpha, int64_t n, bool first) {
  if (first) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) dst[j] = alpha * src[j];
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) dst[j] += alpha * src[j];
  }
}

WSSS_VECTORIZED static void scale_in_place(float* x, float alpha, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) x[j] *= alpha;
}

// dst[j] += alpha * src[j]: the accumulator update.
inline void axpy(float* __restrict dst, const float* __restrict src, float alpha, int64_t n) {
  scaled_add(dst, src, alpha, n, /*first=*/false);
}

// Per-thread scratch for one tile: reused across heads and tiles, so the hot loop allocates
// nothing (fresh rows×T buffers would each be an mmap + page faults).
//
// The tile keeps its unnormalized softmax (exp_sum_row: two passes over each row) and a per-row
// factor 1/Σ (inv_sums_) that P·V and the head sum apply to their few outputs, instead of
// normalizing the rows×T tile. (With plain loops under target_clones the compiler did not
// vectorize the exp and this was slower than ATen's softmax; the intrinsics version is not.)
class AttentionTile {
 public:
  // `gemm_dtype`: kFloat, or kBFloat16 for bf16 GEMMs (inputs given in bf16 then).
  AttentionTile(int64_t tokens, at::ScalarType gemm_dtype)
      : bf16_(gemm_dtype == at::kBFloat16),
        exp_path_(exp_path()),
        exps_(at::empty({kQueryRowBlock, tokens}, at::kFloat)),
        inv_sums_(kQueryRowBlock) {
    if (bf16_) {
      scores_bf16_ = at::empty({kQueryRowBlock, tokens}, at::kBFloat16);
      exps_bf16_ = at::empty({kQueryRowBlock, tokens}, at::kBFloat16);
    }
  }

  // Where compute() adds the tile's head sum: sum[i, j] (=, if first, or +=) softmax[i, col0 + j]
  // for j < n, row stride n.
  struct HeadSum {
    float* sum;
    int64_t n;
    int64_t col0;
    bool first;
  };

  // exp(scale · q_rows·kᵀ − row max) over all keys, (rows, d) × (d, T) -> (rows, T) fp32, and the
  // rows' 1/Σ: the softmax up to its per-row factor, applied by times; valid until the next
  // call. With `head_sum`, each row is also normalized into it right after its exp, while the
  // row is still in L1 (a separate pass over the rows×T tile cost 3× as much). `k_transposed` is
  // (d, T): contiguous is the fastest GEMM layout, a transposed view of a (T, d) k avoids a copy.
  void compute(const at::Tensor& q_rows, const at::Tensor& k_transposed, double scale,
               const HeadSum* head_sum = nullptr) {
    rows_ = q_rows.size(0);
    at::Tensor exps = exps_.narrow(0, 0, rows_);
    if (bf16_) {  // bf16 GEMM (fp32 accumulation inside), the scores widened for the softmax
      at::Tensor scores = scores_bf16_.narrow(0, 0, rows_);
      at::mm_out(scores, q_rows, k_transposed);
      exps.copy_(scores);
    } else {
      at::mm_out(exps, q_rows, k_transposed);
    }
    // exp(scale·(s − max)) per row in place; 1/Σ is applied to the products (see the class).
    const int64_t tokens = exps.size(1);
    float* data = exps.data_ptr<float>();
    for (int64_t i = 0; i < rows_; ++i) {
      float* row = data + i * tokens;
      inv_sums_[i] = 1.0f / exp_sum_row(row, tokens, static_cast<float>(scale), exp_path_);
      if (head_sum) {
        scaled_add(head_sum->sum + i * head_sum->n, row + head_sum->col0, inv_sums_[i],
                   head_sum->n, head_sum->first);
      }
    }
    if (bf16_) exps_bf16_.narrow(0, 0, rows_).copy_(exps);
  }

  // out_rows (fp32, (rows, n)) = softmax · values, or += alpha · softmax[:, col0:] · values when
  // `accumulate` (values (T − col0, n), in the GEMM dtype).
  void times(const at::Tensor& values, at::Tensor& out_rows, int64_t col0 = 0,
             bool accumulate = false, float alpha = 1.0f) {
    const at::Tensor exps = (bf16_ ? exps_bf16_ : exps_).narrow(0, 0, rows_);
    const at::Tensor lhs = exps.narrow(1, col0, exps.size(1) - col0);
    const bool in_place = !bf16_ && !accumulate;
    const at::Tensor product = in_place ? at::mm_out(out_rows, lhs, values)
                                        : at::mm(lhs, values).to(at::kFloat);
    const int64_t n = out_rows.size(1);
    TORCH_CHECK(out_rows.is_contiguous() || out_rows.stride(1) == 1,
                "attention tile: output rows must be row-contiguous");
    float* dst = out_rows.data_ptr<float>();
    const float* src = product.data_ptr<float>();
    const int64_t dst_stride = out_rows.stride(0), src_stride = product.stride(0);
    for (int64_t i = 0; i < rows_; ++i) {
      const float a = alpha * inv_sums_[i];
      if (in_place) {
        scale_in_place(dst + i * dst_stride, a, n);
      } else {
        scaled_add(dst + i * dst_stride, src + i * src_stride, a, n, /*first=*/!accumulate);
      }
    }
  }

 private:
  bool bf16_;
  ExpPath exp_path_;  // read once per tile (WSSS_FAST_CPU_EXP), not per compute()
  int64_t rows_ = 0;
  at::Tensor exps_;         // (kQueryRowBlock, T) fp32
  at::Tensor scores_bf16_;  // bf16 GEMM output, then widened into exps_
  at::Tensor exps_bf16_;    // the bf16 left operand of the second GEMM
  std::vector<float> inv_sums_;
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

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace wsss_fast
