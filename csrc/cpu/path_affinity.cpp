// path_affinity, CPU face (IRN's path-max affinity, reference affinity_networks.md §1.2): one
// parallel sweep over (batch, offset, window row), each row a vectorized max over the offset's
// path cells; only the uint8 arg-max per pair is kept for the backward, a scatter of each pair's
// gradient to its arg-max cell. The math is csrc/common/path_affinity.h. The path table comes
// from Python (wsss_fast/ops/irn_paths.py, the one definition of IRN's paths) and is checked here.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu/parallel.h"
#include "common/path_affinity.h"

namespace wsss_fast {
namespace {

constexpr int64_t kRun = 128;  // sources per vectorized run (its arg-max scratch is on the stack)

// One window row of one offset, in runs of kRun sources. Compiled for AVX-512, AVX2 and baseline
// x86-64 (picked at load time): the extension is otherwise built for the baseline ISA only.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx512f", "arch=haswell", "default")))
#endif
void path_max_row(const float* at_row, int64_t w, const int32_t* path, int length, int64_t cols,
                  float* affinity, uint8_t* argmax) {
  int32_t index[kRun];
  for (int64_t x = 0; x < cols; x += kRun) {
    path_max_run(at_row + x, w, path, length, std::min(kRun, cols - x), affinity + x, index,
                 argmax + x);
  }
}

// The checked path table: (cy, cx) pairs and offset starts, as plain vectors.
struct PathTable {
  std::vector<int32_t> cells;  // 2 per cell
  std::vector<int32_t> start;  // offsets + 1
  int64_t offsets() const { return static_cast<int64_t>(start.size()) - 1; }
};

PathTable read_paths(const at::Tensor& cells_in, const at::Tensor& start_in, int64_t floor) {
  TORCH_CHECK(cells_in.dim() == 2 && cells_in.size(1) == 2 && start_in.dim() == 1 &&
                  start_in.size(0) >= 1,
              "path_affinity: cells must be (n, 2) and start (offsets + 1,), got ",
              cells_in.sizes(), " and ", start_in.sizes());
  TORCH_CHECK(floor >= 0, "path_affinity: floor must be >= 0, got ", floor);
  const at::Tensor cells = cells_in.to(at::kCPU, at::kInt).contiguous();
  const at::Tensor start = start_in.to(at::kCPU, at::kInt).contiguous();
  PathTable table{{cells.data_ptr<int32_t>(), cells.data_ptr<int32_t>() + cells.numel()},
                  {start.data_ptr<int32_t>(), start.data_ptr<int32_t>() + start.numel()}};
  TORCH_CHECK(table.start.front() == 0 && table.start.back() == cells.size(0),
              "path_affinity: start must run from 0 to the number of cells");
  for (int64_t o = 0; o < table.offsets(); ++o) {
    const int64_t length = table.start[o + 1] - table.start[o];
    TORCH_CHECK(length >= 1 && length <= 255,
                "path_affinity: every path needs 1 to 255 cells, offset ", o, " has ", length);
  }
  // Every cell must stay on the grid from every source of the window (rows [0, h − floor),
  // columns [floor, w − floor)): 0 <= cy <= floor, |cx| <= floor.
  for (size_t k = 0; k < table.cells.size(); k += 2) {
    const int32_t cy = table.cells[k], cx = table.cells[k + 1];
    TORCH_CHECK(cy >= 0 && cy <= floor && cx >= -floor && cx <= floor,
                "path_affinity: path cell (", cy, ", ", cx, ") leaves the radius ", floor + 1);
  }
  return table;
}

std::tuple<at::Tensor, at::Tensor> path_affinity_cpu(const at::Tensor& boundary_in,
                                                     const at::Tensor& cells_in,
                                                     const at::Tensor& start_in, int64_t floor) {
  TORCH_CHECK(boundary_in.dim() == 4 && boundary_in.size(1) == 1,
              "path_affinity: the cpu face takes boundary (B, 1, h, w), got ", boundary_in.sizes());
  const PathTable table = read_paths(cells_in, start_in, floor);
  const int64_t batch = boundary_in.size(0), h = boundary_in.size(2), w = boundary_in.size(3);
  const int64_t rows = h - floor, cols = w - 2 * floor, offsets = table.offsets();
  TORCH_CHECK(rows >= 1 && cols >= 1, "path_affinity: a ", h, "×", w,
              " grid has no source window for radius ", floor + 1);
  const int64_t sources = rows * cols;
  const at::Tensor boundary = boundary_in.to(at::kFloat).contiguous();
  at::Tensor affinity = at::empty({batch, offsets, sources}, boundary_in.options());
  at::Tensor argmax = at::empty({batch, offsets, sources}, boundary_in.options().dtype(at::kByte));
  if (affinity.numel() == 0) return {affinity, argmax};

  const float* plane = boundary.data_ptr<float>();
  uint8_t* argmax_ptr = argmax.data_ptr<uint8_t>();
  const int32_t* cells = table.cells.data();
  const int32_t* start = table.start.data();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, affinity.scalar_type(),
                                  "path_affinity_cpu", [&] {
    scalar_t* out = affinity.data_ptr<scalar_t>();
    // A task is one window row of one offset: ~cols × path length loads.
    parallel_for(0, batch * offsets * rows, 16, [&](int64_t begin, int64_t end) {
      std::vector<float> row(std::is_same<scalar_t, float>::value ? 0 : cols);
      for (int64_t index = begin; index < end; ++index) {
        const int64_t y = index % rows, o = (index / rows) % offsets, b = index / (rows * offsets);
        const int64_t pair = (b * offsets + o) * sources + y * cols;
        float* values = row.empty() ? reinterpret_cast<float*>(out + pair) : row.data();
        path_max_row(plane + b * h * w + y * w + floor, w, cells + 2 * start[o],
                     start[o + 1] - start[o], cols, values, argmax_ptr + pair);
        if (!row.empty()) {
          for (int64_t x = 0; x < cols; ++x) out[pair + x] = static_cast<scalar_t>(values[x]);
        }
      }
    });
  });
  return {affinity, argmax};
}

at::Tensor path_affinity_backward_cpu(const at::Tensor& grad_in, const at::Tensor& argmax_in,
                                      const at::Tensor& cells_in, const at::Tensor& start_in,
                                      int64_t h, int64_t w, int64_t floor) {
  const PathTable table = read_paths(cells_in, start_in, floor);
  const int64_t rows = h - floor, cols = w - 2 * floor, offsets = table.offsets();
  TORCH_CHECK(rows >= 1 && cols >= 1, "path_affinity: a ", h, "×", w,
              " grid has no source window for radius ", floor + 1);
  TORCH_CHECK(grad_in.dim() == 3 && grad_in.size(1) == offsets &&
                  grad_in.size(2) == rows * cols && argmax_in.sizes() == grad_in.sizes() &&
                  argmax_in.scalar_type() == at::kByte,
              "path_affinity_backward: grad and argmax (uint8) must be (B, ", offsets, ", ",
              rows * cols, "), got ", grad_in.sizes(), " and ", argmax_in.sizes(), " ",
              argmax_in.scalar_type());
  const int64_t batch = grad_in.size(0), sources = rows * cols, plane = h * w;
  const at::Tensor grad = grad_in.contiguous();
  const at::Tensor argmax = argmax_in.contiguous();
  // Offsets are split into fixed chunks, each scattering into its own fp32 plane; the planes are
  // then summed in chunk order: parallel without atomics and independent of the thread count.
  constexpr int64_t kChunk = 16;
  const int64_t chunks = std::max<int64_t>(1, (offsets + kChunk - 1) / kChunk);
  at::Tensor partial = at::zeros({batch, chunks, plane}, grad.options().dtype(at::kFloat));
  float* partial_ptr = partial.data_ptr<float>();
  const uint8_t* argmax_ptr = argmax.data_ptr<uint8_t>();
  const int32_t* cells = table.cells.data();
  const int32_t* start = table.start.data();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(),
                                  "path_affinity_backward_cpu", [&] {
    const scalar_t* grad_ptr = grad.data_ptr<scalar_t>();
    parallel_for(0, batch * chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t index = begin; index < end; ++index) {
        const int64_t b = index / chunks, chunk = index % chunks;
        float* acc = partial_ptr + index * plane;
        for (int64_t o = chunk * kChunk; o < std::min(offsets, (chunk + 1) * kChunk); ++o) {
          for (int64_t y = 0; y < rows; ++y) {
            const int64_t pair = (b * offsets + o) * sources + y * cols;
            path_max_run_backward(grad_ptr + pair, argmax_ptr + pair, cells + 2 * start[o], cols,
                                  y * w + floor, w, acc);
          }
        }
      }
    });
  });
  return partial.sum(1).view({batch, 1, h, w}).to(grad_in.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(wsss_fast_C, CPU, m) {
  m.impl("path_affinity", &path_affinity_cpu);
  m.impl("path_affinity_backward", &path_affinity_backward_cpu);
}

}  // namespace wsss_fast
