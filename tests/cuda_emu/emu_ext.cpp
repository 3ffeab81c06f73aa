// Runs the fused kernels' device code on the CPU through emu.h, for float32 (CUDA-core tile
// products, as on the device) and for bfloat16 and float16 stand-ins (bf16e, f16e: the same bits
// as torch.bfloat16 / torch.float16, round-to-nearest-even) whose tile products go through the
// kernels' WMMA and mma.sync code on the wmma_emu.h model, so that the 16-bit paths run as
// compiled for the device: shared-memory layout, fragment alignment, operand layouts and
// roundings. Built by tests/test_fused_emulated.py.
#include <torch/extension.h>

#include <cstring>
#include <optional>
#include <string>
#include <tuple>

#include "emu.h"
#include "wmma_emu.h"
// After emu.h, which supplies the CUDA built-ins the device code uses.
#include "pka_fused_kernels.cuh"

namespace pka::fused {

struct bf16e {
  uint16_t bits;
};

inline float to_f(bf16e x) {
  const uint32_t u = static_cast<uint32_t>(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

template <>
inline bf16e from_f<bf16e>(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {0x7fc0};  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);                          // round to nearest even
  return {static_cast<uint16_t>(u >> 16)};
}

struct f16e {
  uint16_t bits;
};

inline float to_f(f16e x) { return static_cast<float>(c10::Half(x.bits, c10::Half::from_bits())); }

template <>
inline f16e from_f<f16e>(float x) {
  return {c10::Half(x).x};  // round to nearest even, as __float2half_rn
}

}  // namespace pka::fused

namespace {

using at::Tensor;
using namespace pka::fused;

template <typename T>
T* ptr(const Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

constexpr size_t kDeviceSmem = 227 * 1024;  // H100 opt-in limit per block
constexpr size_t kSmemPerSm = 228 * 1024;   // H100 shared memory per SM

template <typename T>
Params<T> make_params(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& ak,
                      const Tensor& av, const std::optional<Tensor>& lengths, double scale,
                      double dropout_p, int64_t seed) {
  Params<T> p{};
  p.q = ptr<T>(q);
  p.k = ptr<T>(k);
  p.v = ptr<T>(v);
  p.ak = ptr<T>(ak);
  p.av = ptr<T>(av);
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

// One block per (batch, head) of W = 8 (k8) or 4 (k4) warps.
template <typename K8, typename K4, typename P>
void launch_warps(int W, K8 k8, K4 k4, int64_t blocks, size_t smem, const P& p) {
  if (W == 8)
    pka_emu::launch(k8, static_cast<unsigned>(blocks), 256, smem, p);
  else
    pka_emu::launch(k4, static_cast<unsigned>(blocks), 128, smem, p);
}

// The NaN-poisoned workspace for the block buffers that are not in shared memory (p.smem_bufs of
// nbuf are), pointed to by p.work; undefined when all are.
template <typename E>
Tensor workspace(Params<E>& p, int64_t blocks, int nbuf, size_t buf_elems, const Tensor& like) {
  if (p.smem_bufs == nbuf) return Tensor();
  Tensor work = at::full({blocks * (nbuf - p.smem_bufs) * static_cast<int64_t>(buf_elems)}, NAN,
                         like.options());
  p.work = ptr<E>(work);
  return work;
}

// The block order the host uses: batch rows by descending length (pka_fused.cu, block_order).
Tensor block_order(const std::optional<Tensor>& lengths) {
  if (!lengths.has_value() || lengths->numel() < 2) return Tensor();
  return at::argsort(*lengths, /*stable=*/true, /*dim=*/0, /*descending=*/true).contiguous();
}

// Inputs: contiguous CPU tensors of one dtype (float32 or bfloat16), as the device entry points
// make them.
template <typename E>
std::tuple<Tensor, Tensor, int64_t> fwd_impl(Tensor q, Tensor k, Tensor v, Tensor ak, Tensor av,
                                             std::optional<Tensor> lengths, double scale,
                                             double dropout_p, int64_t seed, Placement placement,
                                             int64_t warps, bool smem_scores) {
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3);
  Params<E> p = make_params<E>(q, k, v, ak, av, lengths, scale, dropout_p, seed);
  p.smem_scores = smem_scores;
  const Tensor order = block_order(lengths);
  p.order = order.defined() ? order.data_ptr<int64_t>() : nullptr;
  // Poison: every element the kernel should write is NaN until it does.
  Tensor out = at::full_like(q, NAN), lse = at::full({B, H, T}, NAN, q.options().dtype(at::kFloat));
  p.out = ptr<E>(out);
  p.lse_out = lse.data_ptr<float>();
  Tensor work;
  const bool built = with_head_dim(D, [&](auto Dc) {
    constexpr int Dv = decltype(Dc)::value;
    using SM = Smem<E, Dv>;
    const int W = static_cast<int>(warps);
    p.smem_bufs = fwd_plan<E, Dv>(p.Tp, kDeviceSmem, kSmemPerSm, 1024, W, placement).smem_bufs;
    work = workspace(p, B * H, kFwdBuffers, SM::buf_elems(p.Tp), q);
    launch_warps(W, pka_fwd_kernel<E, Dv, 8>, pka_fwd_kernel<E, Dv, 4>, B * H,
                 SM::fwd(p.Tp, p.smem_bufs, W), p);
  });
  TORCH_CHECK(built, "head dim ", D, " has no fused kernel");
  return {out, lse, p.smem_bufs};
}

template <typename E>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> bwd_impl(
    Tensor dout, Tensor q, Tensor k, Tensor v, Tensor ak, Tensor av,
    std::optional<Tensor> lengths, Tensor out, Tensor lse, double scale, double dropout_p,
    int64_t seed, Placement placement, int64_t warps, bool smem_scores) {
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3);
  Params<E> p = make_params<E>(q, k, v, ak, av, lengths, scale, dropout_p, seed);
  p.smem_scores = smem_scores;
  const Tensor order = block_order(lengths);
  p.order = order.defined() ? order.data_ptr<int64_t>() : nullptr;
  p.dout = ptr<E>(dout);
  p.o = ptr<E>(out);
  p.lse = lse.data_ptr<float>();
  Tensor dq = at::full_like(q, NAN), dk = at::full_like(q, NAN), dv = at::full_like(q, NAN);
  auto f32 = q.options().dtype(at::kFloat);
  Tensor dak = at::zeros({p.Hk, T, T}, f32), dav = at::zeros({p.Hv, T, T}, f32);
  p.dq = ptr<E>(dq);
  p.dk = ptr<E>(dk);
  p.dv = ptr<E>(dv);
  p.dak = dak.data_ptr<float>();
  p.dav = dav.data_ptr<float>();
  Tensor work;
  const bool built = with_head_dim(D, [&](auto Dc) {
    constexpr int Dv = decltype(Dc)::value;
    using SM = Smem<E, Dv>;
    const int W = static_cast<int>(warps);
    const Plan plan = bwd_plan<E, Dv>(p.Tp, kDeviceSmem, W, placement);
    TORCH_CHECK(plan.warps == W, "a backward block of ", W, " warps does not fit");
    p.smem_bufs = plan.smem_bufs;
    work = workspace(p, B * H, kBwdBuffers, SM::buf_elems(p.Tp), q);
    launch_warps(W, pka_bwd_kernel<E, Dv, 8>, pka_bwd_kernel<E, Dv, 4>, B * H,
                 SM::bwd(p.Tp, p.smem_bufs, W), p);
  });
  TORCH_CHECK(built, "head dim ", D, " has no fused kernel");
  return {dq, dk, dv, dak.to(q.scalar_type()).view(ak.sizes()),
          dav.to(q.scalar_type()).view(av.sizes())};
}

// "smem" (every buffer that fits), "split" or "workspace", as PKA_FUSED_WORKSPACE=0 / split / 1.
Placement placement_of(const std::string& name) {
  if (name == "smem") return Placement::kFree;
  if (name == "split") return Placement::kSplit;
  TORCH_CHECK(name == "workspace", "placement must be smem, split or workspace, got ", name);
  return Placement::kWorkspace;
}

// Returns out, lse and the number of block buffers that were in shared memory.
std::tuple<Tensor, Tensor, int64_t> fwd(Tensor q, Tensor k, Tensor v, Tensor ak, Tensor av,
                                        std::optional<Tensor> lengths, double scale,
                                        double dropout_p, int64_t seed, std::string placement,
                                        int64_t warps, bool smem_scores) {
  TORCH_CHECK(warps == 4 || warps == 8, "the forward runs with 4 or 8 warps, got ", warps);
  const Placement pl = placement_of(placement);
  if (q.scalar_type() == at::kBFloat16)
    return fwd_impl<bf16e>(q, k, v, ak, av, lengths, scale, dropout_p, seed, pl, warps, smem_scores);
  if (q.scalar_type() == at::kHalf)
    return fwd_impl<f16e>(q, k, v, ak, av, lengths, scale, dropout_p, seed, pl, warps, smem_scores);
  TORCH_CHECK(q.scalar_type() == at::kFloat, "emulated kernels take float32, bfloat16 or float16");
  return fwd_impl<float>(q, k, v, ak, av, lengths, scale, dropout_p, seed, pl, warps, smem_scores);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> bwd(Tensor dout, Tensor q, Tensor k, Tensor v,
                                                       Tensor ak, Tensor av,
                                                       std::optional<Tensor> lengths, Tensor out,
                                                       Tensor lse, double scale, double dropout_p,
                                                       int64_t seed, std::string placement,
                                                       int64_t warps, bool smem_scores) {
  TORCH_CHECK(warps == 4 || warps == 8, "the backward runs with 4 or 8 warps, got ", warps);
  const Placement pl = placement_of(placement);
  if (q.scalar_type() == at::kBFloat16)
    return bwd_impl<bf16e>(dout, q, k, v, ak, av, lengths, out, lse, scale, dropout_p, seed, pl,
                           warps, smem_scores);
  if (q.scalar_type() == at::kHalf)
    return bwd_impl<f16e>(dout, q, k, v, ak, av, lengths, out, lse, scale, dropout_p, seed, pl,
                          warps, smem_scores);
  TORCH_CHECK(q.scalar_type() == at::kFloat, "emulated kernels take float32, bfloat16 or float16");
  return bwd_impl<float>(dout, q, k, v, ak, av, lengths, out, lse, scale, dropout_p, seed, pl,
                         warps, smem_scores);
}

// Shared-memory bytes of 4-warp blocks with every block buffer in shared memory (in_smem) or none.
std::tuple<int64_t, int64_t> smem_bytes(int64_t D, int64_t T, bool in_smem, int64_t elem_bytes) {
  int64_t f = 0, b = 0;
  const int Tp = static_cast<int>((T + 15) / 16 * 16);
  const bool built = with_head_dim(D, [&](auto Dc) {
    constexpr int Dv = decltype(Dc)::value;
    if (elem_bytes == 4) {
      f = Smem<float, Dv>::fwd(Tp, in_smem ? kFwdBuffers : 0, 4);
      b = Smem<float, Dv>::bwd(Tp, in_smem ? kBwdBuffers : 0, 4);
    } else {
      f = Smem<bf16e, Dv>::fwd(Tp, in_smem ? kFwdBuffers : 0, 4);
      b = Smem<bf16e, Dv>::bwd(Tp, in_smem ? kBwdBuffers : 0, 4);
    }
  });
  TORCH_CHECK(built, "head dim ", D, " has no fused kernel");
  return {f, b};
}

// The forward launch plan the host would choose on an SM of per_sm bytes of shared memory, with
// `reserved` bytes kept per block: (warps, block buffers in shared memory).
std::tuple<int64_t, int64_t> fwd_plan_of(int64_t D, int64_t T, int64_t elem_bytes, int64_t limit,
                                         int64_t per_sm, int64_t reserved, int64_t forced,
                                         std::string placement) {
  Plan plan{0, 0};
  const Placement pl = placement_of(placement);
  const int Tp = static_cast<int>((T + 15) / 16 * 16);
  const bool built = with_head_dim(D, [&](auto Dc) {
    constexpr int Dv = decltype(Dc)::value;
    plan = elem_bytes == 4
               ? fwd_plan<float, Dv>(Tp, limit, per_sm, reserved, forced, pl)
               : fwd_plan<bf16e, Dv>(Tp, limit, per_sm, reserved, forced, pl);
  });
  TORCH_CHECK(built, "head dim ", D, " has no fused kernel");
  return {plan.warps, plan.smem_bufs};
}

// The backward launch plan the host would choose: (warps, block buffers in shared memory).
std::tuple<int64_t, int64_t> bwd_plan_of(int64_t D, int64_t T, int64_t elem_bytes, int64_t limit,
                                         int64_t forced, std::string placement) {
  Plan plan{0, 0};
  const Placement pl = placement_of(placement);
  const int Tp = static_cast<int>((T + 15) / 16 * 16);
  const bool built = with_head_dim(D, [&](auto Dc) {
    constexpr int Dv = decltype(Dc)::value;
    plan = elem_bytes == 4 ? bwd_plan<float, Dv>(Tp, limit, forced, pl)
                           : bwd_plan<bf16e, Dv>(Tp, limit, forced, pl);
  });
  TORCH_CHECK(built, "head dim ", D, " has no fused kernel");
  return {plan.warps, plan.smem_bufs};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // smem_scores: the 16-bit kernels' scores and probabilities through shared memory (WMMA), as
  // PKA_SMEM_SCORES=1 (float32 always works that way).
  namespace py = pybind11;
  m.def("fwd", &fwd, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("ak"), py::arg("av"),
        py::arg("lengths"), py::arg("scale"), py::arg("dropout_p"), py::arg("seed"),
        py::arg("placement"), py::arg("warps"), py::arg("smem_scores") = false);
  m.def("bwd", &bwd, py::arg("dout"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("ak"),
        py::arg("av"), py::arg("lengths"), py::arg("out"), py::arg("lse"), py::arg("scale"),
        py::arg("dropout_p"), py::arg("seed"), py::arg("placement"), py::arg("warps"),
        py::arg("smem_scores") = false);
  m.def("smem_bytes", &smem_bytes);
  m.def("fwd_plan", &fwd_plan_of);
  m.def("bwd_plan", &bwd_plan_of);
}
