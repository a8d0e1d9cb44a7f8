// random_walk launcher (DESIGN §3.5) around the shared bodies of csrc/common/random_walk.h.
// The caller's workspace holds the tap table and two zero-padded fp32 ping-pong buffers:
//   1. taps kernel: one thread per (batch item, pixel) writes its 2·O normalized taps;
//   2. the buffers are zeroed (their halo stays 0) and x0 is copied into the first interior;
//   3. `steps` launches of the step kernel, one thread per (plane, pixel), alternate buffers;
//   4. the last buffer's interior is converted to the output dtype.
#include "common/random_walk.h"
#include "cuda/cuda_common.cuh"

namespace wsss_fast {
namespace cuda {
namespace {

constexpr const char* kOp = "wsss_fast_random_walk";
constexpr int kThreads = 256;
constexpr int64_t kMaxGridY = 65535;
constexpr int64_t kMaxGridX = int64_t(1) << 30;

struct Geometry {
  int64_t batch, classes, h, w, n;
  int radius, offsets;
  int64_t taps, pad, pitch, plane_size;  // padded plane: (h + 2 pad) × pitch
};

Geometry make_geometry(int64_t batch, int64_t classes, int64_t h, int64_t w, int radius) {
  Geometry g;
  g.batch = batch;
  g.classes = classes;
  g.h = h;
  g.w = w;
  g.n = h * w;
  g.radius = radius;
  g.offsets = half_disk_size(radius);
  g.taps = 2 * g.offsets;
  g.pad = radius - 1;
  g.pitch = w + 2 * g.pad;
  g.plane_size = (h + 2 * g.pad) * g.pitch;
  return g;
}

int64_t table_floats(const Geometry& g) { return g.batch * g.taps * g.n; }
int64_t buffer_floats(const Geometry& g) { return g.batch * g.classes * g.plane_size; }
int64_t workspace_bytes(const Geometry& g) {
  return (table_floats(g) + 2 * buffer_floats(g)) * static_cast<int64_t>(sizeof(float));
}

__device__ __forceinline__ int64_t interior(const Geometry& g, int64_t plane, int64_t pixel) {
  return plane * g.plane_size + (pixel / g.w + g.pad) * g.pitch + pixel % g.w + g.pad;
}

__global__ void __launch_bounds__(kThreads)
    taps_kernel(const float* __restrict__ weights, float* __restrict__ coeff, Geometry g) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t b = blockIdx.y; b < g.batch; b += gridDim.y) {
    for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < g.n;
         p += stride) {
      walk_pixel_taps(weights + b * g.offsets * g.n, g.h, g.w, g.radius, g.offsets, p / g.w,
                      p % g.w, coeff + b * g.taps * g.n + p, g.n);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    load_kernel(const T* __restrict__ x0, float* __restrict__ buffer, Geometry g) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t plane = blockIdx.y; plane < g.batch * g.classes; plane += gridDim.y) {
    for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < g.n;
         p += stride) {
      buffer[interior(g, plane, p)] = load_float(x0 + plane * g.n + p);
    }
  }
}

__global__ void __launch_bounds__(kThreads)
    step_kernel(const float* __restrict__ coeff, const float* __restrict__ src,
                float* __restrict__ dst, Geometry g) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t plane = blockIdx.y; plane < g.batch * g.classes; plane += gridDim.y) {
    const float* table = coeff + (plane / g.classes) * g.taps * g.n;
    for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < g.n;
         p += stride) {
      const int64_t at = interior(g, plane, p);
      float value;
      walk_run_step(table + p, g.n, src + at, g.pitch, g.radius, g.offsets, 1, &value);
      dst[at] = value;
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    store_kernel(const float* __restrict__ buffer, T* __restrict__ out, Geometry g) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t plane = blockIdx.y; plane < g.batch * g.classes; plane += gridDim.y) {
    for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < g.n;
         p += stride) {
      store_float(out + plane * g.n + p, buffer[interior(g, plane, p)]);
    }
  }
}

template <typename T>
int run(const void* x0, const float* weights, void* out, float* workspace, const Geometry& g,
        int64_t steps, cudaStream_t stream) {
  float* coeff = workspace;
  float* buffers[2] = {coeff + table_floats(g), coeff + table_floats(g) + buffer_floats(g)};
  const dim3 pixel_blocks(grid_dim(ceil_div(g.n, kThreads), kMaxGridX),
                          grid_dim(g.batch, kMaxGridY));
  const dim3 plane_blocks(grid_dim(ceil_div(g.n, kThreads), kMaxGridX),
                          grid_dim(g.batch * g.classes, kMaxGridY));
  taps_kernel<<<pixel_blocks, kThreads, 0, stream>>>(weights, coeff, g);
  int status = launch_status(kOp);
  if (status != 0) return status;
  status = cuda_status(cudaMemsetAsync(buffers[0], 0, 2 * buffer_floats(g) * sizeof(float),
                                       stream), kOp, "zeroing the buffers");
  if (status != 0) return status;
  load_kernel<T><<<plane_blocks, kThreads, 0, stream>>>(static_cast<const T*>(x0), buffers[0],
                                                        g);
  if ((status = launch_status(kOp)) != 0) return status;
  for (int64_t step = 0; step < steps; ++step) {
    step_kernel<<<plane_blocks, kThreads, 0, stream>>>(coeff, buffers[step % 2],
                                                       buffers[(step + 1) % 2], g);
    if ((status = launch_status(kOp)) != 0) return status;
  }
  store_kernel<T><<<plane_blocks, kThreads, 0, stream>>>(buffers[steps % 2], static_cast<T*>(out),
                                                         g);
  return launch_status(kOp);
}

// 0 when the sizes are valid, else the error code with the message set.
int check_sizes(int64_t batch, int64_t classes, int64_t h, int64_t w, int radius) {
  if (radius < 2 || radius > 64) {
    return set_error(WSSS_FAST_CUDA_ERROR_INVALID_ARGUMENT, "%s: radius must be in [2, 64], got %d",
                     kOp, radius);
  }
  if (batch < 0 || classes < 0 || h < 0 || w < 0) {
    return set_error(WSSS_FAST_CUDA_ERROR_INVALID_ARGUMENT,
                     "%s: negative size (batch=%lld, classes=%lld, h=%lld, w=%lld)", kOp,
                     (long long)batch, (long long)classes, (long long)h, (long long)w);
  }
  return 0;
}

}  // namespace
}  // namespace cuda
}  // namespace wsss_fast

extern "C" int64_t wsss_fast_random_walk_workspace_bytes(int64_t batch, int64_t classes,
                                                         int64_t h, int64_t w, int radius) {
  using namespace wsss_fast::cuda;
  clear_error();
  if (check_sizes(batch, classes, h, w, radius) != 0) return -1;
  return workspace_bytes(make_geometry(batch, classes, h, w, radius));
}

extern "C" int wsss_fast_random_walk(const void* x0, const float* weights, void* out,
                                     void* workspace, int64_t workspace_size, int64_t batch,
                                     int64_t classes, int64_t h, int64_t w, int radius,
                                     int64_t steps, int dtype, void* stream) {
  using namespace wsss_fast::cuda;
  clear_error();
  if (const int status = check_dtype(kOp, dtype)) return status;
  if (const int status = check_sizes(batch, classes, h, w, radius)) return status;
  if (steps < 1) {
    return set_error(WSSS_FAST_CUDA_ERROR_INVALID_ARGUMENT, "%s: steps must be >= 1, got %lld",
                     kOp, (long long)steps);
  }
  if (batch == 0 || classes == 0 || h == 0 || w == 0) return 0;
  const Geometry g = make_geometry(batch, classes, h, w, radius);
  if (workspace_size < workspace_bytes(g)) {
    return set_error(WSSS_FAST_CUDA_ERROR_INVALID_ARGUMENT,
                     "%s: workspace of %lld bytes is too small (%lld needed, see "
                     "wsss_fast_random_walk_workspace_bytes)", kOp, (long long)workspace_size,
                     (long long)workspace_bytes(g));
  }
  if (x0 == nullptr || weights == nullptr || out == nullptr || workspace == nullptr) {
    return set_error(WSSS_FAST_CUDA_ERROR_INVALID_ARGUMENT,
                     "%s: x0, weights, out and workspace must not be NULL", kOp);
  }
  float* scratch = static_cast<float*>(workspace);
  const cudaStream_t s = as_stream(stream);
  switch (dtype) {
    case WSSS_FAST_DTYPE_FLOAT16:
      return run<__half>(x0, weights, out, scratch, g, steps, s);
    case WSSS_FAST_DTYPE_BFLOAT16:
      return run<__nv_bfloat16>(x0, weights, out, scratch, g, steps, s);
    default:
      return run<float>(x0, weights, out, scratch, g, steps, s);
  }
}
