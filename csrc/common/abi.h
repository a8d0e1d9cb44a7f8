/* The numbers Python and the built code must agree on, in one place. wsss_fast/ops/_abi.py reads
 * this file (only `#define WSSS_FAST_<NAME> <integer>` lines count), so Python never keeps a copy.
 * Plain C: included by the C++ extension and by the nvcc-only CUDA library. */
#ifndef WSSS_FAST_ABI_H_
#define WSSS_FAST_ABI_H_

/* Bumped with the op schemas / the exported C functions; a build reporting another is stale. */
#define WSSS_FAST_CPU_ABI_VERSION 4
#define WSSS_FAST_CUDA_ABI_VERSION 3

/* The most passes one wsss_fast_multiscale_merge call takes (the per-pass table is a kernel
 * parameter); the cuda face declines more (the op falls back to another face). */
#define WSSS_FAST_CUDA_MAX_PASSES 32

/* dtype codes of the CUDA C ABI. */
#define WSSS_FAST_DTYPE_FLOAT32 0
#define WSSS_FAST_DTYPE_FLOAT16 1
#define WSSS_FAST_DTYPE_BFLOAT16 2

/* multiscale_merge's merge and norm codes (CPU and CUDA). */
#define WSSS_FAST_MERGE_SUM 0
#define WSSS_FAST_MERGE_MAX_FLIP 1
#define WSSS_FAST_NORM_NONE 0
#define WSSS_FAST_NORM_MINMAX 1
#define WSSS_FAST_NORM_MAX 2
#define WSSS_FAST_NORM_TRANSCAM 3

#endif  // WSSS_FAST_ABI_H_
