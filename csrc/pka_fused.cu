// Fused CUDA kernels for pka_fwd / pka_bwd: one thread block per (batch, head) sequence.
//
// A block owns the L = lengths[b] valid rows of its sequence (rows s = T - L ... T-1) and works in
// 16-row tiles (local row r <-> absolute position s + r; the last tile is zero-padded to Lp, a
// multiple of 16). It mixes K = tril(A_k) k and V = tril(A_v) v into block-private buffers with
// tensor-core tile products, then runs causal attention over them, so neither the mixed keys and
// values nor any T x T score matrix ever goes through global memory as a [B, H, ...] tensor.
// The block-private buffers live in shared memory when they fit (T up to a few hundred) and
// otherwise in a per-block slice of a global workspace (same code: generic pointers), which keeps
// every T working at the price of L2/HBM traffic for long sequences.
//
// Forward: per 16-query tile, one warp makes two passes over the visible keys, 64 at a time: the
//   row maxima of the scores, then the probabilities with those maxima, accumulating P V in
//   registers (no rescaling, so the output never goes through shared memory) and the row sums l of
//   the un-dropped probabilities; dropout multiplies the probabilities by keep / (1 - p) before
//   they meet V, and the row is divided by l at the end, exactly the CPU op's
//   dropout(softmax(.)) V. lse = max + log(l) is written in fp32.
// Backward: pass 1 gives every warp whole key tiles (dK_mixed, dV_mixed summed over query tiles
//   without atomics, accumulated in registers); pass 2 gives it query tiles (dq); then
//   dk = tril(A_k)^T dK_mixed, dv = tril(A_v)^T dV_mixed, and the kernel gradients
//   dA[s+i, s+j] += dK_mixed[i] . k[j] (j <= i) go into an fp32 [Hk, T, T] accumulator with
//   atomicAdd: the order of those additions varies from run to run, so da_k / da_v are not bitwise
//   deterministic. pka_cuda.cu routes the backward to the deterministic unfused path under
//   torch.use_deterministic_algorithms(True). Its blocks have 8 warps where they fit (bwd_plan).
//
// Launch: tiles are dealt to the warps of a block so that their work evens out (dealt), rows are
// staged in 16-byte chunks with several loads in flight, shared buffers are padded against bank
// conflicts (pitch), and blocks take the sequences longest first (block_order), so that a long
// one does not start last. benchmarks/gpu_notes.md has the measurements behind each choice.
//
// float16 / bfloat16 products run on tensor cores (WMMA 16x16x16, fp32 accumulation); float32
// runs the same tile algorithm on CUDA cores, because TF32 would miss the op's fp32 accuracy.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <cstdlib>
#include <limits>
#include <mutex>
#include <unordered_map>

#include "pka_fused.cuh"
#include "pka_fused_kernels.cuh"

namespace pka {
namespace {

using at::Tensor;
using namespace fused;

// The fused kernels' dtypes: float32, float16, bfloat16 (float64 stays on the unfused path).
#define PKA_DISPATCH_FUSED(TYPE, NAME, ...)                          \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------

template <typename S>
struct Native {
  using type = S;
};
template <>
struct Native<at::Half> {
  using type = __half;
};
template <>
struct Native<at::BFloat16> {
  using type = __nv_bfloat16;
};

// What the launch plan needs to know about a device, queried once per device rather than on
// every op call.
struct DeviceLimits {
  int major;          // compute capability
  size_t smem_optin;  // dynamic shared memory a block may opt in to
};

const DeviceLimits& device_limits(const Tensor& q) {
  static std::mutex mutex;
  static std::unordered_map<int, DeviceLimits> cache;  // nodes are stable: references stay valid
  const int dev = q.device().index();
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(dev);
  if (it == cache.end()) {
    int major = 0, smem = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    it = cache.emplace(dev, DeviceLimits{major, static_cast<size_t>(smem)}).first;
  }
  return it->second;
}

size_t smem_limit(const Tensor& q) { return device_limits(q).smem_optin; }

// PKA_FUSED_WORKSPACE=1 puts the block buffers in the global workspace even when they would fit in
// shared memory, so tests and compute-sanitizer cover the long-sequence placement on short inputs.
bool force_workspace() {
  const char* env = std::getenv("PKA_FUSED_WORKSPACE");
  return env != nullptr && env[0] != '\0' && env[0] != '0';
}

// The kernels copy rows of q, k, v, dout and out in 16-byte chunks: a tensor whose data does not
// start on a 16-byte boundary (a view with an odd storage offset) is copied first.
Tensor contiguous16(const Tensor& t) {
  Tensor c = t.contiguous();
  return reinterpret_cast<std::uintptr_t>(c.data_ptr()) % 16 == 0 ? c : c.clone();
}

// The backward's launch plan (bwd_plan in pka_fused_kernels.cuh). PKA_BWD_WARPS=4 or 8 fixes the
// warp count, to compare the two on a device.
template <typename T, int D>
BwdPlan backward_plan(int Tp, size_t limit) {
  const char* env = std::getenv("PKA_BWD_WARPS");
  const int forced = env != nullptr && env[0] != '\0' ? std::atoi(env) : 0;
  TORCH_CHECK(forced == 0 || forced == 4 || forced == 8, "PKA_BWD_WARPS must be 4 or 8, got '", env,
              "'");
  return bwd_plan<T, D>(Tp, limit, forced, force_workspace());
}

int padded_T(const Dims& d) { return static_cast<int>((d.T + 15) / 16 * 16); }

template <typename T>
Params<T> base_params(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& ak,
                      const Tensor& av, const Tensor& lengths_dev, const Dims& d, double scale,
                      double dropout_p, const std::optional<Tensor>& seed) {
  Params<T> p{};
  p.q = reinterpret_cast<const T*>(q.data_ptr());
  p.k = reinterpret_cast<const T*>(k.data_ptr());
  p.v = reinterpret_cast<const T*>(v.data_ptr());
  p.ak = reinterpret_cast<const T*>(ak.data_ptr());
  p.av = reinterpret_cast<const T*>(av.data_ptr());
  p.lengths = lengths_dev.defined() ? lengths_dev.data_ptr<int64_t>() : nullptr;
  p.H = static_cast<int>(d.H);
  p.T = static_cast<int>(d.T);
  p.Tp = padded_T(d);
  p.Hk = static_cast<int>(d.Hk);
  p.Hv = static_cast<int>(d.Hv);
  p.scale = static_cast<float>(scale);
  p.dropout = dropout_p > 0.0;
  p.keep_scale = dropout_p > 0.0 ? static_cast<float>(1.0 / (1.0 - dropout_p)) : 1.f;
  p.seed = seed_value(seed);
  p.threshold = dropout_threshold(dropout_p);
  return p;
}

Tensor device_lengths(const std::optional<Tensor>& lengths, const Tensor& q) {
  return lengths.has_value() ? lengths->to(q.device(), at::kLong).contiguous() : Tensor();
}

// Batch rows by descending length, computed on the device (no synchronisation), so that the blocks
// of the longest sequences start first; undefined without lengths or with PKA_BLOCK_ORDER=0 (to
// compare the two on a device).
Tensor block_order(const Tensor& lengths_dev) {
  const char* env = std::getenv("PKA_BLOCK_ORDER");
  if (!lengths_dev.defined() || lengths_dev.numel() < 2 || (env != nullptr && env[0] == '0'))
    return Tensor();
  return at::argsort(lengths_dev, /*stable=*/true, /*dim=*/0, /*descending=*/true).contiguous();
}

unsigned grid_of(const Dims& d) {
  const int64_t n = d.B * d.H;
  TORCH_CHECK(n <= std::numeric_limits<int32_t>::max(), "pka fused CUDA kernels: B * H = ", n,
              " exceeds the grid limit");
  return static_cast<unsigned>(n);
}

}  // namespace

bool fused_supported(const Tensor& q, const Dims& d) {
  const auto t = q.scalar_type();
  if (device_limits(q).major < 8) return false;
  if (t != at::kHalf && t != at::kBFloat16 && t != at::kFloat) return false;
  if (d.T > (1 << 20)) return false;
  // The per-row arrays of the backward grow with T; beyond the device's shared memory, the
  // unfused path takes over.
  const size_t limit = smem_limit(q);
  bool built = false, fits = false;
  PKA_DISPATCH_FUSED(t, "pka_fused_supported", [&] {
    using T = typename Native<scalar_t>::type;
    built = with_head_dim(d.D, [&](auto D) {
      using SM = Smem<T, decltype(D)::value>;
      fits = SM::fwd(padded_T(d), false) <= limit && SM::bwd(padded_T(d), false, 4) <= limit;
    });
  });
  return built && fits;
}

std::tuple<Tensor, Tensor> pka_fwd_fused(const Tensor& q_, const Tensor& k_, const Tensor& v_,
                                         const Tensor& a_k, const Tensor& a_v,
                                         const std::optional<Tensor>& lengths, const Dims& d,
                                         double scale, double dropout_p,
                                         const std::optional<Tensor>& seed) {
  c10::cuda::CUDAGuard device_guard(q_.device());
  const Tensor q = contiguous16(q_), k = contiguous16(k_), v = contiguous16(v_);
  const Tensor ak = a_k.contiguous(), av = a_v.contiguous();
  const Tensor len = device_lengths(lengths, q), order = block_order(len);
  Tensor out = at::empty({d.B, d.H, d.T, d.D}, q.options());
  Tensor lse = at::empty({d.B, d.H, d.T}, q.options().dtype(at::kFloat));
  Tensor work;
  const size_t limit = smem_limit(q);
  const unsigned grid = grid_of(d);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  PKA_DISPATCH_FUSED(q.scalar_type(), "pka_fwd_fused", [&] {
    using T = typename Native<scalar_t>::type;
    const bool built = with_head_dim(d.D, [&](auto Dc) {
      constexpr int D = decltype(Dc)::value;
      using SM = Smem<T, D>;
      Params<T> p = base_params<T>(q, k, v, ak, av, len, d, scale, dropout_p, seed);
      p.order = order.defined() ? order.data_ptr<int64_t>() : nullptr;
      p.out = reinterpret_cast<T*>(out.data_ptr());
      p.lse_out = lse.data_ptr<float>();
      const bool in_smem = !force_workspace() && SM::fwd(p.Tp, true) <= limit;
      if (!in_smem) {
        work = at::empty({d.B * d.H * kFwdBuffers * static_cast<int64_t>(SM::buf_elems(p.Tp))},
                         q.options());
        p.work = reinterpret_cast<T*>(work.data_ptr());
      }
      const size_t smem = SM::fwd(p.Tp, in_smem);
      if (grid == 0) return;
      C10_CUDA_CHECK(cudaFuncSetAttribute(pka_fwd_kernel<T, D>,
                                          cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(smem)));
      pka_fwd_kernel<T, D><<<grid, kThreads, smem, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    TORCH_CHECK(built, "pka fused CUDA kernels: no kernel for head dim ", d.D);
  });
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> pka_bwd_fused(
    const Tensor& dout_, const Tensor& q_, const Tensor& k_, const Tensor& v_, const Tensor& a_k,
    const Tensor& a_v, const std::optional<Tensor>& lengths, const Tensor& lse_,
    const Tensor& out_, const Dims& d, double scale, double dropout_p,
    const std::optional<Tensor>& seed) {
  c10::cuda::CUDAGuard device_guard(q_.device());
  const Tensor q = contiguous16(q_), k = contiguous16(k_), v = contiguous16(v_);
  const Tensor dout = contiguous16(dout_), out = contiguous16(out_), lse = lse_.contiguous();
  const Tensor ak = a_k.contiguous(), av = a_v.contiguous();
  const Tensor len = device_lengths(lengths, q), order = block_order(len);
  Tensor dq = at::empty_like(q), dk = at::empty_like(q), dv = at::empty_like(q);
  auto f32 = q.options().dtype(at::kFloat);
  Tensor dak = at::zeros({d.Hk, d.T, d.T}, f32), dav = at::zeros({d.Hv, d.T, d.T}, f32);
  Tensor work;
  const size_t limit = smem_limit(q);
  const unsigned grid = grid_of(d);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  PKA_DISPATCH_FUSED(q.scalar_type(), "pka_bwd_fused", [&] {
    using T = typename Native<scalar_t>::type;
    const bool built = with_head_dim(d.D, [&](auto Dc) {
      constexpr int D = decltype(Dc)::value;
      using SM = Smem<T, D>;
      Params<T> p = base_params<T>(q, k, v, ak, av, len, d, scale, dropout_p, seed);
      p.order = order.defined() ? order.data_ptr<int64_t>() : nullptr;
      p.dout = reinterpret_cast<const T*>(dout.data_ptr());
      p.o = reinterpret_cast<const T*>(out.data_ptr());
      p.lse = lse.data_ptr<float>();
      p.dq = reinterpret_cast<T*>(dq.data_ptr());
      p.dk = reinterpret_cast<T*>(dk.data_ptr());
      p.dv = reinterpret_cast<T*>(dv.data_ptr());
      p.dak = dak.data_ptr<float>();
      p.dav = dav.data_ptr<float>();
      const BwdPlan plan = backward_plan<T, D>(p.Tp, limit);
      if (!plan.in_smem) {
        work = at::empty({d.B * d.H * kBwdBuffers * static_cast<int64_t>(SM::buf_elems(p.Tp))},
                         q.options());
        p.work = reinterpret_cast<T*>(work.data_ptr());
      }
      const size_t smem = SM::bwd(p.Tp, plan.in_smem, plan.warps);
      if (grid == 0) return;
      auto launch = [&](auto kernel) {
        C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(smem)));
        kernel<<<grid, 32 * plan.warps, smem, stream>>>(p);
      };
      if (plan.warps == 8) {
        launch(pka_bwd_kernel<T, D, 8>);
      } else {
        launch(pka_bwd_kernel<T, D, 4>);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    TORCH_CHECK(built, "pka fused CUDA kernels: no kernel for head dim ", d.D);
  });
  Tensor da_k = dak.to(q.scalar_type()).view(a_k.sizes());
  Tensor da_v = dav.to(q.scalar_type()).view(a_v.sizes());
  return {dq, dk, dv, da_k, da_v};
}

}  // namespace pka
