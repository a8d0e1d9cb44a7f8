// propagate launcher: out[b] = affinity[b] (p x p) @ cam[b] (p x k), shared-memory tiled GEMM
// with fp32 accumulation. Each 32x8 block computes a 32x32 output tile (4 rows per thread).
#include "cuda/cuda_common.cuh"

namespace wsss_fast {
namespace cuda {
namespace {

constexpr const char* kOp = "wsss_fast_propagate";
constexpr int kTile = 32;                    // output tile is kTile x kTile, reduction step kTile
constexpr int kThreadRows = 8;               // blockDim = (kTile, kThreadRows)
constexpr int kRowsPerThread = kTile / kThreadRows;

template <typename T>
__global__ void __launch_bounds__(kTile * kThreadRows)
    propagate_kernel(const T* __restrict__ affinity, const T* __restrict__ cam,
                     T* __restrict__ out, int64_t batch, int64_t p, int64_t k) {
  __shared__ float a_tile[kTile][kTile + 1];  // [row][inner]
  __shared__ float c_tile[kTile][kTile + 1];  // [inner][col]
  const int tx = threadIdx.x;
  const int ty = threadIdx.y;
  const int64_t row0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kTile + tx;
  for (int64_t b = blockIdx.z; b < batch; b += gridDim.z) {
    const T* a = affinity + b * p * p;
    const T* c = cam + b * p * k;
    float acc[kRowsPerThread];
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) acc[i] = 0.f;
    for (int64_t t0 = 0; t0 < p; t0 += kTile) {
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i) {
        const int r = ty + i * kThreadRows;
        const int64_t a_row = row0 + r;
        const int64_t inner = t0 + tx;
        a_tile[r][tx] = (a_row < p && inner < p) ? load_float(a + a_row * p + inner) : 0.f;
        const int64_t c_row = t0 + r;
        c_tile[r][tx] = (c_row < p && col < k) ? load_float(c + c_row * k + col) : 0.f;
      }
      __syncthreads();
#pragma unroll
      for (int t = 0; t < kTile; ++t) {
        const float cv = c_tile[t][tx];
#pragma unroll
        for (int i = 0; i < kRowsPerThread; ++i) {
          acc[i] = fmaf(a_tile[ty + i * kThreadRows][t], cv, acc[i]);
        }
      }
      __syncthreads();
    }
    if (col < k) {
      T* o = out + b * p * k;
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i) {
        const int64_t r = row0 + ty + i * kThreadRows;
        if (r < p) store_float(o + r * k + col, acc[i]);
      }
    }
  }
}

template <typename T>
int launch(const void* affinity, const void* cam, void* out, int64_t batch, int64_t p, int64_t k,
           cudaStream_t stream) {
  const dim3 threads(kTile, kThreadRows);
  const dim3 blocks(grid_dim(ceil_div(k, kTile), 1 << 30), grid_dim(ceil_div(p, kTile), 65535),
                    grid_dim(batch, 65535));
  propagate_kernel<T><<<blocks, threads, 0, stream>>>(static_cast<const T*>(affinity),
                                                      static_cast<const T*>(cam),
                                                      static_cast<T*>(out), batch, p, k);
  return launch_status(kOp);
}

}  // namespace
}  // namespace cuda
}  // namespace wsss_fast

extern "C" int wsss_fast_propagate(const void* affinity, const void* cam, void* out,
                                   int64_t batch, int64_t p, int64_t k, int dtype, void* stream) {
  using namespace wsss_fast::cuda;
  clear_error();
  if (const int status = check_dtype(kOp, dtype)) return status;
  if (batch < 0 || p < 0 || k < 0) {
    return set_error(WSSS_FAST_CUDA_ERROR_INVALID_ARGUMENT,
                     "%s: negative size (batch=%lld, p=%lld, k=%lld)", kOp, (long long)batch,
                     (long long)p, (long long)k);
  }
  if (ceil_div(p, kTile) > 65535) {
    return set_error(WSSS_FAST_CUDA_ERROR_INVALID_ARGUMENT, "%s: p=%lld is too large (at most %d)",
                     kOp, (long long)p, 65535 * kTile);
  }
  if (batch == 0 || p == 0 || k == 0) return 0;
  if (affinity == nullptr || cam == nullptr || out == nullptr) {
    return set_error(WSSS_FAST_CUDA_ERROR_INVALID_ARGUMENT,
                     "%s: affinity, cam and out must not be NULL", kOp);
  }
  const cudaStream_t s = as_stream(stream);
  switch (dtype) {
    case WSSS_FAST_DTYPE_FLOAT16:
      return launch<__half>(affinity, cam, out, batch, p, k, s);
    case WSSS_FAST_DTYPE_BFLOAT16:
      return launch<__nv_bfloat16>(affinity, cam, out, batch, p, k, s);
    default:
      return launch<float>(affinity, cam, out, batch, p, k, s);
  }
}
