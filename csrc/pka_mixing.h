// Whole-batch mixing products on ATen tensors for the unfused CUDA path: time-major layouts, so that
// a shared kernel mixes every (batch, head) in one GEMM.
#pragma once

#include <torch/types.h>

#include "pka_checks.h"

namespace pka {

// Time-major layout for the mixing products. For a kernel with Hk heads (1: shared, H: per head)
// x [B, H, T, D] becomes [Hk, T, N] with N = B*H*D (Hk = 1) or B*D (Hk = H), so that one batched
// GEMM with [Hk, T, T] mixes every (batch, head) at once without expanding the kernel over B.
inline at::Tensor time_major(const at::Tensor& x, const Dims& d, int64_t Hk) {
  if (Hk == 1) return x.permute({2, 0, 1, 3}).reshape({1, d.T, d.B * d.H * d.D});
  return x.permute({1, 2, 0, 3}).reshape({d.H, d.T, d.B * d.D});
}

// Inverse of time_major for a contiguous [Hk, T, N]; returns a contiguous [B, H, T, D].
inline at::Tensor from_time_major(const at::Tensor& y, const Dims& d, int64_t Hk) {
  if (Hk == 1) return y.view({d.T, d.B, d.H, d.D}).permute({1, 2, 0, 3}).contiguous();
  return y.view({d.H, d.T, d.B, d.D}).permute({2, 0, 1, 3}).contiguous();
}

// A x per (batch, head) with A = tril_heads(a) of shape [Hk, T, T] (use A^T for the transpose).
inline at::Tensor mix(const at::Tensor& A, const at::Tensor& x, const Dims& d) {
  const int64_t Hk = A.size(0);
  return from_time_major(at::bmm(A, time_major(x, d, Hk)), d, Hk);
}

// tril(sum over batch, and over heads when Hk = 1, of g x^T), in the shape of `a`.
inline at::Tensor kernel_grad(const at::Tensor& g, const at::Tensor& x, const at::Tensor& a,
                              const Dims& d, int64_t Hk) {
  // [Hk, T, T]
  at::Tensor da = at::bmm(time_major(g, d, Hk), time_major(x, d, Hk).transpose(1, 2));
  return da.tril_().view(a.sizes());
}

}  // namespace pka
