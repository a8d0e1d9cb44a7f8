// attention_stats, CPU face (DESIGN §3.1): per (batch, tile of query rows), loop over heads:
// probabilities of the tile with the head sum of its patch columns (a rows×P buffer) added row by
// row in the same pass, then o = P v into the output; the tile then adds its rows, scaled by
// weight/H, into the accumulators it owns (no two tiles share a row, so no locking). bf16 inputs: bf16 GEMMs where
// the CPU has them (attention_block.h), fp32 softmax, head sums and accumulators always.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>

#include "cpu/attention_block.h"
#include "cpu/parallel.h"

namespace wsss_fast {
namespace {

float* accumulator_ptr(const std::optional<at::Tensor>& acc, double weight) {
  if (!acc.has_value() || weight == 0.0) return nullptr;
  TORCH_CHECK(acc->scalar_type() == at::kFloat && acc->is_contiguous(),
              "attention_stats: accumulators must be contiguous float32");
  return acc->data_ptr<float>();
}

at::Tensor attention_stats_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                               const at::Tensor& v_in, double scale, int64_t num_cls,
                               const std::optional<at::Tensor>& cls2patch,
                               double cls2patch_weight,
                               const std::optional<at::Tensor>& patch2patch,
                               double patch2patch_weight, const std::optional<at::Tensor>& cls_row,
                               double cls_row_weight) {
  TORCH_CHECK(q_in.dim() == 4 && k_in.sizes() == q_in.sizes() && v_in.sizes() == q_in.sizes(),
              "attention_stats: q, k, v must be (B, H, T, d) of one shape");
  // bf16 inputs stay bf16 where the GEMMs run in bf16 (gemm_dtype); the softmax, its head sum
  // and the output are fp32. The scale is applied to each tile's scores (no scaled copy of q).
  const at::ScalarType compute = gemm_dtype(q_in.scalar_type());
  const at::Tensor q = q_in.to(compute).contiguous();
  // k stays (…, T, d): its transposed view is the GEMM's right operand (as fast as a (d, T) copy
  // at d = 64, T = 2324, measured; the copy cost 43 MB of writes per ViT-S 768² pass).
  const at::Tensor k = k_in.to(compute).contiguous();
  const at::Tensor v = v_in.to(compute).contiguous();
  const int64_t batch = q.size(0), heads = q.size(1), tokens = q.size(2);
  const int64_t n_cls = num_cls, n_patch = tokens - num_cls;
  TORCH_CHECK(n_cls >= 0 && n_patch > 0, "attention_stats: num_cls must be in [0, T)");

  float* c2p = accumulator_ptr(cls2patch, cls2patch_weight);
  float* p2p = accumulator_ptr(patch2patch, patch2patch_weight);
  float* row0 = accumulator_ptr(cls_row, cls_row_weight);
  const float c2p_alpha = static_cast<float>(cls2patch_weight / heads);
  const float p2p_alpha = static_cast<float>(patch2patch_weight / heads);
  const float row0_alpha = static_cast<float>(cls_row_weight / heads);

  at::Tensor out = at::empty(q.sizes(), q.options().dtype(at::kFloat));
  const std::vector<at::Tensor> qs = matrices(q), ks = matrices(k), vs = matrices(v),
                                outs = matrices(out);
  const int64_t tile_size = tile_rows(tokens, batch);
  const int64_t tiles = ceil_div(tokens, tile_size);
  parallel_for(0, batch * tiles, 1, [&](int64_t begin, int64_t end) {
    AttentionTile tile(tokens, compute);
    std::vector<float> head_sum(kQueryRowBlock * n_patch);
    for (int64_t index = begin; index < end; ++index) {
      const int64_t b = index / tiles;
      const int64_t r0 = (index % tiles) * tile_size;
      const int64_t rows = std::min(tile_size, tokens - r0);
      // Does any row of this tile feed a statistic?
      const bool has_cls_rows = r0 < n_cls;
      const bool has_patch_rows = r0 + rows > n_cls;
      const bool feeds = (has_cls_rows && (c2p || (row0 && r0 == 0))) || (has_patch_rows && p2p);
      for (int64_t h = 0; h < heads; ++h) {
        const int64_t bh = b * heads + h;
        const AttentionTile::HeadSum sum{head_sum.data(), n_patch, n_cls, /*first=*/h == 0};
        tile.compute(qs[bh].narrow(0, r0, rows), ks[bh].t(), scale, feeds ? &sum : nullptr);
        at::Tensor out_rows = outs[bh].narrow(0, r0, rows);
        tile.times(vs[bh], out_rows);
      }
      if (!feeds) continue;
      const float* sums = head_sum.data();
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t token = r0 + i;
        const float* src = sums + i * n_patch;
        if (token < n_cls) {
          if (c2p) axpy(c2p + (b * n_cls + token) * n_patch, src, c2p_alpha, n_patch);
          if (row0 && token == 0) axpy(row0 + b * n_patch, src, row0_alpha, n_patch);
        } else if (p2p) {
          axpy(p2p + (b * n_patch + token - n_cls) * n_patch, src, p2p_alpha, n_patch);
        }
      }
    }
  });
  return out.to(q_in.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(wsss_fast_C, CPU, m) { m.impl("attention_stats", &attention_stats_cpu); }

}  // namespace wsss_fast
