// The op schemas, in one place. Implementations register per dispatch key in pka_cpu.cpp and
// pka_cuda.cu; fake (meta) implementations and autograd are registered from Python (pka_ext/ops.py).
#include <Python.h>
#include <torch/library.h>

// Importing pka_ext._C runs the static registrations below; the module itself exports nothing, so a
// bare PyInit avoids a pybind11 dependency.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(pka_ext, m) {
  // Whether this build carries the CUDA implementation (setup.py defines PKA_WITH_CUDA).
  m.def("built_with_cuda() -> bool", [] {
#ifdef PKA_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
  // out: [B, H, T, d]; lse: [B, H, T], float32 (float64 for float64 inputs), 0 on empty rows.
  m.def(
      "pka_fwd(Tensor q, Tensor k, Tensor v, Tensor a_k, Tensor a_v, Tensor? lengths, "
      "float scale, float dropout_p, Tensor? seed) -> (Tensor, Tensor)");
  // Returns (dq, dk, dv, da_k, da_v); da_k / da_v have the shapes of a_k / a_v, upper triangle 0.
  m.def(
      "pka_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor a_k, Tensor a_v, "
      "Tensor? lengths, Tensor out, Tensor lse, float scale, float dropout_p, Tensor? seed) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}
