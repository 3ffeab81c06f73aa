// Host-side helpers of the fused kernels' entry points (pka_fused.cu: the capability check, the
// forward and the backward) and of their launches, fwd_typed / bwd_typed (pka_fused_typed.cuh),
// which instantiate the kernels once per dtype in pka_fused_{f32,f16,bf16}.cu, so that the three
// sets of instantiations compile in parallel.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <limits>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>

#include "pka_checks.h"
#include "pka_fused_kernels.cuh"

namespace pka {
namespace fused {

using at::Tensor;

// The fused kernels' dtypes: float32, float16, bfloat16 (float64 stays on the unfused path).
#define PKA_DISPATCH_FUSED(TYPE, NAME, ...)                          \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

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
  int major;             // compute capability
  size_t smem_optin;     // dynamic shared memory a block may opt in to
  size_t smem_per_sm;    // shared memory of one SM, for all its blocks
  size_t smem_reserved;  // shared memory the system keeps per block
};

inline const DeviceLimits& device_limits(const Tensor& q) {
  static std::mutex mutex;
  static std::unordered_map<int, DeviceLimits> cache;  // nodes are stable: references stay valid
  const int dev = q.device().index();
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(dev);
  if (it == cache.end()) {
    int major = 0, smem = 0, per_sm = 0, reserved = 0;
    auto get = [dev](int* value, cudaDeviceAttr attr) {
      C10_CUDA_CHECK(cudaDeviceGetAttribute(value, attr, dev));
    };
    get(&major, cudaDevAttrComputeCapabilityMajor);
    get(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin);
    get(&per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor);
    get(&reserved, cudaDevAttrReservedSharedMemoryPerBlock);
    const DeviceLimits limits{major, static_cast<size_t>(smem), static_cast<size_t>(per_sm),
                              static_cast<size_t>(reserved)};
    it = cache.emplace(dev, limits).first;
  }
  return it->second;
}

inline size_t smem_limit(const Tensor& q) { return device_limits(q).smem_optin; }

// PKA_FUSED_WORKSPACE=1 puts every block buffer in the global workspace, =split only those that
// long sequences put there (Placement), even when they would fit in shared memory.
inline Placement placement() {
  const std::string v = env_switch("PKA_FUSED_WORKSPACE", {"0", "1", "split"}, "0, 1 or split");
  return v == "split" ? Placement::kSplit : v == "1" ? Placement::kWorkspace : Placement::kFree;
}

// PKA_SMEM_SCORES=1: the 16-bit kernels' scores and probabilities through shared memory (the
// WMMA path; the forward's softmax in two passes) instead of on mma.sync registers, to compare
// the two on a device.
inline bool smem_scores() { return env_switch("PKA_SMEM_SCORES", {"0", "1"}, "0 or 1") == "1"; }

// The kernels copy rows of q, k, v, dout and out in 16-byte chunks: a tensor whose data does not
// start on a 16-byte boundary (a view with an odd storage offset) is copied first.
inline Tensor contiguous16(const Tensor& t) {
  Tensor c = t.contiguous();
  return reinterpret_cast<std::uintptr_t>(c.data_ptr()) % 16 == 0 ? c : c.clone();
}

// PKA_FWD_WARPS / PKA_BWD_WARPS = 4 or 8 fix the warps per block of the forward / backward, to
// compare the choices on a device; 0 when unset.
inline int forced_warps(const char* variable) {
  const std::string v = env_switch(variable, {"0", "4", "8"}, "0, 4 or 8");
  return v.empty() ? 0 : v[0] - '0';
}

// The launch plans of pka_fused_kernels.cuh with this device's limits and the environment.
template <typename T, int D>
Plan forward_plan(int Tp, const DeviceLimits& dev) {
  return fwd_plan<T, D>(Tp, dev.smem_optin, dev.smem_per_sm, dev.smem_reserved,
                        forced_warps("PKA_FWD_WARPS"), placement());
}

template <typename T, int D>
Plan backward_plan(int Tp, const DeviceLimits& dev) {
  return bwd_plan<T, D>(Tp, dev.smem_optin, forced_warps("PKA_BWD_WARPS"), placement());
}

inline int padded_T(const Dims& d) { return static_cast<int>((d.T + 15) / 16 * 16); }


inline Tensor device_lengths(const std::optional<Tensor>& lengths, const Tensor& q) {
  return lengths.has_value() ? lengths->to(q.device(), at::kLong).contiguous() : Tensor();
}

// Batch rows by descending length, computed on the device (no synchronisation), so that the blocks
// of the longest sequences start first; undefined without lengths or with PKA_BLOCK_ORDER=0 (to
// compare the two on a device).
inline Tensor block_order(const Tensor& lengths_dev) {
  const bool off = env_switch("PKA_BLOCK_ORDER", {"0", "1"}, "0 or 1") == "0";
  if (!lengths_dev.defined() || lengths_dev.numel() < 2 || off) return Tensor();
  return at::argsort(lengths_dev, /*stable=*/true, /*dim=*/0, /*descending=*/true).contiguous();
}

inline unsigned grid_of(const Dims& d) {
  const int64_t n = d.B * d.H;
  TORCH_CHECK(n <= std::numeric_limits<int32_t>::max(), "pka fused CUDA kernels: B * H = ", n,
              " exceeds the grid limit");
  return static_cast<unsigned>(n);
}


// What both launchers hand the kernels: q, k, v contiguous and 16-byte aligned, the kernel matrices
// contiguous, lengths on the device and the block order, and the grid.
struct Inputs {
  Tensor q, k, v, ak, av, len, order;
  unsigned grid;  // B * H blocks
};

inline Inputs prepare(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& a_k,
                      const Tensor& a_v, const std::optional<Tensor>& lengths, const Dims& d) {
  Inputs in;
  in.q = contiguous16(q);
  in.k = contiguous16(k);
  in.v = contiguous16(v);
  in.ak = a_k.contiguous();
  in.av = a_v.contiguous();
  in.len = device_lengths(lengths, in.q);
  in.order = block_order(in.len);
  in.grid = grid_of(d);
  return in;
}

template <typename T>
Params<T> base_params(const Inputs& in, const Dims& d, double scale, double dropout_p,
                      const std::optional<Tensor>& seed) {
  Params<T> p{};
  p.q = reinterpret_cast<const T*>(in.q.data_ptr());
  p.k = reinterpret_cast<const T*>(in.k.data_ptr());
  p.v = reinterpret_cast<const T*>(in.v.data_ptr());
  p.ak = reinterpret_cast<const T*>(in.ak.data_ptr());
  p.av = reinterpret_cast<const T*>(in.av.data_ptr());
  p.lengths = in.len.defined() ? in.len.data_ptr<int64_t>() : nullptr;
  p.order = in.order.defined() ? in.order.data_ptr<int64_t>() : nullptr;
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

// The global workspace for the block buffers the plan leaves out of shared memory (p.work points
// into it; kept alive by the returned tensor until the launch is queued), or an undefined tensor
// when all of them fit.
template <typename T>
Tensor workspace(Params<T>& p, const Plan& plan, int nbuf, size_t buf_elems, const Dims& d,
                 const Tensor& like) {
  p.smem_bufs = plan.smem_bufs;
  if (plan.smem_bufs == nbuf) return Tensor();
  const int64_t per_block = (nbuf - plan.smem_bufs) * static_cast<int64_t>(buf_elems);
  Tensor work = at::empty({d.B * d.H * per_block}, like.options());
  p.work = reinterpret_cast<T*>(work.data_ptr());
  return work;
}

// The backward's tensors besides the inputs: what it reads (dout, out, lse) and writes (dq, dk,
// dv; the fp32 kernel-gradient accumulators dak, dav).
struct BwdTensors {
  Tensor dout, out, lse, dq, dk, dv, dak, dav;
};

// Launch the forward / backward kernels of dtype T (float, __half, __nv_bfloat16) for head dim
// d.D; false if no kernel has that head dim. Defined in pka_fused_typed.cuh and instantiated
// once per dtype in pka_fused_{f32,f16,bf16}.cu.
template <typename T>
bool fwd_typed(const Inputs& in, const Dims& d, double scale, double dropout_p,
               const std::optional<Tensor>& seed, Tensor& out, Tensor& lse);
template <typename T>
bool bwd_typed(const Inputs& in, const Dims& d, double scale, double dropout_p,
               const std::optional<Tensor>& seed, const BwdTensors& t);

// Launches the kernel's 8-warp (k8) or 4-warp (k4) instance, as the plan says, on the current
// stream with `smem` bytes of dynamic shared memory.
template <typename T, typename K8, typename K4>
void launch(const Plan& plan, K8 k8, K4 k4, unsigned grid, size_t smem, const Params<T>& p) {
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto go = [&](auto kernel) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
    kernel<<<grid, 32 * plan.warps, smem, stream>>>(p);
  };
  if (plan.warps == 8) {
    go(k8);
  } else {
    go(k4);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace fused
}  // namespace pka
