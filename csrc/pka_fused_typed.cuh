// The fused kernels' launches for one dtype: definitions of fwd_typed / bwd_typed (declared in
// pka_fused_host.cuh). Included only by pka_fused_{f32,f16,bf16}.cu, each of which instantiates
// both for its dtype: the kernel instantiations are the slowest compiles of the extension (the
// backward's, in one file, took 192 s of one core), and as three files they build in parallel.
#pragma once

#include "pka_fused_host.cuh"

namespace pka {
namespace fused {

template <typename T>
bool fwd_typed(const Inputs& in, const Dims& d, double scale, double dropout_p,
               const std::optional<Tensor>& seed, Tensor& out, Tensor& lse) {
  Tensor work;
  return with_head_dim(d.D, [&](auto Dc) {
    constexpr int D = decltype(Dc)::value;
    using SM = Smem<T, D>;
    Params<T> p = base_params<T>(in, d, scale, dropout_p, seed);
    p.out = reinterpret_cast<T*>(out.data_ptr());
    p.lse_out = lse.data_ptr<float>();
    p.smem_scores = smem_scores();
    const Plan plan = forward_plan<T, D>(p.Tp, device_limits(in.q));
    work = workspace(p, plan, kFwdBuffers, SM::buf_elems(p.Tp), d, in.q);
    if (in.grid == 0) return;
    launch(plan, pka_fwd_kernel<T, D, 8>, pka_fwd_kernel<T, D, 4>, in.grid,
           SM::fwd(p.Tp, plan.smem_bufs, plan.warps), p);
  });
}

template <typename T>
bool bwd_typed(const Inputs& in, const Dims& d, double scale, double dropout_p,
               const std::optional<Tensor>& seed, const BwdTensors& t) {
  Tensor work;
  return with_head_dim(d.D, [&](auto Dc) {
    constexpr int D = decltype(Dc)::value;
    using SM = Smem<T, D>;
    Params<T> p = base_params<T>(in, d, scale, dropout_p, seed);
    p.dout = reinterpret_cast<const T*>(t.dout.data_ptr());
    p.o = reinterpret_cast<const T*>(t.out.data_ptr());
    p.lse = t.lse.data_ptr<float>();
    p.dq = reinterpret_cast<T*>(t.dq.data_ptr());
    p.dk = reinterpret_cast<T*>(t.dk.data_ptr());
    p.dv = reinterpret_cast<T*>(t.dv.data_ptr());
    p.dak = t.dak.data_ptr<float>();
    p.dav = t.dav.data_ptr<float>();
    p.smem_scores = smem_scores();
    const Plan plan = backward_plan<T, D>(p.Tp, device_limits(in.q));
    work = workspace(p, plan, kBwdBuffers, SM::buf_elems(p.Tp), d, in.q);
    if (in.grid == 0) return;
    launch(plan, pka_bwd_kernel<T, D, 8>, pka_bwd_kernel<T, D, 4>, in.grid,
           SM::bwd(p.Tp, plan.smem_bufs, plan.warps), p);
  });
}

}  // namespace fused
}  // namespace pka

// Both launches for dtype T, instantiated: the whole of each per-dtype file.
#define PKA_FUSED_INSTANTIATE(T)                                                                  \
  namespace pka {                                                                                 \
  namespace fused {                                                                               \
  template bool fwd_typed<T>(const Inputs&, const Dims&, double, double,                          \
                             const std::optional<Tensor>&, Tensor&, Tensor&);                     \
  template bool bwd_typed<T>(const Inputs&, const Dims&, double, double,                          \
                             const std::optional<Tensor>&, const BwdTensors&);                    \
  }                                                                                               \
  }
