/* wsss_fast CUDA library (libwsss_fast_cuda.so): the C ABI.
 *
 * Plain C ABI over raw device pointers so the library builds with nvcc alone (no torch headers)
 * and is called from Python through ctypes (wsss_fast/ops/_cuda_lib.py). The per-element math is
 * shared with the C++ CPU ops (the headers in csrc/common, DESIGN §3 "one body, two launchers").
 *
 * Conventions for every op:
 *   - Tensors are contiguous, row-major, on the current CUDA device; pointers are device pointers
 *     unless a parameter says "host".
 *   - `dtype` codes: WSSS_FAST_DTYPE_FLOAT32 (0), _FLOAT16 (1), _BFLOAT16 (2). Math is fp32.
 *   - `stream` is a cudaStream_t passed as void* (NULL = the legacy default stream). Kernels are
 *     enqueued on it asynchronously; nothing synchronizes the host (except the multiscale_merge
 *     scratch fallback on devices without stream-ordered allocation).
 *   - Return value: 0 on success; a negative WSSS_FAST_CUDA_ERROR_* code when the arguments are
 *     invalid (checked before any CUDA call is made, so this works without a GPU); otherwise the
 *     positive cudaError_t of the failing CUDA call. wsss_fast_cuda_last_error() then describes
 *     it. Errors of the kernels themselves surface asynchronously, as for any CUDA launch.
 *   - Empty problems (a zero size) succeed without touching the GPU.
 */
#ifndef WSSS_FAST_CUDA_H_
#define WSSS_FAST_CUDA_H_

#include <stdint.h>

#include "common/abi.h" /* ABI version, dtype codes, WSSS_FAST_CUDA_MAX_PASSES */

#define WSSS_FAST_CUDA_ERROR_INVALID_ARGUMENT (-1)
#define WSSS_FAST_CUDA_ERROR_UNSUPPORTED_DTYPE (-2)
#define WSSS_FAST_CUDA_ERROR_TOO_MANY_PASSES (-3)

#ifdef __cplusplus
extern "C" {
#endif

/* WSSS_FAST_CUDA_ABI_VERSION of the build; the Python side refuses a library reporting another. */
int wsss_fast_cuda_abi_version(void);

/* WSSS_FAST_CUDA_MAX_PASSES of the build (the Python side asks the library, not a copy). */
int wsss_fast_cuda_max_passes(void);

/* 0 when this library's CUDA runtime finds a device and a kernel image for the current device;
 * else the cudaError_t (e.g. an insufficient driver for the CUDA version the library was built
 * with, or a GPU architecture it was not built for), with a message. Initializes CUDA. */
int wsss_fast_cuda_probe(void);

/* Message of the last failed call on this thread ("" when the last call succeeded). The storage
 * is thread-local and stays valid until the next call on the same thread. */
const char* wsss_fast_cuda_last_error(void);

/* phi_gamma row re-weighting (DESIGN §3.2), see class_patch_reweight_reference.
 * attn, patchcam_or_null, out: (rows, cols) of `dtype`. Per row, on relu(a):
 *   out = (sum a) * (a/max)^gamma / sum (a/max)^gamma  [* relu(patchcam)]  [then sqrt if take_sqrt]
 * and 0 for a row whose powered sum is 0. gamma must be finite and > 0. */
int wsss_fast_class_patch_reweight(const void* attn, const void* patchcam_or_null, void* out,
                                   int64_t rows, int64_t cols, int dtype, float gamma,
                                   int take_sqrt, void* stream);

/* out[b] = affinity[b] @ cam[b] (DESIGN §3.3) with fp32 accumulation.
 * affinity: (batch, p, p), cam and out: (batch, p, k), all of `dtype`. */
int wsss_fast_propagate(const void* affinity, const void* cam, void* out, int64_t batch,
                        int64_t p, int64_t k, int dtype, void* stream);

/* Multi-scale merge (DESIGN §3.4), see multiscale_merge_reference.
 * maps, heights, widths, flips: HOST arrays of num_passes (1..WSSS_FAST_CUDA_MAX_PASSES) entries;
 *   maps[i] is a device pointer to a contiguous fp32 (batch, classes, heights[i], widths[i]) map,
 *   flips[i] != 0 when pass i ran on the horizontally flipped image.
 * labels_or_null: device fp32 (batch, classes) multiplied into the merged map, or NULL.
 * out: device fp32 (batch, classes, out_h, out_w).
 * relu: ReLU each resized pass. merge: 0 = sum, 1 = max_flip (max within consecutive
 *   (unflipped, flipped) pairs, sum over pairs; num_passes must be even).
 * norm: 0 none, 1 minmax, 2 max, 3 transcam (per (b, k) plane), with `eps`.
 * Uses 8 * batch * classes bytes of stream-ordered scratch when norm != 0. */
int wsss_fast_multiscale_merge(const float* const* maps, const int64_t* heights,
                               const int64_t* widths, const int* flips, int num_passes,
                               int64_t batch, int64_t classes, const float* labels_or_null,
                               float* out, int64_t out_h, int64_t out_w, int relu, int merge,
                               int norm, float eps, void* stream);

/* Affinity random walk (DESIGN §3.5), see random_walk_reference: out = x0 @ T^steps per batch
 * item, T = A / colsum(A), A = I + W + Wᵀ over the half-disk pair offsets of `radius` (2..64;
 * O = 34 offsets for 5), never forming T.
 * x0, out: (batch, classes, h, w) of `dtype`; weights: fp32 (batch, O, h, w), non-negative.
 * workspace: device scratch of at least wsss_fast_random_walk_workspace_bytes(...) bytes (the
 *   tap table and two zero-padded fp32 buffers), used in stream order; workspace_size: its size.
 * steps >= 1: one kernel launch per step. */
int wsss_fast_random_walk(const void* x0, const float* weights, void* out, void* workspace,
                          int64_t workspace_size, int64_t batch, int64_t classes, int64_t h,
                          int64_t w, int radius, int64_t steps, int dtype, void* stream);

/* Bytes of workspace wsss_fast_random_walk needs for these sizes; -1 (with a message) when the
 * sizes or the radius are invalid. */
int64_t wsss_fast_random_walk_workspace_bytes(int64_t batch, int64_t classes, int64_t h,
                                              int64_t w, int radius);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* WSSS_FAST_CUDA_H_ */
