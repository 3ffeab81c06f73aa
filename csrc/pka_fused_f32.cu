// The fused kernels for float32: their launches, instantiated here (pka_fused_typed.cuh).
#include "pka_fused_typed.cuh"

PKA_FUSED_INSTANTIATE(float)
