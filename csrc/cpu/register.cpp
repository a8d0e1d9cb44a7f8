// Schemas of the C++ CPU ops, in one place (implementations: one file per op, beside this one).
// Reached from Python as torch.ops.wsss_fast_C.<name>; the public, validated entry points are
// in wsss_fast/ops/.
#include <torch/library.h>

#include "common/macros.h"

TORCH_LIBRARY(wsss_fast_C, m) {
  m.def("abi_version() -> int", []() -> int64_t { return WSSS_FAST_CPU_ABI_VERSION; });
  m.def(
      "attention_stats(Tensor q, Tensor k, Tensor v, float scale, int num_cls, "
      "Tensor(a!)? cls2patch, float cls2patch_weight, Tensor(b!)? patch2patch, "
      "float patch2patch_weight, Tensor(c!)? cls_row, float cls_row_weight) -> Tensor");
  m.def("class_patch_reweight(Tensor attn, float gamma, Tensor? patchcam, bool sqrt) -> Tensor");
  m.def("propagate(Tensor affinity, Tensor cam) -> Tensor");
  m.def(
      "propagate_streaming(Tensor q, Tensor k, Tensor cam, float scale, int num_cls, "
      "float[] weights) -> Tensor");
  m.def(
      "multiscale_merge(Tensor[] maps, int[] flips, int out_h, int out_w, bool relu, "
      "Tensor? labels, str merge, str norm, float eps) -> Tensor");
  m.def("random_walk(Tensor x0, Tensor weights, int steps, int radius) -> Tensor");
  m.def(
      "path_affinity(Tensor boundary, Tensor cells, Tensor start, int floor) -> "
      "(Tensor, Tensor)");
  m.def(
      "path_affinity_backward(Tensor grad, Tensor argmax, Tensor cells, Tensor start, int h, "
      "int w, int floor) -> Tensor");
  m.def(
      "kmeans(Tensor features, Tensor init, int max_iter, float tol) -> "
      "(Tensor, Tensor, Tensor)");
}
