// Path-max affinity bodies (IRN, reference affinity_networks.md §1.2) of the C++ CPU op; the
// forward is WSSS_HD so that a CUDA launcher can share it (one source per thread, count = 1; its
// backward would need atomicAdd where this one scatters into a private plane).
//
// For a boundary map B (h×w) and the pair (s, s + δ) of a source s in the window, the affinity is
// a = 1 − max_{c ∈ Π_δ} B(s + c) over the path cells Π_δ of δ (element 0 is δ). The table of
// all paths is flattened offset-major: cells[2k], cells[2k + 1] = (cy, cx) of cell k, offset o's
// cells are k ∈ [start[o], start[o + 1]). The arg-max stored per pair is the index of the cell
// inside its path (< 256: a uint8); ties go to the first cell in path order and a NaN wins
// (the first one), like torch.max over the gathered path axis. The backward sends each pair's
// gradient to that one cell, so nothing of size pairs × path length is ever formed.
#pragma once

#include <stdint.h>

#include "common/macros.h"

namespace wsss_fast {

// Whether v replaces the running maximum `best`: larger, or the first NaN.
WSSS_HD bool path_max_takes(float v, float best) { return v > best || (v != v && best == best); }

// 1 − path max and the arg-max of one offset for `count` consecutive sources of one window row.
// `at` points at B(s) of the run's first source in a row-major h×w float plane of row pitch w;
// `path` at the offset's first (cy, cx); `index` is scratch for `count` int32 (the running arg-max
// kept as wide as the values, so that the loop vectorizes; narrowed to uint8 at the end).
// `affinity` holds the running max until the last loop.
WSSS_HD void path_max_run(const float* __restrict__ at, int64_t w, const int32_t* __restrict__ path,
                          int length, int64_t count, float* __restrict__ affinity,
                          int32_t* __restrict__ index, uint8_t* __restrict__ argmax) {
  const float* first = at + path[0] * w + path[1];
  for (int64_t i = 0; i < count; ++i) {
    affinity[i] = first[i];
    index[i] = 0;
  }
  for (int k = 1; k < length; ++k) {
    const float* cell = at + path[2 * k] * w + path[2 * k + 1];
    for (int64_t i = 0; i < count; ++i) {
      const float v = cell[i], best = affinity[i];
      const bool take = path_max_takes(v, best);
      affinity[i] = take ? v : best;
      index[i] = take ? k : index[i];
    }
  }
  for (int64_t i = 0; i < count; ++i) {
    affinity[i] = 1.f - affinity[i];
    argmax[i] = static_cast<uint8_t>(index[i]);
  }
}

// Backward of one offset for `count` consecutive sources of one window row: adds grad[i] to the
// arg-max cell of each pair in the fp32 h×w plane `grad_boundary` (row pitch w), `at` the index
// of the run's first source in it.
template <typename grad_t>
WSSS_HD void path_max_run_backward(const grad_t* __restrict__ grad,
                                   const uint8_t* __restrict__ argmax,
                                   const int32_t* __restrict__ path, int64_t count, int64_t at,
                                   int64_t w, float* __restrict__ grad_boundary) {
  for (int64_t i = 0; i < count; ++i) {
    const int32_t* cell = path + 2 * argmax[i];
    grad_boundary[at + i + cell[0] * w + cell[1]] += static_cast<float>(grad[i]);
  }
}

}  // namespace wsss_fast
