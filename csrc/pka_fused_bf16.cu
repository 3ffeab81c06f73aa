// The fused kernels for bfloat16: their launches, instantiated here (pka_fused_typed.cuh).
#include "pka_fused_typed.cuh"

PKA_FUSED_INSTANTIATE(__nv_bfloat16)
