// class_patch_reweight launcher: one block per row, block reductions for the three row
// statistics, then the shared per-element body (csrc/common/class_patch_reweight.h).
#include <math.h>

#include "common/class_patch_reweight.h"
#include "cuda/cuda_common.cuh"

namespace wsss_fast {
namespace cuda {
namespace {

constexpr const char* kOp = "wsss_fast_class_patch_reweight";

template <typename T>
__global__ void class_patch_reweight_kernel(const T* __restrict__ attn,
                                            const T* __restrict__ patchcam, T* __restrict__ out,
                                            int64_t rows, int64_t cols, float gamma,
                                            bool take_sqrt) {
  __shared__ float shared[32];
  const bool has_patchcam = patchcam != nullptr;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* a = attn + row * cols;
    float mass = 0.f, row_max = 0.f;
    for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
      const float v = reweight_clamp(load_float(a + j));
      mass += v;
      row_max = fmaxf(row_max, v);
    }
    mass = block_allreduce(mass, shared, SumOp(), 0.f);
    row_max = block_allreduce(row_max, shared, MaxOp(), 0.f);
    const float inv_max = reweight_inv_max(row_max);
    float power_sum = 0.f;
    for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
      power_sum += reweight_scaled_power(load_float(a + j), inv_max, gamma);
    }
    power_sum = block_allreduce(power_sum, shared, SumOp(), 0.f);
    const ReweightRow stats = reweight_row(mass, row_max, power_sum);
    const T* pc = has_patchcam ? patchcam + row * cols : nullptr;
    T* o = out + row * cols;
    for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
      const float p = has_patchcam ? load_float(pc + j) : 0.f;
      store_float(o + j, reweight_output(load_float(a + j), stats, gamma, has_patchcam, p,
                                         take_sqrt));
    }
  }
}

template <typename T>
int launch(const void* attn, const void* patchcam, void* out, int64_t rows, int64_t cols,
           float gamma, bool take_sqrt, cudaStream_t stream) {
  const int threads = cols <= 64 ? 64 : (cols <= 128 ? 128 : 256);
  const unsigned int blocks = grid_dim(rows, 1 << 30);
  class_patch_reweight_kernel<T><<<blocks, threads, 0, stream>>>(
      static_cast<const T*>(attn), static_cast<const T*>(patchcam), static_cast<T*>(out), rows,
      cols, gamma, take_sqrt);
  return launch_status(kOp);
}

}  // namespace
}  // namespace cuda
}  // namespace wsss_fast

extern "C" int wsss_fast_class_patch_reweight(const void* attn, const void* patchcam_or_null,
                                              void* out, int64_t rows, int64_t cols, int dtype,
                                              float gamma, int take_sqrt, void* stream) {
  using namespace wsss_fast::cuda;
  clear_error();
  if (const int status = check_dtype(kOp, dtype)) return status;
  if (rows < 0 || cols < 0) {
    return set_error(WSSS_FAST_CUDA_ERROR_INVALID_ARGUMENT,
                     "%s: negative size (rows=%lld, cols=%lld)", kOp, (long long)rows,
                     (long long)cols);
  }
  if (!(isfinite(gamma) && gamma > 0.f)) {
    return set_error(WSSS_FAST_CUDA_ERROR_INVALID_ARGUMENT,
                     "%s: gamma must be finite and > 0, got %g", kOp, (double)gamma);
  }
  if (rows == 0 || cols == 0) return 0;
  if (attn == nullptr || out == nullptr) {
    return set_error(WSSS_FAST_CUDA_ERROR_INVALID_ARGUMENT, "%s: attn and out must not be NULL",
                     kOp);
  }
  const cudaStream_t s = as_stream(stream);
  const bool sq = take_sqrt != 0;
  switch (dtype) {
    case WSSS_FAST_DTYPE_FLOAT16:
      return launch<__half>(attn, patchcam_or_null, out, rows, cols, gamma, sq, s);
    case WSSS_FAST_DTYPE_BFLOAT16:
      return launch<__nv_bfloat16>(attn, patchcam_or_null, out, rows, cols, gamma, sq, s);
    default:
      return launch<float>(attn, patchcam_or_null, out, rows, cols, gamma, sq, s);
  }
}
