// multiscale_merge launcher (DESIGN §3.4) around the shared bodies of
// csrc/common/multiscale_merge.h:
//   1. merge kernel: one thread per output pixel of a (b, k) plane loops over every pass (the
//      per-pass table is a by-value kernel parameter; no per-pass temporaries), applies labels and
//      normalize_prepare, writes the pixel and, when normalizing, folds the plane min/max into
//      order-preserving integer keys (block reduction, then one atomicMin/atomicMax per block);
//   2. normalize kernel: normalize_value with the plane's min/max, in place.
// The 2 * planes keys live in stream-ordered scratch (cudaMallocAsync).
#include <math.h>

#include "common/multiscale_merge.h"
#include "cuda/cuda_common.cuh"

namespace wsss_fast {
namespace cuda {
namespace {

constexpr const char* kOp = "wsss_fast_multiscale_merge";
constexpr int kThreads = 256;
constexpr int kPixelsPerThread = 4;  // target, sets the number of blocks per plane
constexpr int64_t kMaxGridY = 65535;
constexpr int64_t kMaxGridX = int64_t(1) << 30;

struct PassInfo {
  const float* map;  // (batch, classes, h, w)
  int64_t h, w;
  float scale_y, scale_x;  // h / out_h and w / out_w in fp32, as linear_tap expects
  int flipped;
};

struct MergeArgs {
  PassInfo pass[WSSS_FAST_CUDA_MAX_PASSES];
  int num_passes;
  int relu, merge, norm;
  int64_t planes, out_h, out_w;
  const float* labels;  // (planes,) or nullptr
  float* out;           // (planes, out_h, out_w)
  unsigned int* lo_key; // (planes,) or nullptr when norm == none
  unsigned int* hi_key;
};

// A float's bit pattern mapped to an unsigned key with the same order (negative floats reversed,
// positive floats above them): atomicMin/atomicMax on keys are float min/max. The scratch starts
// at 0xffffffff (lo) / 0 (hi), i.e. byte memsets.
__device__ __forceinline__ unsigned int float_key(float v) {
  const unsigned int bits = __float_as_uint(v);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

__device__ __forceinline__ float key_float(unsigned int key) {
  return __uint_as_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}

__global__ void __launch_bounds__(kThreads) merge_kernel(const __grid_constant__ MergeArgs args) {
  __shared__ float shared[32];
  const int64_t hw = args.out_h * args.out_w;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t plane = blockIdx.y; plane < args.planes; plane += gridDim.y) {
    const float label = args.labels != nullptr ? args.labels[plane] : 1.f;
    float lo = INFINITY, hi = -INFINITY;
    for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < hw;
         idx += stride) {
      const int64_t y = idx / args.out_w;
      const int64_t x = idx - y * args.out_w;
      float total = 0.f, pair_max = 0.f;
      for (int i = 0; i < args.num_passes; ++i) {
        const PassInfo& pass = args.pass[i];
        const LinearTap ty = linear_tap(y, pass.h, pass.scale_y);
        const LinearTap tx =
            linear_tap(source_column(x, args.out_w, pass.flipped != 0), pass.w, pass.scale_x);
        const float v = bilinear_sample(pass.map + plane * pass.h * pass.w, pass.w, ty, tx);
        merge_accumulate(args.merge, pass_value(v, args.relu != 0), (i & 1) == 0, &total,
                         &pair_max);
      }
      if (args.labels != nullptr) total *= label;
      total = normalize_prepare(total, args.norm);
      args.out[plane * hw + idx] = total;
      lo = fminf(lo, total);
      hi = fmaxf(hi, total);
    }
    if (args.norm != kNormNone) {  // uniform over the block
      lo = block_allreduce(lo, shared, MinOp(), INFINITY);
      hi = block_allreduce(hi, shared, MaxOp(), -INFINITY);
      if (threadIdx.x == 0) {
        atomicMin(args.lo_key + plane, float_key(lo));
        atomicMax(args.hi_key + plane, float_key(hi));
      }
    }
  }
}

__global__ void __launch_bounds__(kThreads)
    normalize_kernel(float* __restrict__ out, int64_t planes, int64_t hw,
                     const unsigned int* __restrict__ lo_key,
                     const unsigned int* __restrict__ hi_key, int norm, float eps) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t plane = blockIdx.y; plane < planes; plane += gridDim.y) {
    const float lo = key_float(lo_key[plane]);
    const float hi = key_float(hi_key[plane]);
    float* o = out + plane * hw;
    for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < hw;
         idx += stride) {
      o[idx] = normalize_value(o[idx], norm, lo, hi, eps);
    }
  }
}

// Stream-ordered scratch; falls back to cudaMalloc (freed after a stream sync) on devices
// without memory pools.
struct Scratch {
  void* ptr = nullptr;
  bool async = true;
};

int scratch_alloc(Scratch* scratch, size_t bytes, cudaStream_t stream) {
  cudaError_t err = cudaMallocAsync(&scratch->ptr, bytes, stream);
  if (err == cudaErrorNotSupported) {
    (void)cudaGetLastError();
    scratch->async = false;
    err = cudaMalloc(&scratch->ptr, bytes);
  }
  return cuda_status(err, kOp, "allocating the min/max scratch");
}

int scratch_free(Scratch* scratch, cudaStream_t stream, int status) {
  if (scratch->ptr == nullptr) return status;
  cudaError_t err;
  if (scratch->async) {
    err = cudaFreeAsync(scratch->ptr, stream);
  } else {
    err = cudaStreamSynchronize(stream);
    const cudaError_t free_err = cudaFree(scratch->ptr);
    if (err == cudaSuccess) err = free_err;
  }
  scratch->ptr = nullptr;
  const int free_status = cuda_status(err, kOp, "freeing the min/max scratch");
  return status != 0 ? status : free_status;  // keep the first error's message
}

int run(MergeArgs& args, float eps, cudaStream_t stream) {
  const int64_t hw = args.out_h * args.out_w;
  const dim3 blocks(grid_dim(ceil_div(hw, int64_t(kThreads) * kPixelsPerThread), kMaxGridX),
                    grid_dim(args.planes, kMaxGridY));
  if (args.norm == kNormNone) {
    merge_kernel<<<blocks, kThreads, 0, stream>>>(args);
    return launch_status(kOp);
  }
  Scratch scratch;
  const size_t key_bytes = static_cast<size_t>(args.planes) * sizeof(unsigned int);
  int status = scratch_alloc(&scratch, 2 * key_bytes, stream);
  if (status != 0) return status;
  args.lo_key = static_cast<unsigned int*>(scratch.ptr);
  args.hi_key = args.lo_key + args.planes;
  status = cuda_status(cudaMemsetAsync(args.lo_key, 0xff, key_bytes, stream), kOp, "memset");
  if (status == 0) {
    status = cuda_status(cudaMemsetAsync(args.hi_key, 0x00, key_bytes, stream), kOp, "memset");
  }
  if (status == 0) {
    merge_kernel<<<blocks, kThreads, 0, stream>>>(args);
    status = launch_status(kOp);
  }
  if (status == 0) {
    normalize_kernel<<<blocks, kThreads, 0, stream>>>(args.out, args.planes, hw, args.lo_key,
                                                      args.hi_key, args.norm, eps);
    status = launch_status(kOp);
  }
  return scratch_free(&scratch, stream, status);
}

}  // namespace
}  // namespace cuda
}  // namespace wsss_fast

extern "C" int wsss_fast_multiscale_merge(const float* const* maps, const int64_t* heights,
                                          const int64_t* widths, const int* flips, int num_passes,
                                          int64_t batch, int64_t classes,
                                          const float* labels_or_null, float* out, int64_t out_h,
                                          int64_t out_w, int relu, int merge, int norm, float eps,
                                          void* stream) {
  using namespace wsss_fast;
  using namespace wsss_fast::cuda;
  clear_error();
  constexpr int kInvalid = WSSS_FAST_CUDA_ERROR_INVALID_ARGUMENT;
  if (num_passes > WSSS_FAST_CUDA_MAX_PASSES) {
    return set_error(WSSS_FAST_CUDA_ERROR_TOO_MANY_PASSES,
                     "%s: too many passes (%d > %d); merge at most %d passes per call", kOp,
                     num_passes, WSSS_FAST_CUDA_MAX_PASSES, WSSS_FAST_CUDA_MAX_PASSES);
  }
  if (num_passes < 1) {
    return set_error(kInvalid, "%s: num_passes must be >= 1, got %d", kOp, num_passes);
  }
  if (maps == nullptr || heights == nullptr || widths == nullptr || flips == nullptr) {
    return set_error(kInvalid, "%s: the host arrays maps/heights/widths/flips must not be NULL",
                     kOp);
  }
  if (merge != kMergeSum && merge != kMergeMaxFlip) {
    return set_error(kInvalid, "%s: merge must be 0 (sum) or 1 (max_flip), got %d", kOp, merge);
  }
  if (merge == kMergeMaxFlip && num_passes % 2 != 0) {
    return set_error(kInvalid,
                     "%s: merge=max_flip needs (image, flipped image) pairs, got %d passes", kOp,
                     num_passes);
  }
  if (norm < kNormNone || norm > kNormTransCam) {
    return set_error(kInvalid,
                     "%s: norm must be 0 (none), 1 (minmax), 2 (max) or 3 (transcam), got %d",
                     kOp, norm);
  }
  if (batch < 0 || classes < 0 || out_h < 0 || out_w < 0) {
    return set_error(kInvalid, "%s: negative size (batch=%lld, classes=%lld, out=%lldx%lld)", kOp,
                     (long long)batch, (long long)classes, (long long)out_h, (long long)out_w);
  }
  for (int i = 0; i < num_passes; ++i) {
    if (heights[i] < 1 || widths[i] < 1) {
      return set_error(kInvalid, "%s: pass %d has an empty map (%lldx%lld)", kOp, i,
                       (long long)heights[i], (long long)widths[i]);
    }
  }
  if (batch == 0 || classes == 0 || out_h == 0 || out_w == 0) return 0;
  if (out == nullptr) return set_error(kInvalid, "%s: out must not be NULL", kOp);
  MergeArgs args{};
  for (int i = 0; i < num_passes; ++i) {
    if (maps[i] == nullptr) return set_error(kInvalid, "%s: maps[%d] is NULL", kOp, i);
    PassInfo& pass = args.pass[i];
    pass.map = maps[i];
    pass.h = heights[i];
    pass.w = widths[i];
    pass.scale_y = static_cast<float>(heights[i]) / static_cast<float>(out_h);
    pass.scale_x = static_cast<float>(widths[i]) / static_cast<float>(out_w);
    pass.flipped = flips[i] != 0 ? 1 : 0;
  }
  args.num_passes = num_passes;
  args.relu = relu != 0 ? 1 : 0;
  args.merge = merge;
  args.norm = norm;
  args.planes = batch * classes;
  args.out_h = out_h;
  args.out_w = out_w;
  args.labels = labels_or_null;
  args.out = out;
  return run(args, eps, as_stream(stream));
}
