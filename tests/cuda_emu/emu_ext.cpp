// Runs the fused kernels' device code (float32 instantiation) on the CPU through emu.h.
// Built by tests/test_fused_emulated.py with torch.utils.cpp_extension.load.
#include <torch/extension.h>

#include <optional>
#include <tuple>

#include "emu.h"
// After emu.h, which supplies the CUDA built-ins the device code uses.
#include "pka_fused_kernels.cuh"

namespace {

using at::Tensor;
using namespace pka::fused;

constexpr size_t kDeviceSmem = 227 * 1024;  // H100 opt-in limit per block

Params<float> make_params(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& ak,
                          const Tensor& av, const std::optional<Tensor>& lengths, double scale,
                          double dropout_p, int64_t seed) {
  Params<float> p{};
  p.q = q.data_ptr<float>();
  p.k = k.data_ptr<float>();
  p.v = v.data_ptr<float>();
  p.ak = ak.data_ptr<float>();
  p.av = av.data_ptr<float>();
  p.lengths = lengths.has_value() ? lengths->data_ptr<int64_t>() : nullptr;
  p.H = static_cast<int>(q.size(1));
  p.T = static_cast<int>(q.size(2));
  p.Tp = (p.T + 15) / 16 * 16;
  p.Hk = ak.dim() == 2 ? 1 : p.H;
  p.Hv = av.dim() == 2 ? 1 : p.H;
  p.scale = static_cast<float>(scale);
  p.dropout = dropout_p > 0.0;
  p.keep_scale = dropout_p > 0.0 ? static_cast<float>(1.0 / (1.0 - dropout_p)) : 1.f;
  p.seed = static_cast<uint64_t>(seed);
  p.threshold = pka::dropout_threshold(dropout_p);
  return p;
}

// Inputs: contiguous float32 CPU tensors, as the device entry points make them.
std::tuple<Tensor, Tensor, bool> fwd(Tensor q, Tensor k, Tensor v, Tensor ak, Tensor av,
                                     std::optional<Tensor> lengths, double scale,
                                     double dropout_p, int64_t seed, bool workspace) {
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3);
  Params<float> p = make_params(q, k, v, ak, av, lengths, scale, dropout_p, seed);
  // Poison: every element the kernel should write is NaN until it does.
  Tensor out = at::full_like(q, NAN), lse = at::full({B, H, T}, NAN, q.options());
  p.out = out.data_ptr<float>();
  p.lse_out = lse.data_ptr<float>();
  Tensor work;
  bool in_smem = false;
  const bool built = with_head_dim(D, [&](auto Dc) {
    constexpr int Dv = decltype(Dc)::value;
    using SM = Smem<float, Dv>;
    in_smem = !workspace && SM::fwd(p.Tp, true) <= kDeviceSmem;
    if (!in_smem) {
      work = at::full({B * H * kFwdBuffers * p.Tp * Dv}, NAN, q.options());
      p.work = work.data_ptr<float>();
    }
    pka_emu::launch(pka_fwd_kernel<float, Dv>, static_cast<unsigned>(B * H), kThreads,
                    SM::fwd(p.Tp, in_smem), p);
  });
  TORCH_CHECK(built, "head dim ", D, " has no fused kernel");
  return {out, lse, in_smem};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> bwd(Tensor dout, Tensor q, Tensor k, Tensor v,
                                                       Tensor ak, Tensor av,
                                                       std::optional<Tensor> lengths, Tensor out,
                                                       Tensor lse, double scale, double dropout_p,
                                                       int64_t seed, bool workspace) {
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3);
  Params<float> p = make_params(q, k, v, ak, av, lengths, scale, dropout_p, seed);
  p.dout = dout.data_ptr<float>();
  p.o = out.data_ptr<float>();
  p.lse = lse.data_ptr<float>();
  Tensor dq = at::full_like(q, NAN), dk = at::full_like(q, NAN), dv = at::full_like(q, NAN);
  Tensor dak = at::zeros({p.Hk, T, T}, q.options()), dav = at::zeros({p.Hv, T, T}, q.options());
  p.dq = dq.data_ptr<float>();
  p.dk = dk.data_ptr<float>();
  p.dv = dv.data_ptr<float>();
  p.dak = dak.data_ptr<float>();
  p.dav = dav.data_ptr<float>();
  Tensor work;
  const bool built = with_head_dim(D, [&](auto Dc) {
    constexpr int Dv = decltype(Dc)::value;
    using SM = Smem<float, Dv>;
    const bool in_smem = !workspace && SM::bwd(p.Tp, true) <= kDeviceSmem;
    if (!in_smem) {
      work = at::full({B * H * kBwdBuffers * p.Tp * Dv}, NAN, q.options());
      p.work = work.data_ptr<float>();
    }
    pka_emu::launch(pka_bwd_kernel<float, Dv>, static_cast<unsigned>(B * H), kThreads,
                    SM::bwd(p.Tp, in_smem), p);
  });
  TORCH_CHECK(built, "head dim ", D, " has no fused kernel");
  return {dq, dk, dv, dak.view(ak.sizes()), dav.view(av.sizes())};
}

// Shared-memory bytes the host would request, for checking the launch plan.
std::tuple<int64_t, int64_t> smem_bytes(int64_t D, int64_t T, bool in_smem, int64_t elem_bytes) {
  int64_t f = 0, b = 0;
  const int Tp = static_cast<int>((T + 15) / 16 * 16);
  const bool built = with_head_dim(D, [&](auto Dc) {
    constexpr int Dv = decltype(Dc)::value;
    if (elem_bytes == 4) {
      f = Smem<float, Dv>::fwd(Tp, in_smem);
      b = Smem<float, Dv>::bwd(Tp, in_smem);
    } else {
      f = Smem<uint16_t, Dv>::fwd(Tp, in_smem);
      b = Smem<uint16_t, Dv>::bwd(Tp, in_smem);
    }
  });
  TORCH_CHECK(built, "head dim ", D, " has no fused kernel");
  return {f, b};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fwd", &fwd);
  m.def("bwd", &bwd);
  m.def("smem_bytes", &smem_bytes);
}
