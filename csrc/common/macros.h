// Shared by the C++ CPU ops and the CUDA kernels ("one body, two launchers", DESIGN §3):
// per-element / per-tile math is written once as inline functions marked WSSS_HD.
#pragma once

#if defined(__CUDACC__)
#define WSSS_HD __host__ __device__ __forceinline__
#else
#define WSSS_HD inline
#endif

// Bumped with the op schemas; the Python side refuses a stale build (wsss_fast/ops/_backend.py).
#define WSSS_FAST_CPU_ABI_VERSION 3
#define WSSS_FAST_CUDA_ABI_VERSION 2
