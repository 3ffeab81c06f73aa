// Launcher of the fused backward kernel (the algorithm: pka_fused.cu's header comment).
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "pka_fused.cuh"
#include "pka_fused_host.cuh"

namespace pka {

using at::Tensor;
using namespace fused;

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> pka_bwd_fused(
    const Tensor& dout_, const Tensor& q_, const Tensor& k_, const Tensor& v_, const Tensor& a_k,
    const Tensor& a_v, const std::optional<Tensor>& lengths, const Tensor& lse_,
    const Tensor& out_, const Dims& d, double scale, double dropout_p,
    const std::optional<Tensor>& seed) {
  c10::cuda::CUDAGuard device_guard(q_.device());
  const Inputs in = prepare(q_, k_, v_, a_k, a_v, lengths, d);
  const Tensor& q = in.q;
  const Tensor dout = contiguous16(dout_), out = contiguous16(out_), lse = lse_.contiguous();
  Tensor dq = at::empty_like(q), dk = at::empty_like(q), dv = at::empty_like(q);
  auto f32 = q.options().dtype(at::kFloat);
  Tensor dak = at::zeros({d.Hk, d.T, d.T}, f32), dav = at::zeros({d.Hv, d.T, d.T}, f32);
  Tensor work;
  const unsigned grid = in.grid;
  PKA_DISPATCH_FUSED(q.scalar_type(), "pka_bwd_fused", [&] {
    using T = typename Native<scalar_t>::type;
    const bool built = with_head_dim(d.D, [&](auto Dc) {
      constexpr int D = decltype(Dc)::value;
      using SM = Smem<T, D>;
      Params<T> p = base_params<T>(in, d, scale, dropout_p, seed);
      p.dout = reinterpret_cast<const T*>(dout.data_ptr());
      p.o = reinterpret_cast<const T*>(out.data_ptr());
      p.lse = lse.data_ptr<float>();
      p.dq = reinterpret_cast<T*>(dq.data_ptr());
      p.dk = reinterpret_cast<T*>(dk.data_ptr());
      p.dv = reinterpret_cast<T*>(dv.data_ptr());
      p.dak = dak.data_ptr<float>();
      p.dav = dav.data_ptr<float>();
      p.smem_scores = smem_scores();
      const Plan plan = backward_plan<T, D>(p.Tp, device_limits(q));
      work = workspace(p, plan, kBwdBuffers, SM::buf_elems(p.Tp), d, q);
      if (grid == 0) return;
      launch(plan, pka_bwd_kernel<T, D, 8>, pka_bwd_kernel<T, D, 4>, grid,
             SM::bwd(p.Tp, plan.smem_bufs, plan.warps), p);
    });
    TORCH_CHECK(built, "pka fused CUDA kernels: no kernel for head dim ", d.D);
  });
  Tensor da_k = dak.to(q.scalar_type()).view(a_k.sizes());
  Tensor da_v = dav.to(q.scalar_type()).view(a_v.sizes());
  return {dq, dk, dv, da_k, da_v};
}

}  // namespace pka
