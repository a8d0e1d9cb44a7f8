// propagate, CPU face (DESIGN §3.3).
// Dense: one batched GEMM in fp32. Streaming: per (batch, tile of patch query rows), for every
// block and head, the tile's probabilities times [0; cam] accumulate into a rows×K buffer, so
// P×P is never formed (memory O(rows·T) per thread); bf16 q, k run bf16 GEMMs where the CPU has
// them (attention_block.h), with fp32 softmax and accumulator.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "cpu/attention_block.h"
#include "cpu/parallel.h"

namespace wsss_fast {
namespace {

at::Tensor propagate_cpu(const at::Tensor& affinity, const at::Tensor& cam) {
  TORCH_CHECK(affinity.dim() == 3 && cam.dim() == 3 && affinity.size(0) == cam.size(0) &&
                  affinity.size(1) == cam.size(1) && affinity.size(2) == cam.size(1),
              "propagate: expected affinity (B, P, P) and cam (B, P, K)");
  return at::bmm(affinity.to(at::kFloat), cam.to(at::kFloat)).to(cam.scalar_type());
}

at::Tensor propagate_streaming_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                   const at::Tensor& cam_in, double scale, int64_t num_cls,
                                   at::ArrayRef<double> weights) {
  TORCH_CHECK(q_in.dim() == 5 && k_in.sizes() == q_in.sizes(),
              "propagate_streaming: q, k must be (L, B, H, T, d) of one shape");
  // No copies of the L blocks' q, k when they are in the GEMM dtype already (fp32, or bf16 with
  // bf16 GEMMs): this form exists to bound memory. Softmax and accumulator are fp32.
  const at::ScalarType compute = gemm_dtype(q_in.scalar_type());
  const at::Tensor q = q_in.to(compute).contiguous();
  const at::Tensor k = k_in.to(compute).contiguous();
  const at::Tensor cam = cam_in.to(compute).contiguous();
  const int64_t layers = q.size(0), batch = q.size(1), heads = q.size(2), tokens = q.size(3);
  const int64_t n_patch = tokens - num_cls;
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == layers,
              "propagate_streaming: one weight per block expected");
  TORCH_CHECK(cam.dim() == 3 && cam.size(0) == batch && cam.size(1) == n_patch,
              "propagate_streaming: cam must be (B, T - num_cls, K)");

  at::Tensor out = at::empty(cam.sizes(), cam.options().dtype(at::kFloat));
  const std::vector<at::Tensor> qs = matrices(q), ks = matrices(k);  // index (l·B + b)·H + h
  const int64_t tile_size = tile_rows(n_patch, batch);
  const int64_t tiles = ceil_div(n_patch, tile_size);
  parallel_for(0, batch * tiles, 1, [&](int64_t begin, int64_t end) {
    AttentionTile tile(tokens, compute);
    for (int64_t index = begin; index < end; ++index) {
      const int64_t b = index / tiles;
      const int64_t r0 = (index % tiles) * tile_size;
      const int64_t rows = std::min(tile_size, n_patch - r0);
      at::Tensor acc = out[b].narrow(0, r0, rows);
      acc.zero_();
      for (int64_t l = 0; l < layers; ++l) {
        if (weights[l] == 0.0) continue;
        for (int64_t h = 0; h < heads; ++h) {
          const int64_t lbh = (l * batch + b) * heads + h;
          tile.compute(qs[lbh].narrow(0, num_cls + r0, rows), ks[lbh].t(), scale);
          tile.times(cam[b], acc, /*col0=*/num_cls, /*accumulate=*/true,
                     static_cast<float>(weights[l] / heads));
        }
      }
    }
  });
  return out.to(cam_in.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(wsss_fast_C, CPU, m) {
  m.impl("propagate", &propagate_cpu);
  m.impl("propagate_streaming", &propagate_streaming_cpu);
}

}  // namespace wsss_fast
