// Host interface of the fused CUDA kernels (pka_fused.cu), called from pka_cuda.cu.
#pragma once

#include <torch/types.h>

#include <optional>
#include <tuple>

#include "pka_checks.h"

namespace pka {

// Whether the fused kernels take these inputs: float16 / bfloat16 / float32, head dim 16, 32, 64
// or 128. Anything else (float64, other head dims) runs the unfused baseline.
bool fused_supported(const at::Tensor& q, const Dims& d);

std::tuple<at::Tensor, at::Tensor> pka_fwd_fused(const at::Tensor& q, const at::Tensor& k,
                                                 const at::Tensor& v, const at::Tensor& a_k,
                                                 const at::Tensor& a_v,
                                                 const std::optional<at::Tensor>& lengths,
                                                 const Dims& d, double scale, double dropout_p,
                                                 const std::optional<at::Tensor>& seed);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> pka_bwd_fused(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& a_k, const at::Tensor& a_v, const std::optional<at::Tensor>& lengths,
    const at::Tensor& lse, const at::Tensor& out, const Dims& d, double scale, double dropout_p,
    const std::optional<at::Tensor>& seed);

}  // namespace pka
