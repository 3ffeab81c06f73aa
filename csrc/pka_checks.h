// Argument validation shared by the CPU and CUDA implementations. Every message names the argument
// and the shapes involved, because these checks are the last line of defence behind the Python layer.
// Also the guard every entry point holds against autocast.
#pragma once

#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/types.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <string>

namespace pka {

// The op computes in the dtype it is given. A custom op falls through autocast's dispatch keys
// without leaving them, so without this guard the ATen products inside the kernels would be recast
// to the autocast dtype (and then mismatch the kernels' own buffers).
struct NoAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

// The value of a kernel switch in the environment, "" when unset or empty. Any value outside
// `allowed` is an error naming the variable: a typo must not silently select the default path.
inline std::string env_switch(const char* variable, std::initializer_list<const char*> allowed,
                              const char* expected) {
  const char* env = std::getenv(variable);
  if (env == nullptr || env[0] == '\0') return "";
  bool known = false;
  for (const char* value : allowed) known = known || std::strcmp(env, value) == 0;
  TORCH_CHECK(known, variable, " must be ", expected, ", got '", env, "'");
  return env;
}

struct Dims {
  int64_t B, H, T, D;
  int64_t Hk;  // heads of a_k: 1 when shared ([T, T]), H when per head ([H, T, T])
  int64_t Hv;  // heads of a_v
};

inline int64_t check_kernel(const at::Tensor& a, const char* name, const at::Tensor& q, int64_t H,
                            int64_t T) {
  TORCH_CHECK(a.dim() == 2 || a.dim() == 3, name, " must be [T, T] or [H, T, T], got shape ",
              a.sizes());
  TORCH_CHECK(a.size(-1) == T && a.size(-2) == T, name, " must be [", T, ", ", T, "] or [", H,
              ", ", T, ", ", T, "] to match q of shape ", q.sizes(), ", got ", a.sizes());
  TORCH_CHECK(a.dim() == 2 || a.size(0) == H, name, " has ", a.size(0),
              " heads but q has H=", H, " (q shape ", q.sizes(), ")");
  TORCH_CHECK(a.scalar_type() == q.scalar_type(), name, " dtype ", a.scalar_type(),
              " does not match q dtype ", q.scalar_type());
  TORCH_CHECK(a.device() == q.device(), name, " is on ", a.device(), " but q is on ", q.device());
  return a.dim() == 2 ? 1 : H;
}

inline Dims check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const at::Tensor& a_k, const at::Tensor& a_v,
                         const std::optional<at::Tensor>& lengths, double scale,
                         double dropout_p, const std::optional<at::Tensor>& seed) {
  TORCH_CHECK(q.dim() == 4, "q must be [B, H, T, d], got shape ", q.sizes());
  TORCH_CHECK(k.sizes() == q.sizes(), "k shape ", k.sizes(), " must equal q shape ", q.sizes());
  TORCH_CHECK(v.sizes() == q.sizes(), "v shape ", v.sizes(), " must equal q shape ", q.sizes());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "q, k, v must share a dtype, got q ", q.scalar_type(), ", k ", k.scalar_type(),
              ", v ", v.scalar_type());
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device(),
              "q, k, v must be on one device, got q ", q.device(), ", k ", k.device(), ", v ",
              v.device());
  Dims dims{q.size(0), q.size(1), q.size(2), q.size(3), 1, 1};
  TORCH_CHECK(dims.H >= 1 && dims.D >= 1, "q must have H >= 1 and d >= 1, got shape ", q.sizes());
  dims.Hk = check_kernel(a_k, "a_k", q, dims.H, dims.T);
  dims.Hv = check_kernel(a_v, "a_v", q, dims.H, dims.T);
  if (lengths.has_value()) {
    const auto& len = *lengths;
    TORCH_CHECK(len.dim() == 1 && len.size(0) == dims.B, "lengths must be [B] = [", dims.B,
                "], got shape ", len.sizes());
    TORCH_CHECK(len.scalar_type() == at::kLong, "lengths must be int64, got ", len.scalar_type());
    TORCH_CHECK(len.device() == q.device() || len.device().is_cpu(), "lengths is on ",
                len.device(), " but q is on ", q.device());
  }
  TORCH_CHECK(std::isfinite(scale), "scale must be finite, got ", scale);
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "dropout_p must be in [0, 1), got ",
              dropout_p);
  TORCH_CHECK(dropout_p == 0.0 || seed.has_value(), "seed is required when dropout_p > 0");
  if (seed.has_value()) {
    TORCH_CHECK(seed->numel() == 1 && seed->scalar_type() == at::kLong && seed->device().is_cpu(),
                "seed must be a one-element int64 CPU tensor, got shape ", seed->sizes(), ", ",
                seed->scalar_type(), " on ", seed->device());
  }
  return dims;
}

// The backward's extra tensors: dout and out shaped like q, lse [B, H, T] of the backend's dtype.
inline void check_backward_inputs(const at::Tensor& dout, const at::Tensor& out,
                                  const at::Tensor& lse, const at::Tensor& q, const Dims& d,
                                  at::ScalarType lse_dtype) {
  TORCH_CHECK(dout.sizes() == q.sizes() && dout.scalar_type() == q.scalar_type(),
              "dout must match q: got ", dout.sizes(), " ", dout.scalar_type(), ", expected ",
              q.sizes(), " ", q.scalar_type());
  TORCH_CHECK(out.sizes() == q.sizes() && out.scalar_type() == q.scalar_type(),
              "out must match q: got ", out.sizes(), " ", out.scalar_type(), ", expected ",
              q.sizes(), " ", q.scalar_type());
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == d.B && lse.size(1) == d.H && lse.size(2) == d.T &&
                  lse.scalar_type() == lse_dtype,
              "lse must be [B, H, T] = [", d.B, ", ", d.H, ", ", d.T, "] of dtype ", lse_dtype,
              ", got ", lse.sizes(), " ", lse.scalar_type());
}

// Reads lengths on the host (they are [B] int64, tiny) and checks 0 <= lengths[b] <= T.
inline std::vector<int64_t> host_lengths(const std::optional<at::Tensor>& lengths, const Dims& d) {
  std::vector<int64_t> out(d.B, d.T);
  if (!lengths.has_value()) return out;
  auto cpu = lengths->to(at::kCPU).contiguous();
  const int64_t* p = cpu.data_ptr<int64_t>();
  for (int64_t b = 0; b < d.B; ++b) {
    TORCH_CHECK(p[b] >= 0 && p[b] <= d.T, "lengths[", b, "] = ", p[b], " is outside [0, T=", d.T,
                "]");
    out[b] = p[b];
  }
  return out;
}

inline uint64_t seed_value(const std::optional<at::Tensor>& seed) {
  return seed.has_value() ? static_cast<uint64_t>(seed->item<int64_t>()) : 0;
}

}  // namespace pka
