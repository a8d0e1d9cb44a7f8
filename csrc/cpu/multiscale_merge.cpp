// multiscale_merge, CPU face (DESIGN §3.4): bilinear taps per pass are tabulated once per axis;
// each output row of each (b, k) plane is produced in one sweep over the passes (no per-pass
// full-size temporaries) while its min/max are recorded; a second sweep normalizes each plane.
// The math is csrc/common/multiscale_merge.h, shared with the CUDA kernel.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>
#include <optional>
#include <string_view>
#include <vector>

#include "cpu/parallel.h"
#include "common/multiscale_merge.h"

namespace wsss_fast {
namespace {

int merge_kind(std::string_view merge) {
  if (merge == "sum") return kMergeSum;
  if (merge == "max_flip") return kMergeMaxFlip;
  TORCH_CHECK(false, "multiscale_merge: unknown merge '", std::string(merge), "'");
}

int norm_kind(std::string_view norm) {
  if (norm == "none") return kNormNone;
  if (norm == "minmax") return kNormMinMax;
  if (norm == "max") return kNormMax;
  if (norm == "transcam") return kNormTransCam;
  TORCH_CHECK(false, "multiscale_merge: unknown norm '", std::string(norm), "'");
}

struct PassTaps {
  const float* data;  // (B, K, h, w)
  int64_t h, w;
  bool flipped;
  std::vector<LinearTap> rows;  // per output row
  std::vector<LinearTap> cols;  // per output column, already mirrored for flipped passes
};

at::Tensor multiscale_merge_cpu(at::TensorList maps_in, at::IntArrayRef flips, int64_t out_h,
                                int64_t out_w, bool relu, const std::optional<at::Tensor>& labels_in,
                                c10::string_view merge_name, c10::string_view norm_name,
                                double eps_in) {
  TORCH_CHECK(!maps_in.empty() && maps_in.size() == flips.size(),
              "multiscale_merge: one flip flag per map expected");
  const int merge = merge_kind(std::string_view(merge_name.data(), merge_name.size()));
  const int norm = norm_kind(std::string_view(norm_name.data(), norm_name.size()));
  const float eps = static_cast<float>(eps_in);
  const int64_t batch = maps_in[0].size(0), classes = maps_in[0].size(1);

  std::vector<at::Tensor> maps;  // keeps fp32 contiguous copies alive
  std::vector<PassTaps> passes;
  for (size_t i = 0; i < maps_in.size(); ++i) {
    TORCH_CHECK(maps_in[i].dim() == 4 && maps_in[i].size(0) == batch &&
                    maps_in[i].size(1) == classes,
                "multiscale_merge: every map must be (B, K, h, w) with one B, K");
    maps.push_back(maps_in[i].to(at::kFloat).contiguous());
    PassTaps pass{maps.back().data_ptr<float>(), maps.back().size(2), maps.back().size(3),
                  flips[i] != 0, {}, {}};
    const float scale_y = static_cast<float>(pass.h) / static_cast<float>(out_h);
    const float scale_x = static_cast<float>(pass.w) / static_cast<float>(out_w);
    for (int64_t y = 0; y < out_h; ++y) pass.rows.push_back(linear_tap(y, pass.h, scale_y));
    for (int64_t x = 0; x < out_w; ++x)
      pass.cols.push_back(linear_tap(source_column(x, out_w, pass.flipped), pass.w, scale_x));
    passes.push_back(std::move(pass));
  }
  at::Tensor labels;
  if (labels_in.has_value()) labels = labels_in->to(at::kFloat).contiguous();
  const float* label_ptr = labels.defined() ? labels.data_ptr<float>() : nullptr;

  at::Tensor out = at::empty({batch, classes, out_h, out_w}, maps[0].options());
  float* out_ptr = out.data_ptr<float>();
  const int64_t planes = batch * classes;
  std::vector<float> row_lo(planes * out_h), row_hi(planes * out_h);

  parallel_for(0, planes * out_h, 8, [&](int64_t begin, int64_t end) {
    for (int64_t index = begin; index < end; ++index) {
      const int64_t plane = index / out_h, y = index % out_h;
      const float label = label_ptr ? label_ptr[plane] : 1.f;
      float* dst = out_ptr + index * out_w;
      float lo = std::numeric_limits<float>::infinity(), hi = -lo;
      for (int64_t x = 0; x < out_w; ++x) {
        float total = 0.f, pair_max = 0.f;
        for (size_t p = 0; p < passes.size(); ++p) {
          const PassTaps& pass = passes[p];
          const float v = bilinear_sample(pass.data + plane * pass.h * pass.w, pass.w,
                                          pass.rows[y], pass.cols[x]);
          merge_accumulate(merge, pass_value(v, relu), p % 2 == 0, &total, &pair_max);
        }
        const float value = normalize_prepare(total * label, norm);
        dst[x] = value;
        lo = value < lo ? value : lo;
        hi = value > hi ? value : hi;
      }
      row_lo[index] = lo;
      row_hi[index] = hi;
    }
  });
  if (norm == kNormNone) return out;
  parallel_for(0, planes, 1, [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      float lo = row_lo[plane * out_h], hi = row_hi[plane * out_h];
      for (int64_t y = 1; y < out_h; ++y) {
        lo = std::min(lo, row_lo[plane * out_h + y]);
        hi = std::max(hi, row_hi[plane * out_h + y]);
      }
      float* dst = out_ptr + plane * out_h * out_w;
      for (int64_t i = 0; i < out_h * out_w; ++i) dst[i] = normalize_value(dst[i], norm, lo, hi, eps);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(wsss_fast_C, CPU, m) { m.impl("multiscale_merge", &multiscale_merge_cpu); }

}  // namespace wsss_fast
