// CUDA entry points of pka_fwd / pka_bwd, and the unfused baseline path.
//
// float16 / bfloat16 / float32 with head dim 16, 32, 64 or 128 run the fused kernels of
// pka_fused.cu. This file keeps the unfused path for the rest (float64, other head dims), for the
// deterministic backward (torch.use_deterministic_algorithms(True): the fused backward adds the
// kernel gradients with atomics) and, with PKA_CUDA_UNFUSED=1 in the environment, for everything
// (benchmarks and tests compare the two).
//
// Every dense product goes through ATen (cuBLAS batched GEMMs); the only hand-written kernels are
// two row-wise ones, "masked softmax rows" (forward) and "softmax backward rows" (backward), which
// fuse the causal + left-padding mask, the fp32/fp64 softmax arithmetic and the counter-based
// dropout of pka_dropout.h. This path materialises [B, H, T, T] score/probability tensors, so
// its memory grows with T^2 per (batch, head); the fused flash-style kernels that avoid that are
// tracked separately. The algorithm mirrors pka_cpu.cpp step for step:
//
//   s_b = T - lengths[b]; row i of (b, h) is a real query iff i >= s_b; key j is visible from
//   query i iff s_b <= j <= i. Padded rows of q, k, v, dout are ignored (here: zeroed before use,
//   which is what slicing them away does on CPU).
//   K = tril(A_k) k0, V = tril(A_v) v0, S = q0 K^T, P = dropout(softmax(scale * S)), out = P V,
//   lse = rowmax + log(rowsum) (0 on empty rows), out rows i < s_b exactly 0.
//   Backward: dP = dout0 V^T, D_i = dout_i . out_i, dS = P (Z dP - D_i) scale, PZ = P Z,
//   dq = dS K, dK = dS^T q0, dV = PZ^T dout0, dk = tril(A_k)^T dK, dv = tril(A_v)^T dV,
//   da_k = tril(sum_{b(,h)} dK k0^T), da_v = tril(sum_{b(,h)} dV v0^T).
//
// Headers: at::cuda::getCurrentCUDAStream() is c10::cuda's (torch's Macros.h puts
// `using namespace c10::cuda` into at::cuda), so <c10/cuda/CUDAStream.h> suffices.
// <ATen/cuda/CUDAContext.h> is deliberately not included: it pulls in the cuBLAS / cuSPARSE
// headers, which a bare CUDA toolkit (nvcc + cudart) lacks; every GEMM here goes through ATen.
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <c10/macros/Macros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/types.h>

#include <cstdint>
#include <limits>

#include "pka_checks.h"
#include "pka_dropout.h"
#include "pka_fused.cuh"
#include "pka_mixing.h"

namespace pka {
namespace {

using at::Tensor;

// ---------------------------------------------------------------------------------------------
// Row kernels
// ---------------------------------------------------------------------------------------------

constexpr int kMaxThreads = 256;  // threads per row block; a multiple of 32, at most 1024

// Plain kernel arguments shared by both row kernels. Rows are numbered r = (b * H + h) * T + i,
// matching the contiguous [B, H, T, *] layouts of S, P, lse, out and dout.
struct RowParams {
  int64_t H, T, D;
  const int64_t* lengths;  // device [B] int64, or nullptr: no padding (s_b = 0)
  double scale;
  bool dropout;        // dropout_p > 0
  uint64_t seed;       // pka::seed_value(seed)
  uint32_t threshold;  // pka::dropout_threshold(dropout_p)
  double keep_scale;   // 1 / (1 - dropout_p)
};

__device__ __forceinline__ float dev_exp(float x) { return ::expf(x); }
__device__ __forceinline__ double dev_exp(double x) { return ::exp(x); }
__device__ __forceinline__ float dev_log(float x) { return ::logf(x); }
__device__ __forceinline__ double dev_log(double x) { return ::log(x); }

struct MaxOp {
  // Same selection as std::max(a, b) on the CPU path.
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a < b ? b : a; }
};
struct SumOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};

// Reduces `val` over the whole block and returns the result in every thread. Requirements: every
// thread of the block calls it (it contains __syncthreads), blockDim.x is a multiple of 32 and at
// most 1024, `shared` holds 32 elements. The xor butterfly combines op(v_l, v_{l^o}) on lane l and
// op(v_{l^o}, v_l) on lane l^o; max and + are commutative, so all lanes (and all warps, which read
// the same shared values) end with bit-identical results.
template <typename T, typename Op>
__device__ __forceinline__ T block_reduce(T val, Op op, T identity, T* shared) {
  const unsigned lane = threadIdx.x & 31u;
  const unsigned warp = threadIdx.x >> 5;
  const unsigned nwarps = blockDim.x >> 5;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1)
    val = op(val, __shfl_xor_sync(0xffffffffu, val, offset));
  __syncthreads();  // every reader of `shared` from a previous call is done
  if (lane == 0) shared[warp] = val;
  __syncthreads();
  val = lane < nwarps ? shared[lane] : identity;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1)
    val = op(val, __shfl_xor_sync(0xffffffffu, val, offset));
  return val;
}

struct RowIndex {
  int64_t r, b, h, i, s;
};

__device__ __forceinline__ RowIndex row_index(const RowParams& p) {
  RowIndex x;
  x.r = static_cast<int64_t>(blockIdx.x);
  x.i = x.r % p.T;
  const int64_t bh = x.r / p.T;
  x.h = bh % p.H;
  x.b = bh / p.H;
  const int64_t len = p.lengths != nullptr ? p.lengths[x.b] : p.T;
  CUDA_KERNEL_ASSERT_MSG(len >= 0 && len <= p.T, "pka_ext: lengths[b] must lie in [0, T]");
  x.s = p.T - len;
  return x;
}

// Masked softmax rows, in place: on entry SP[r, :] holds the raw scores S = q K^T of row r, on
// exit the probabilities P (dropout applied, scaled by 1/(1-p)), 0 at invisible keys. One block
// per row; lse[r] = max + log(sum) of the scaled visible scores, 0 on empty rows.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kMaxThreads)
    softmax_fwd_rows(const RowParams p, scalar_t* __restrict__ SP, acc_t* __restrict__ lse) {
  __shared__ acc_t red[32];
  const RowIndex x = row_index(p);
  const int64_t T = p.T;
  scalar_t* row = SP + x.r * T;
  const acc_t zero = acc_t(0);
  if (x.i < x.s) {  // a padded query: no visible key. Uniform over the block, no barrier inside.
    for (int64_t j = threadIdx.x; j < T; j += blockDim.x) row[j] = static_cast<scalar_t>(zero);
    if (threadIdx.x == 0) lse[x.r] = zero;
    return;
  }
  // Visible keys: j in [s, i], never empty since s <= i.
  const acc_t scale = static_cast<acc_t>(p.scale);
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  for (int64_t j = x.s + threadIdx.x; j <= x.i; j += blockDim.x)
    m = MaxOp()(m, static_cast<acc_t>(row[j]) * scale);
  m = block_reduce(m, MaxOp(), -std::numeric_limits<acc_t>::infinity(), red);
  acc_t sum = zero;
  for (int64_t j = x.s + threadIdx.x; j <= x.i; j += blockDim.x)
    sum += dev_exp(static_cast<acc_t>(row[j]) * scale - m);
  // The barriers inside block_reduce also order every read of `row` above before the writes below.
  sum = block_reduce(sum, SumOp(), zero, red);
  // sum >= 1 (the max term contributes exp(0)), so log and division are safe.
  if (threadIdx.x == 0) lse[x.r] = m + dev_log(sum);
  const acc_t inv = acc_t(1) / sum;
  const acc_t keep_scale = static_cast<acc_t>(p.keep_scale);
  const uint32_t key =
      p.dropout ? dropout_row_key(p.seed, static_cast<uint32_t>(x.b), static_cast<uint32_t>(x.h),
                                  static_cast<uint32_t>(x.i))
                : 0u;
  // Each element is read and then written by the same thread.
  for (int64_t j = threadIdx.x; j < T; j += blockDim.x) {
    acc_t val = zero;
    if (j >= x.s && j <= x.i) {
      val = dev_exp(static_cast<acc_t>(row[j]) * scale - m) * inv;
      if (p.dropout)
        val = dropout_keep(key, static_cast<uint32_t>(j), p.threshold) ? val * keep_scale : zero;
    }
    row[j] = static_cast<scalar_t>(val);
  }
}

// Softmax backward rows, in place: on entry SPZ[r, :] holds the raw scores S and dPS[r, :] holds
// dP = dout V^T; on exit SPZ holds P * Z and dPS holds dS = P (Z dP - D_i) scale, where
// P = exp(scale S - lse), Z = keep / (1 - p) (1 without dropout) and D_i = dout_i . out_i. Both are
// 0 at invisible keys and on empty rows. One block per row.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kMaxThreads)
    softmax_bwd_rows(const RowParams p, scalar_t* __restrict__ SPZ, scalar_t* __restrict__ dPS,
                     const acc_t* __restrict__ lse, const scalar_t* __restrict__ out,
                     const scalar_t* __restrict__ dout) {
  __shared__ acc_t red[32];
  const RowIndex x = row_index(p);
  const int64_t T = p.T;
  scalar_t* srow = SPZ + x.r * T;
  scalar_t* dprow = dPS + x.r * T;
  const acc_t zero = acc_t(0);
  if (x.i < x.s) {  // uniform over the block
    for (int64_t j = threadIdx.x; j < T; j += blockDim.x) {
      srow[j] = static_cast<scalar_t>(zero);
      dprow[j] = static_cast<scalar_t>(zero);
    }
    return;
  }
  const scalar_t* orow = out + x.r * p.D;
  const scalar_t* dorow = dout + x.r * p.D;
  acc_t di = zero;
  for (int64_t c = threadIdx.x; c < p.D; c += blockDim.x)
    di += static_cast<acc_t>(dorow[c]) * static_cast<acc_t>(orow[c]);
  di = block_reduce(di, SumOp(), zero, red);
  const acc_t scale = static_cast<acc_t>(p.scale);
  const acc_t l = lse[x.r];
  const acc_t keep_scale = static_cast<acc_t>(p.keep_scale);
  const uint32_t key =
      p.dropout ? dropout_row_key(p.seed, static_cast<uint32_t>(x.b), static_cast<uint32_t>(x.h),
                                  static_cast<uint32_t>(x.i))
                : 0u;
  // Each element of both rows is read and then written by the same thread.
  for (int64_t j = threadIdx.x; j < T; j += blockDim.x) {
    acc_t pz = zero, ds = zero;
    if (j >= x.s && j <= x.i) {
      const acc_t prob = dev_exp(static_cast<acc_t>(srow[j]) * scale - l);
      const acc_t z = p.dropout
                          ? (dropout_keep(key, static_cast<uint32_t>(j), p.threshold) ? keep_scale
                                                                                     : zero)
                          : acc_t(1);
      pz = prob * z;
      ds = prob * (z * static_cast<acc_t>(dprow[j]) - di) * scale;
    }
    srow[j] = static_cast<scalar_t>(pz);
    dprow[j] = static_cast<scalar_t>(ds);
  }
}

int row_threads(int64_t T) {
  // One warp at least; at most kMaxThreads; a multiple of 32 (block_reduce needs it).
  const int64_t want = ((T + 31) / 32) * 32;
  return static_cast<int>(want < 32 ? 32 : (want > kMaxThreads ? kMaxThreads : want));
}

unsigned row_blocks(const Dims& d) {
  const int64_t rows = d.B * d.H * d.T;
  TORCH_CHECK(rows <= static_cast<int64_t>(std::numeric_limits<int32_t>::max()),
              "pka CUDA: B * H * T = ", rows, " rows exceed the grid limit of 2^31 - 1");
  return static_cast<unsigned>(rows);
}

// ---------------------------------------------------------------------------------------------
// Host side: ATen glue
// ---------------------------------------------------------------------------------------------

void check_cuda_dtype(const Tensor& q, double dropout_p, const char* op) {
  const auto t = q.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16, op,
              " on CUDA supports float32, float64, float16 and bfloat16, got q of dtype ", t);
  TORCH_CHECK(q.is_cuda(), op, ": the CUDA implementation got q on ", q.device());
  // The kernels scale kept probabilities by 1 / (1 - p) in the input dtype.
  TORCH_CHECK(t != at::kHalf || 1.0 / (1.0 - dropout_p) <= 65504.0, op, ": dropout_p = ",
              dropout_p, " makes the keep scale 1 / (1 - dropout_p) overflow float16; use "
              "bfloat16 or float32");
}

// The range check 0 <= lengths[b] <= T. CPU lengths: here, with an error naming the element.
// Device lengths: by the kernels, which assert it as they read them (a device-side assertion);
// copying them to the host here would synchronise the stream on every call, which a training
// step with device-side lengths (the recommender's) would pay in every layer, forward and backward.
// At T = 0 no kernel reads them, so they are checked here.
void check_lengths_without_sync(const std::optional<Tensor>& lengths, const Dims& d) {
  if (lengths.has_value() && (lengths->is_cpu() || d.T == 0)) (void)host_lengths(lengths, d);
}

bool use_fused(const Tensor& q, const Dims& d) {
  if (env_switch("PKA_CUDA_UNFUSED", {"0", "1"}, "0 or 1") == "1") return false;
  return fused_supported(q, d);
}

at::ScalarType lse_dtype(const Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// The lower triangle as [Hk, T, T], contiguous.
Tensor tril_heads(const Tensor& a) {
  Tensor t = a.tril();
  return (t.dim() == 2 ? t.unsqueeze(0) : t).contiguous();
}

// What the kernels and the mask need to know about padding.
struct Padding {
  Tensor lengths_dev;  // int64 [B] on q's device; undefined without lengths
  Tensor padded;       // bool [B, 1, T, 1]: true on rows i < s_b; undefined without lengths
};

Padding make_padding(const std::optional<Tensor>& lengths, const Tensor& q, const Dims& d) {
  Padding pad;
  if (!lengths.has_value()) return pad;
  pad.lengths_dev = lengths->to(q.device(), at::kLong).contiguous();
  const Tensor pos = at::arange(d.T, pad.lengths_dev.options());             // [T]
  const Tensor start = (d.T - pad.lengths_dev).unsqueeze(1);                  // [B, 1]
  pad.padded = pos.unsqueeze(0).lt(start).view({d.B, 1, d.T, 1});             // [B, 1, T, 1]
  return pad;
}

// x with the padded rows set to 0 (a new tensor); x itself without padding.
Tensor zero_padded(const Tensor& x, const Padding& pad) {
  return pad.padded.defined() ? x.masked_fill(pad.padded, 0) : x;
}

// Sets the padded rows of x (contiguous, [B, H, T, D]) to 0 in place.
void zero_padded_(Tensor& x, const Padding& pad) {
  if (pad.padded.defined()) x.masked_fill_(pad.padded, 0);
}

RowParams make_params(const Dims& d, const Padding& pad, double scale, double dropout_p,
                      const std::optional<Tensor>& seed) {
  RowParams p;
  p.H = d.H;
  p.T = d.T;
  p.D = d.D;
  p.lengths = pad.lengths_dev.defined() ? pad.lengths_dev.data_ptr<int64_t>() : nullptr;
  p.scale = scale;
  p.dropout = dropout_p > 0.0;
  p.seed = seed_value(seed);
  p.threshold = dropout_threshold(dropout_p);
  p.keep_scale = dropout_p > 0.0 ? 1.0 / (1.0 - dropout_p) : 1.0;
  return p;
}

std::tuple<Tensor, Tensor> pka_fwd_cuda(const Tensor& q, const Tensor& k, const Tensor& v,
                                        const Tensor& a_k, const Tensor& a_v,
                                        const std::optional<Tensor>& lengths, double scale,
                                        double dropout_p, const std::optional<Tensor>& seed) {
  const NoAutocast no_autocast;
  const Dims d = check_inputs(q, k, v, a_k, a_v, lengths, scale, dropout_p, seed);
  check_cuda_dtype(q, dropout_p, "pka_fwd");
  c10::cuda::CUDAGuard device_guard(q.device());
  check_lengths_without_sync(lengths, d);
  if (use_fused(q, d)) return pka_fwd_fused(q, k, v, a_k, a_v, lengths, d, scale, dropout_p, seed);
  const Padding pad = make_padding(lengths, q, d);
  const RowParams params = make_params(d, pad, scale, dropout_p, seed);

  const Tensor Ak = tril_heads(a_k), Av = tril_heads(a_v);
  const Tensor q0 = zero_padded(q, pad);
  const Tensor K = mix(Ak, zero_padded(k, pad), d);                 // [B, H, T, D]
  const Tensor V = mix(Av, zero_padded(v, pad), d);
  Tensor SP = at::matmul(q0, K.transpose(-1, -2)).contiguous();     // [B, H, T, T] scores
  Tensor lse = at::empty({d.B, d.H, d.T}, q.options().dtype(lse_dtype(q)));

  const unsigned blocks = row_blocks(d);
  if (blocks > 0) {
    const int threads = row_threads(d.T);
    cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "pka_fwd_cuda", [&] {
      using acc_t = at::acc_type<scalar_t, true>;
      softmax_fwd_rows<scalar_t, acc_t><<<blocks, threads, 0, stream>>>(
          params, SP.data_ptr<scalar_t>(), lse.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  // SP now holds P. Padded query rows of P are 0, so their output rows already are; the mask makes
  // "exactly 0" independent of the GEMM.
  Tensor out = at::matmul(SP, V).contiguous();
  zero_padded_(out, pad);
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> pka_bwd_cuda(
    const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& a_k,
    const Tensor& a_v, const std::optional<Tensor>& lengths, const Tensor& out, const Tensor& lse,
    double scale, double dropout_p, const std::optional<Tensor>& seed) {
  const NoAutocast no_autocast;
  const Dims d = check_inputs(q, k, v, a_k, a_v, lengths, scale, dropout_p, seed);
  check_cuda_dtype(q, dropout_p, "pka_bwd");
  check_backward_inputs(dout, out, lse, q, d, lse_dtype(q));
  TORCH_CHECK(dout.device() == q.device() && out.device() == q.device() &&
                  lse.device() == q.device(),
              "dout, out and lse must be on q's device ", q.device(), ", got dout on ",
              dout.device(), ", out on ", out.device(), ", lse on ", lse.device());
  c10::cuda::CUDAGuard device_guard(q.device());
  check_lengths_without_sync(lengths, d);
  if (use_fused(q, d) && !at::globalContext().deterministicAlgorithms())
    return pka_bwd_fused(dout, q, k, v, a_k, a_v, lengths, lse, out, d, scale, dropout_p, seed);
  const Padding pad = make_padding(lengths, q, d);
  const RowParams params = make_params(d, pad, scale, dropout_p, seed);

  const Tensor Ak = tril_heads(a_k), Av = tril_heads(a_v);
  const Tensor q0 = zero_padded(q, pad), k0 = zero_padded(k, pad), v0 = zero_padded(v, pad);
  const Tensor dout0 = zero_padded(dout, pad).contiguous();  // the row kernel reads it raw
  const Tensor out_c = out.contiguous(), lse_c = lse.contiguous();
  const Tensor K = mix(Ak, k0, d), V = mix(Av, v0, d);
  Tensor SPZ = at::matmul(q0, K.transpose(-1, -2)).contiguous();     // S, then P * Z
  Tensor dPS = at::matmul(dout0, V.transpose(-1, -2)).contiguous();  // dP, then dS

  const unsigned blocks = row_blocks(d);
  if (blocks > 0) {
    const int threads = row_threads(d.T);
    cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "pka_bwd_cuda", [&] {
      using acc_t = at::acc_type<scalar_t, true>;
      softmax_bwd_rows<scalar_t, acc_t><<<blocks, threads, 0, stream>>>(
          params, SPZ.data_ptr<scalar_t>(), dPS.data_ptr<scalar_t>(), lse_c.data_ptr<acc_t>(),
          out_c.data_ptr<scalar_t>(), dout0.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  // dS is 0 on padded rows and columns and PZ is 0 on padded rows, so dK and dV are 0 on padded
  // rows too; dk and dv are not (tril(A)^T reaches back into the padding) and are masked below.
  Tensor dq = at::matmul(dPS, K).contiguous();
  const Tensor dK = at::matmul(dPS.transpose(-1, -2), q0);
  const Tensor dV = at::matmul(SPZ.transpose(-1, -2), dout0);
  Tensor dk = mix(Ak.transpose(1, 2), dK, d);
  Tensor dv = mix(Av.transpose(1, 2), dV, d);
  zero_padded_(dq, pad);
  zero_padded_(dk, pad);
  zero_padded_(dv, pad);
  Tensor da_k = kernel_grad(dK, k0, a_k, d, d.Hk);
  Tensor da_v = kernel_grad(dV, v0, a_v, d, d.Hv);
  return {dq, dk, dv, da_k, da_v};
}

}  // namespace
}  // namespace pka

TORCH_LIBRARY_IMPL(pka_ext, CUDA, m) {
  m.impl("pka_fwd", &pka::pka_fwd_cuda);
  m.impl("pka_bwd", &pka::pka_bwd_cuda);
}
