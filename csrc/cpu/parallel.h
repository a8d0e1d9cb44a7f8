// at::parallel_for with the caller's thread-local state (grad mode, InferenceMode, dispatch
// keys) in every worker. at::parallel_for's OpenMP workers start with default state, so ATen
// calls inside a chunk on tensors made under torch.inference_mode() fail ("Inplace update to
// inference tensor outside InferenceMode"); every cpu op parallelizes through this instead.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <cstdint>

namespace wsss_fast {

template <typename F>
inline void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& body) {
  const at::ThreadLocalState state;
  at::parallel_for(begin, end, grain, [&](int64_t chunk_begin, int64_t chunk_end) {
    const at::ThreadLocalStateGuard guard(state);
    body(chunk_begin, chunk_end);
  });
}

}  // namespace wsss_fast
