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
// Forward: K and V are mixed in place in their buffers (tiles from the last down, in rounds). Per
//   16-query tile, one warp goes through the visible keys. float16 / bfloat16: 16 keys at a time
//   on mma.sync registers with an online softmax (running row maxima, the output rescaled when
//   one grows), the probabilities packed straight into the operand of P V. float32 (and 16-bit
//   with PKA_SMEM_SCORES=1): two passes, 32 keys at a time, through shared memory: the row maxima,
//   then the probabilities with those maxima, accumulating P V in registers. Either way the row
//   sums l are of the un-dropped probabilities; dropout multiplies the probabilities by
//   keep / (1 - p) before they meet V, and the row is divided by l at the end, exactly the CPU
//   op's dropout(softmax(.)) V. lse = max + log(l) is written in fp32.
// Backward: pass 1 gives every warp whole key tiles (dK_mixed, dV_mixed summed over query tiles
//   without atomics, accumulated in registers; for 16-bit types from S^T = K Q^T and dP^T = V dO^T
//   on mma.sync registers, so that P Z and dS are the operands of the next products as they
//   are); pass 2 gives it query tiles (dq); then
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
// float16 / bfloat16 products run on tensor cores (WMMA 16x16x16 for the mixing and the kernel
// gradients, mma.sync m16n8k16 for the attention; fp32 accumulation); float32 runs the same tile
// algorithm on CUDA cores, because TF32 would miss the op's fp32 accuracy.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "pka_fused.cuh"
#include "pka_fused_host.cuh"

namespace pka {

using at::Tensor;
using namespace fused;

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
      fits = SM::fwd(padded_T(d), 0, 8) <= limit && SM::bwd(padded_T(d), 0, 4) <= limit;
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
  const Inputs in = prepare(q_, k_, v_, a_k, a_v, lengths, d);
  const Tensor& q = in.q;
  Tensor out = at::empty({d.B, d.H, d.T, d.D}, q.options());
  Tensor lse = at::empty({d.B, d.H, d.T}, q.options().dtype(at::kFloat));
  PKA_DISPATCH_FUSED(q.scalar_type(), "pka_fwd_fused", [&] {
    using T = typename Native<scalar_t>::type;
    const bool built = fwd_typed<T>(in, d, scale, dropout_p, seed, out, lse);
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
  const Inputs in = prepare(q_, k_, v_, a_k, a_v, lengths, d);
  const Tensor& q = in.q;
  const Tensor dout = contiguous16(dout_), out = contiguous16(out_), lse = lse_.contiguous();
  Tensor dq = at::empty_like(q), dk = at::empty_like(q), dv = at::empty_like(q);
  auto f32 = q.options().dtype(at::kFloat);
  Tensor dak = at::zeros({d.Hk, d.T, d.T}, f32), dav = at::zeros({d.Hv, d.T, d.T}, f32);
  const BwdTensors t{dout, out, lse, dq, dk, dv, dak, dav};
  PKA_DISPATCH_FUSED(q.scalar_type(), "pka_bwd_fused", [&] {
    using T = typename Native<scalar_t>::type;
    const bool built = bwd_typed<T>(in, d, scale, dropout_p, seed, t);
    TORCH_CHECK(built, "pka fused CUDA kernels: no kernel for head dim ", d.D);
  });
  Tensor da_k = dak.to(q.scalar_type()).view(a_k.sizes());
  Tensor da_v = dav.to(q.scalar_type()).view(a_v.sizes());
  return {dq, dk, dv, da_k, da_v};
}

}  // namespace pka
