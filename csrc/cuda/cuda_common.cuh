// Launch-side helpers shared by the .cu files of the CUDA library (not part of the C ABI):
// error reporting, dtype dispatch and conversions, warp/block reductions. No torch headers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "cuda/wsss_fast_cuda.h"

namespace wsss_fast {
namespace cuda {

// Thread-local message storage (common.cu). `set_error` formats like printf and returns `code`.
void clear_error();
int set_error(int code, const char* format, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;

// Status of a CUDA runtime call: 0, or its cudaError_t with a message naming `what`.
int cuda_status(cudaError_t err, const char* op, const char* what);

// After a launch: the launch error, if any (non-sticky errors are cleared).
inline int launch_status(const char* op) { return cuda_status(cudaGetLastError(), op, "launch"); }

inline const char* dtype_name(int dtype) {
  switch (dtype) {
    case WSSS_FAST_DTYPE_FLOAT32: return "float32";
    case WSSS_FAST_DTYPE_FLOAT16: return "float16";
    case WSSS_FAST_DTYPE_BFLOAT16: return "bfloat16";
    default: return "unknown";
  }
}

inline bool valid_dtype(int dtype) {
  return dtype == WSSS_FAST_DTYPE_FLOAT32 || dtype == WSSS_FAST_DTYPE_FLOAT16 ||
         dtype == WSSS_FAST_DTYPE_BFLOAT16;
}

// 0 for a supported dtype code, else the error code with the message set for `op`.
inline int check_dtype(const char* op, int dtype) {
  if (valid_dtype(dtype)) return 0;
  return set_error(WSSS_FAST_CUDA_ERROR_UNSUPPORTED_DTYPE,
                   "%s: unsupported dtype code %d (expected 0 = float32, 1 = float16, "
                   "2 = bfloat16)", op, dtype);
}

inline cudaStream_t as_stream(void* stream) { return reinterpret_cast<cudaStream_t>(stream); }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline unsigned int grid_dim(int64_t blocks, int64_t limit) {
  if (blocks < 1) blocks = 1;
  return static_cast<unsigned int>(blocks < limit ? blocks : limit);
}

// Loads and stores in fp32.
template <typename T>
__device__ __forceinline__ float load_float(const T* p);
template <>
__device__ __forceinline__ float load_float<float>(const float* p) { return __ldg(p); }
template <>
__device__ __forceinline__ float load_float<__half>(const __half* p) { return __half2float(__ldg(p)); }
template <>
__device__ __forceinline__ float load_float<__nv_bfloat16>(const __nv_bfloat16* p) {
  return __bfloat162float(__ldg(p));
}

template <typename T>
__device__ __forceinline__ void store_float(T* p, float v);
template <>
__device__ __forceinline__ void store_float<float>(float* p, float v) { *p = v; }
template <>
__device__ __forceinline__ void store_float<__half>(__half* p, float v) { *p = __float2half_rn(v); }
template <>
__device__ __forceinline__ void store_float<__nv_bfloat16>(__nv_bfloat16* p, float v) {
  *p = __float2bfloat16_rn(v);
}

struct SumOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};
struct MaxOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
struct MinOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return fminf(a, b); }
};

// Every lane ends with the reduction over the full warp (all 32 lanes must be active).
template <typename Op>
__device__ __forceinline__ float warp_allreduce(float v, Op op) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// Every thread of the block ends with the reduction over the block. blockDim.x must be a multiple
// of 32 (at most 1024), blockDim.y == blockDim.z == 1, and every thread must call it. `shared`
// holds 32 floats; it may be reused by the next call (the leading barrier protects it).
template <typename Op>
__device__ __forceinline__ float block_allreduce(float v, float* shared, Op op, float identity) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int num_warps = blockDim.x >> 5;
  v = warp_allreduce(v, op);
  __syncthreads();  // earlier readers of `shared` are done
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = lane < num_warps ? shared[lane] : identity;
  return warp_allreduce(v, op);
}

}  // namespace cuda
}  // namespace wsss_fast
