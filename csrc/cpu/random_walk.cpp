// random_walk, CPU face (DESIGN §3.5): the tap table (2·O normalized coefficients per pixel)
// is built once; then `steps` gather steps ping-pong between two zero-padded fp32 buffers, each
// step one parallel sweep over the rows of every (batch, class) plane, vectorized along the row.
// Never forms the N×N transition matrix. The math is csrc/common/random_walk.h, shared with the
// CUDA kernels.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <utility>

#include "cpu/parallel.h"
#include "common/random_walk.h"

namespace wsss_fast {
namespace {

// One row of one plane. Compiled for AVX-512, AVX2+FMA and baseline x86-64 (picked at load
// time): the extension is otherwise built for the baseline ISA only.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx512f", "arch=haswell", "default")))
#endif
void walk_row(const float* coeff, int64_t stride, const float* src, int64_t pitch, int radius,
              int offsets, int64_t width, float* dst) {
  walk_run_step(coeff, stride, src, pitch, radius, offsets, width, dst);
}

at::Tensor random_walk_cpu(const at::Tensor& x0_in, const at::Tensor& weights_in, int64_t steps,
                           int64_t radius_in) {
  TORCH_CHECK(x0_in.dim() == 4 && weights_in.dim() == 4,
              "random_walk: the cpu face takes x0 (B, K, h, w) and weights (B, O, h, w)");
  TORCH_CHECK(radius_in >= 2 && radius_in <= 64, "random_walk: radius must be in [2, 64]");
  TORCH_CHECK(steps >= 1, "random_walk: steps must be >= 1");
  const int radius = static_cast<int>(radius_in);
  const int offsets = half_disk_size(radius);
  const int64_t batch = x0_in.size(0), classes = x0_in.size(1);
  const int64_t h = x0_in.size(2), w = x0_in.size(3), n = h * w;
  TORCH_CHECK(weights_in.size(0) == batch && weights_in.size(1) == offsets &&
                  weights_in.size(2) == h && weights_in.size(3) == w,
              "random_walk: weights must be (B, O, h, w) with O = ", offsets, " for radius ",
              radius);
  const at::Tensor weights = weights_in.to(at::kFloat).contiguous();
  const int64_t taps = 2 * offsets;
  const int64_t pad = radius - 1, pitch = w + 2 * pad, padded_h = h + 2 * pad;

  at::Tensor coeff = at::empty({batch, taps, n}, weights.options());
  const float* weight_ptr = weights.data_ptr<float>();
  float* coeff_ptr = coeff.data_ptr<float>();
  parallel_for(0, batch * n, 256, [&](int64_t begin, int64_t end) {
    for (int64_t index = begin; index < end; ++index) {
      const int64_t b = index / n, pixel = index % n;
      walk_pixel_taps(weight_ptr + b * offsets * n, h, w, radius, offsets, pixel / w, pixel % w,
                      coeff_ptr + b * taps * n + pixel, n);
    }
  });

  // The halo of both buffers stays 0: steps write the interior only.
  const int64_t planes = batch * classes;
  at::Tensor src = at::zeros({planes, padded_h, pitch}, weights.options());
  at::Tensor dst = at::zeros({planes, padded_h, pitch}, weights.options());
  src.view({batch, classes, padded_h, pitch})
      .narrow(2, pad, h)
      .narrow(3, pad, w)
      .copy_(x0_in);
  const int64_t plane_size = padded_h * pitch;
  // Every step ends in a barrier, and a thread descheduled by another process stalls the others
  // for a time slice: on a loaded 2-core machine a 94×125×3 walk took 0.28 s on one thread and
  // 3.3 s on two. So a chunk gets at least ~2^22 tap updates: one image's walk runs on one
  // thread, and throughput comes from walking several images at once (refine's workers).
  const int64_t row_grain = std::max<int64_t>(4, (int64_t{1} << 22) / (taps * w));
  for (int64_t step = 0; step < steps; ++step) {
    const float* from = src.data_ptr<float>();
    float* to = dst.data_ptr<float>();
    // Classes innermost: a row's taps (taps × w floats) stay in cache across the classes.
    parallel_for(0, batch * h * classes, row_grain, [&](int64_t begin, int64_t end) {
      for (int64_t index = begin; index < end; ++index) {
        const int64_t k = index % classes, y = (index / classes) % h, b = index / (classes * h);
        const int64_t at_row = (b * classes + k) * plane_size + (y + pad) * pitch + pad;
        walk_row(coeff_ptr + b * taps * n + y * w, n, from + at_row, pitch, radius, offsets, w,
                 to + at_row);
      }
    });
    std::swap(src, dst);
  }
  return src.view({batch, classes, padded_h, pitch})
      .narrow(2, pad, h)
      .narrow(3, pad, w)
      .to(x0_in.scalar_type())
      .contiguous();
}

}  // namespace

TORCH_LIBRARY_IMPL(wsss_fast_C, CPU, m) { m.impl("random_walk", &random_walk_cpu); }

}  // namespace wsss_fast
