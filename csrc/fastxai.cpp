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
}
