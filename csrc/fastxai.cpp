// fastxai._C: every operator schema of the fastxai namespace, declared once.
//
// Kernels register per backend in csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu. This file also makes
// the shared library importable as the Python module fastxai._C; importing it runs the static
// registrations below, which is all the module exists for.

#include <Python.h>

#include <torch/library.h>

extern "C" {

// A module with no methods: `from fastxai import _C` loads the library and its registrations.
PyObject* PyInit__C(void) {
  static struct PyModuleDef fastxai_c_module = {
      PyModuleDef_HEAD_INIT,
      "fastxai._C",
      "Registers the torch.ops.fastxai operators.",
      -1,
      nullptr,
  };
  return PyModule_Create(&fastxai_c_module);
}

}  // extern "C"

TORCH_LIBRARY(fastxai, m) {
  m.def("scale_maps(Tensor raw, int height, int width) -> Tensor", {at::Tag::pt2_compliant_tag});
  // Several layers' raw maps upsampled to (height, width) and fused; fusion is "mean" | "tanh".
  m.def(
      "fuse_maps(Tensor[] raws, int height, int width, str fusion) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  m.def("layercam(Tensor gradient, Tensor activation) -> Tensor", {at::Tag::pt2_compliant_tag});
  m.def(
      "layercam_backward(Tensor grad_map, Tensor gradient, Tensor activation, Tensor map) -> "
      "(Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  m.def("mask_priors(Tensor p, int neighbours=4) -> Tensor", {at::Tag::pt2_compliant_tag});
  m.def(
      "mask_priors_backward(Tensor grad_terms, Tensor p, int neighbours) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  // TFT: the masked batch (N * T, C, H, W) of a threshold ladder, from the raw CAM (tft_ladder,
  // which also returns the upsampled map) or from input-resolution maps (tft_mask);
  // threshold_mode is "value" | "percentile", mask_kind "binary" | "soft". (An argument named
  // `mode` collides with torch.compile's dispatch-mode redirection.)
  m.def(
      "tft_ladder(Tensor raw, Tensor images, Tensor thresholds, str threshold_mode, "
      "str mask_kind) -> (Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "tft_ladder_out(Tensor raw, Tensor images, Tensor thresholds, str threshold_mode, "
      "str mask_kind, Tensor(a!) out) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "tft_mask(Tensor maps, Tensor images, Tensor thresholds, str threshold_mode, "
      "str mask_kind) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  // TFT epilogue: RPI curve (N, T), the selected threshold per image (-1: none) and the class
  // probability of every ladder row (N, T).
  m.def(
      "rpi_select(Tensor logits, Tensor classes, Tensor original) -> (Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
}
