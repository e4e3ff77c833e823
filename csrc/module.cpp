// Python module init of spvit_kernels._C (the pytorch/extension-cpp pattern).
//
// The extension is built against the stable Python ABI (py_limited_api), so it must not use pybind11. Importing
// `spvit_kernels._C` loads this shared object; the static TORCH_LIBRARY_FRAGMENT / TORCH_LIBRARY_IMPL initialisers
// of every csrc/*.cpp and csrc/cuda/*.cu file then register the ops under torch.ops.spvit.*.
// Keep exactly one PyInit__C in the extension (here): the per-op files only register ops, each with
// TORCH_LIBRARY_FRAGMENT(spvit, m) so that no file owns the namespace.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      "spvit C++/CUDA ops; they are registered under torch.ops.spvit when this module is imported",
      -1,    // no per-interpreter state
      nullptr,
  };
  return PyModule_Create(&module_def);
}
}
