// Random-walk bodies (DESIGN §3.5), shared by the C++ CPU op and the CUDA kernels.
//
// Pairs: the half-disk offsets (dy, dx) of IRN/PSA, in their order: (0, 1..r-1), then for
// dy = 1..r-1, dx = -(r-1)..r-1 with dx² + dy² < r² (34 offsets for r = 5). weights[o][y][x] >= 0
// is the (already β-powered) affinity of the pair ((y, x), (y + dy_o, x + dx_o)); pairs whose
// other endpoint is off the grid do not exist. With A = I + W + Wᵀ and d = colsum(A), one step of
// x @ T, T = A / d, is the normalized gather y[j] = (x[j] + Σ_{i ∈ N(j)} A_ij x[i]) / d_j over
// the 2·O neighbours of j, evaluated here in the equivalent difference form
//   y[j] = x[j] + Σ_{i ∈ N(j)} c_ij (x[i] − x[j]),   c_ij = A_ij / d_j.
// Why: the self coefficient 1/d_j is implied rather than rounded, so fp32 rounding of the table
// no longer acts as a per-pixel gain compounding over hundreds of steps (40× smaller error on
// IRN-like, weakly connected walks), and constant maps stay exactly constant.
// The tap table (tap-major: coeff[t][pixel], t = o for the forward partner (y + dy, x + dx), O + o
// for the backward partner (y − dy, x − dx)) is built once; each step then reads the source
// plane zero-padded by r − 1 on every side, so no tap needs a bounds check (off-grid taps have
// coefficient 0).
#pragma once

#include <stdint.h>

#include "common/macros.h"

namespace wsss_fast {

// Number of half-disk offsets of radius r (34 for r = 5).
WSSS_HD int half_disk_size(int radius) {
  int count = 0;
  for (int dy = 0; dy < radius; ++dy) {
    for (int dx = dy == 0 ? 1 : 1 - radius; dx < radius; ++dx) {
      if (dx * dx + dy * dy < radius * radius) ++count;
    }
  }
  return count;
}

// The tap-table column of pixel (y, x): coeff[t * stride] for its 2·O neighbour taps, A_ij / d_j.
// `weights` is the (O, h, w) plane stack of one batch item; offsets = half_disk_size(radius).
WSSS_HD void walk_pixel_taps(const float* weights, int64_t h, int64_t w, int radius, int offsets,
                             int64_t y, int64_t x, float* coeff, int64_t stride) {
  const int64_t n = h * w;
  float degree = 1.f;  // the self-loop
  int o = 0;
  for (int dy = 0; dy < radius; ++dy) {
    for (int dx = dy == 0 ? 1 : 1 - radius; dx < radius; ++dx) {
      if (dx * dx + dy * dy >= radius * radius) continue;
      const int64_t fy = y + dy, fx = x + dx, by = y - dy, bx = x - dx;
      const float forward = (fy < h && fx >= 0 && fx < w) ? weights[o * n + y * w + x] : 0.f;
      const float backward = (by >= 0 && bx >= 0 && bx < w) ? weights[o * n + by * w + bx] : 0.f;
      coeff[o * stride] = forward;
      coeff[(offsets + o) * stride] = backward;
      degree += forward + backward;
      ++o;
    }
  }
  for (int t = 0; t < 2 * offsets; ++t) coeff[t * stride] /= degree;
}

// One step over a run of `count` consecutive pixels of one row (CPU: a whole row, vectorized
// over the run; CUDA: one pixel per thread, `dst` a register). `coeff` points at the first
// pixel's tap-table column (taps `stride` apart), `src` at the first pixel in a source plane
// zero-padded by radius - 1 with row pitch `pitch`. Every pixel sums its increments in table
// order, then adds its own value.
WSSS_HD void walk_run_step(const float* __restrict__ coeff, int64_t stride,
                           const float* __restrict__ src, int64_t pitch, int radius, int offsets,
                           int64_t count, float* __restrict__ dst) {
  for (int64_t i = 0; i < count; ++i) dst[i] = 0.f;
  int o = 0;
  for (int dy = 0; dy < radius; ++dy) {
    for (int dx = dy == 0 ? 1 : 1 - radius; dx < radius; ++dx) {
      if (dx * dx + dy * dy >= radius * radius) continue;
      const int64_t shift = dy * pitch + dx;
      const float* forward = coeff + o * stride;
      const float* backward = coeff + (offsets + o) * stride;
      for (int64_t i = 0; i < count; ++i) {
        dst[i] += forward[i] * (src[i + shift] - src[i]);
        dst[i] += backward[i] * (src[i - shift] - src[i]);
      }
      ++o;
    }
  }
  for (int64_t i = 0; i < count; ++i) dst[i] += src[i];
}

}  // namespace wsss_fast
