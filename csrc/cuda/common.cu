// ABI version, limits and the thread-local last-error message of the CUDA library.
#include <stdarg.h>
#include <stdio.h>

#include "cuda/cuda_common.cuh"

namespace wsss_fast {
namespace cuda {
namespace {
thread_local char g_last_error[1024] = "";
}  // namespace

void clear_error() { g_last_error[0] = '\0'; }

int set_error(int code, const char* format, ...) {
  va_list args;
  va_start(args, format);
  vsnprintf(g_last_error, sizeof(g_last_error), format, args);
  va_end(args);
  return code;
}

int cuda_status(cudaError_t err, const char* op, const char* what) {
  if (err == cudaSuccess) return 0;
  return set_error(static_cast<int>(err), "%s: %s failed: %s (%s, cudaError_t %d)", op, what,
                   cudaGetErrorString(err), cudaGetErrorName(err), static_cast<int>(err));
}

}  // namespace cuda
}  // namespace wsss_fast

extern "C" int wsss_fast_cuda_abi_version(void) { return WSSS_FAST_CUDA_ABI_VERSION; }

extern "C" int wsss_fast_cuda_max_passes(void) { return WSSS_FAST_CUDA_MAX_PASSES; }

namespace {
__global__ void probe_kernel() {}
}  // namespace

extern "C" int wsss_fast_cuda_probe(void) {
  using namespace wsss_fast::cuda;
  constexpr const char* kOp = "wsss_fast_cuda_probe";
  clear_error();
  int count = 0;
  int status = cuda_status(cudaGetDeviceCount(&count), kOp, "cudaGetDeviceCount");
  if (status != 0) return status;
  if (count == 0) {
    return set_error(static_cast<int>(cudaErrorNoDevice), "%s: no CUDA device found", kOp);
  }
  cudaFuncAttributes attributes;
  return cuda_status(cudaFuncGetAttributes(&attributes, probe_kernel), kOp,
                     "looking up a kernel image for the current device (is the library built "
                     "for this GPU architecture?)");
}

extern "C" const char* wsss_fast_cuda_last_error(void) { return wsss_fast::cuda::g_last_error; }
