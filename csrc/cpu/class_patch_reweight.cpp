// class_patch_reweight, CPU face (DESIGN §3.2): rows in parallel; per row one pass for the mass
// and max, one for the scaled powers (kept in a row buffer: powf is the cost) and their sum, one
// writing the output (the bodies are shared with the CUDA kernel,
// csrc/common/class_patch_reweight.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "cpu/parallel.h"
#include "common/class_patch_reweight.h"

namespace wsss_fast {
namespace {

template <typename scalar_t>
void reweight_rows(const scalar_t* attn, const scalar_t* patchcam, scalar_t* out, int64_t rows,
                   int64_t cols, float gamma, bool take_sqrt) {
  // A few thousand elements per task: 20 class rows of 2304 split evenly over the threads.
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(cols, 1));
  parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> powers(cols);
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* a = attn + r * cols;
      float mass = 0.f, row_max = 0.f;
      for (int64_t j = 0; j < cols; ++j) {
        const float x = reweight_clamp(static_cast<float>(a[j]));
        mass += x;
        row_max = x > row_max ? x : row_max;
      }
      const float inv_max = reweight_inv_max(row_max);
      float power_sum = 0.f;
      for (int64_t j = 0; j < cols; ++j) {
        powers[j] = reweight_scaled_power(static_cast<float>(a[j]), inv_max, gamma);
        power_sum += powers[j];
      }
      const ReweightRow row = reweight_row(mass, row_max, power_sum);
      const scalar_t* pc = patchcam ? patchcam + r * cols : nullptr;
      scalar_t* o = out + r * cols;
      for (int64_t j = 0; j < cols; ++j) {
        o[j] = static_cast<scalar_t>(reweight_finish(powers[j], row, pc != nullptr,
                                                     pc ? static_cast<float>(pc[j]) : 0.f,
                                                     take_sqrt));
      }
    }
  });
}

at::Tensor class_patch_reweight_cpu(const at::Tensor& attn_in, double gamma,
                                    const std::optional<at::Tensor>& patchcam_in, bool take_sqrt) {
  TORCH_CHECK(attn_in.dim() == 2, "class_patch_reweight: the cpu face takes (rows, cols)");
  const at::Tensor attn = attn_in.contiguous();
  at::Tensor patchcam;
  if (patchcam_in.has_value()) {
    TORCH_CHECK(patchcam_in->sizes() == attn.sizes(),
                "class_patch_reweight: patchcam must match attn");
    patchcam = patchcam_in->to(attn.scalar_type()).contiguous();
  }
  at::Tensor out = at::empty_like(attn);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, attn.scalar_type(),
                                  "class_patch_reweight_cpu", [&] {
    reweight_rows<scalar_t>(attn.data_ptr<scalar_t>(),
                            patchcam.defined() ? patchcam.data_ptr<scalar_t>() : nullptr,
                            out.data_ptr<scalar_t>(), attn.size(0), attn.size(1),
                            static_cast<float>(gamma), take_sqrt);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(wsss_fast_C, CPU, m) {
  m.impl("class_patch_reweight", &class_patch_reweight_cpu);
}

}  // namespace wsss_fast
