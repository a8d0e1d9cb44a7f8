// Shared by the C++ CPU ops and the CUDA kernels ("one body, two launchers", DESIGN §3):
// per-element / per-tile math is written once as inline functions marked WSSS_HD.
#pragma once

#if defined(__CUDACC__)
#define WSSS_HD __host__ __device__ __forceinline__
#else
#define WSSS_HD inline
#endif

#include "common/abi.h"  // ABI versions and limits shared with Python
