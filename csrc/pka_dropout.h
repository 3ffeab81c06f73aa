// Counter-based dropout mask shared by the CPU kernel, the CUDA kernels and python_ref.
//
// The keep/drop decision for attention probability P[b, h, i, j] is a pure function of
// (seed, b, h, i, j), so the backward pass regenerates the forward's mask instead of storing it,
// and every backend produces bit-identical masks for the same seed.
//
// Generator: the MurmurHash3 32-bit finaliser `fmix32` (a bijection on uint32 with full avalanche)
// chained over the fields:
//   x = fmix32(lo32(seed) ^ 0x9E3779B9); x = fmix32(x ^ hi32(seed));
//   x = fmix32(x ^ b); x = fmix32(x ^ h); x = fmix32(x ^ i);      // the "row key", once per query row
//   u = fmix32(x ^ j) >> 8                                         // 24 uniform bits
//   keep  <=>  u >= floor(dropout_p * 2^24)
// b, h, i, j are absolute indices (i, j count from 0 at the left edge of the padded sequence).
// The integer threshold makes the decision exact on every device: no float rounding is involved.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define PKA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define PKA_HOST_DEVICE inline
#endif

namespace pka {

PKA_HOST_DEVICE uint32_t fmix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x85ebca6bu;
  x ^= x >> 13;
  x *= 0xc2b2ae35u;
  x ^= x >> 16;
  return x;
}

PKA_HOST_DEVICE uint32_t dropout_row_key(uint64_t seed, uint32_t b, uint32_t h, uint32_t i) {
  uint32_t x = fmix32(static_cast<uint32_t>(seed) ^ 0x9E3779B9u);
  x = fmix32(x ^ static_cast<uint32_t>(seed >> 32));
  x = fmix32(x ^ b);
  x = fmix32(x ^ h);
  return fmix32(x ^ i);
}

PKA_HOST_DEVICE bool dropout_keep(uint32_t row_key, uint32_t j, uint32_t threshold) {
  return (fmix32(row_key ^ j) >> 8) >= threshold;
}

// floor(p * 2^24), for 0 <= p < 1. Computed on the host in double, as python_ref does.
inline uint32_t dropout_threshold(double p) {
  return static_cast<uint32_t>(std::floor(p * 16777216.0));
}

}  // namespace pka
