// Multi-scale merge bodies (DESIGN §3.4): bilinear taps identical to
// F.interpolate(mode="bilinear", align_corners=False), the per-pass transform, and the
// per-plane normalization presets.
#pragma once

#include <math.h>
#include <stdint.h>

#include "common/macros.h"

namespace wsss_fast {

enum MergeKind : int { kMergeSum = WSSS_FAST_MERGE_SUM, kMergeMaxFlip = WSSS_FAST_MERGE_MAX_FLIP };
enum NormKind : int {
  kNormNone = WSSS_FAST_NORM_NONE,
  kNormMinMax = WSSS_FAST_NORM_MINMAX,
  kNormMax = WSSS_FAST_NORM_MAX,
  kNormTransCam = WSSS_FAST_NORM_TRANSCAM
};

// One axis of a bilinear resize: source index pair and weights for output index `dst`.
struct LinearTap {
  int64_t i0, i1;
  float w0, w1;
};

// `scale` is in_size / out_size in fp32, as ATen computes it when given an output size. ATen's
// source coordinate is a fused multiply-add (one rounding); two roundings drift by ~2e-5 relative
// once inputs span a few hundred pixels, so fmaf here (hardware FMA on host and device).
WSSS_HD LinearTap linear_tap(int64_t dst, int64_t in_size, float scale) {
  float src = fmaf(scale, (float)dst + 0.5f, -0.5f);
  if (src < 0.f) src = 0.f;
  LinearTap tap;
  tap.i0 = (int64_t)src;
  tap.i1 = tap.i0 + (tap.i0 < in_size - 1 ? 1 : 0);
  float lambda = src - (float)tap.i0;
  lambda = lambda < 0.f ? 0.f : (lambda > 1.f ? 1.f : lambda);
  tap.w1 = lambda;
  tap.w0 = 1.f - lambda;
  return tap;
}

// Bilinear sample of a row-major (h, w) plane; rows weighted outermost, as ATen does.
WSSS_HD float bilinear_sample(const float* plane, int64_t in_w, const LinearTap& ty,
                              const LinearTap& tx) {
  const float* r0 = plane + ty.i0 * in_w;
  const float* r1 = plane + ty.i1 * in_w;
  return ty.w0 * (tx.w0 * r0[tx.i0] + tx.w1 * r0[tx.i1]) +
         ty.w1 * (tx.w0 * r1[tx.i0] + tx.w1 * r1[tx.i1]);
}

// The output column that samples pass column `x`: flipped passes are mirrored back.
WSSS_HD int64_t source_column(int64_t x, int64_t out_w, bool flipped) {
  return flipped ? out_w - 1 - x : x;
}

WSSS_HD float pass_value(float v, bool relu) { return (relu && v < 0.f) ? 0.f : v; }

// Combine the value of one pass into the running merge. For kMergeMaxFlip, `pair_first` marks
// the unflipped pass of an (image, flip) pair: it opens a new pair maximum.
WSSS_HD void merge_accumulate(int merge, float v, bool pair_first, float* total, float* pair_max) {
  if (merge == kMergeSum) {
    *total += v;
  } else if (pair_first) {
    *pair_max = v;
  } else {
    *total += (v > *pair_max ? v : *pair_max);
  }
}

// Applied before the plane min/max are taken.
WSSS_HD float normalize_prepare(float x, int norm) {
  return (norm == kNormTransCam && x < 0.f) ? 0.f : x;
}

// `x` already passed through normalize_prepare; lo/hi are the plane min/max of prepared values.
WSSS_HD float normalize_value(float x, int norm, float lo, float hi, float eps) {
  switch (norm) {
    case kNormMinMax:
      return (x - lo) / (hi - lo + eps);
    case kNormMax: {
      const float denom = hi + eps;
      return denom != 0.f ? x / denom : 0.f;
    }
    case kNormTransCam:
      if (x < lo + eps) x = 0.f;
      return (x - lo - eps) / (hi - lo + eps);
    default:
      return x;
  }
}

}  // namespace wsss_fast
