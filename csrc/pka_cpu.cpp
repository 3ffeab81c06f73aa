// CPU kernels for positional-kernel attention.
//
// Work is split over (batch, head) pairs with at::parallel_for. For one pair the sequence occupies
// rows s = T - lengths[b] ... T-1, so every product below runs on the L = lengths[b] valid rows only:
// padding costs nothing. Per pair the kernel holds L x d mixed keys/values and one L x L score block
// in thread-local buffers (never B*H*T*T), and the dense products go through at::mm_out on views of
// those buffers, so the matrix work runs in the BLAS torch was built with.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <cmath>
#include <limits>
#include <vector>

#include "pka_checks.h"
#include "pka_dropout.h"

namespace pka {
namespace {

using at::Tensor;

void check_cpu_dtype(const Tensor& q, const char* op) {
  const auto t = q.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf, op,
              " on CPU supports float32, float64, bfloat16 and float16, got q of dtype ", t);
}

// bfloat16 / float16 (CPU autocast) run the float32 kernels on upcast copies: the CPU has no
// 16-bit GEMM worth using here, and one rounding of each result is more accurate than 16-bit
// intermediates. lse stays float32, as on CUDA.
bool is_16bit(const Tensor& t) {
  return t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf;
}

Tensor to_float(const Tensor& t) { return t.to(at::kFloat); }

// Lower triangle as [Hk, T, T]: mixing with it reads only j <= i, whatever the upper part holds.
Tensor tril_heads(const Tensor& a) {
  Tensor t = a.tril();
  return (t.dim() == 2 ? t.unsqueeze(0) : t).contiguous();
}

Tensor block(const Tensor& m, int64_t s, int64_t L) { return m.narrow(0, s, L).narrow(1, s, L); }

// Shapes a [rows, cols] contiguous view over the front of a flat thread-local buffer.
Tensor scratch(const Tensor& buf, int64_t rows, int64_t cols) {
  return buf.narrow(0, 0, rows * cols).view({rows, cols});
}

// at::mm_out wants an lvalue; our destinations are views of buffers and outputs, written in place.
void mm_into(Tensor dst, const Tensor& a, const Tensor& b) { at::mm_out(dst, a, b); }

struct Dropout {
  bool on;
  uint64_t seed;
  uint32_t threshold;
  double keep_scale;  // 1 / (1 - p)
};

Dropout make_dropout(double p, const std::optional<Tensor>& seed) {
  return Dropout{p > 0.0, seed_value(seed), dropout_threshold(p), p > 0.0 ? 1.0 / (1.0 - p) : 1.0};
}

// Rows of S (L x L with row stride ld, raw scores) become probabilities P in place: causal, max-subtracted, with the
// dropout mask and 1/(1-p) applied after normalisation. Writes lse = m + log(sum) per row.
template <typename scalar_t>
void softmax_rows(scalar_t* S, int64_t L, int64_t ld, int64_t s, int64_t b, int64_t h,
                  scalar_t scale, const Dropout& drop, scalar_t* lse) {
  for (int64_t i = 0; i < L; ++i) {
    scalar_t* row = S + i * ld;
    scalar_t m = -std::numeric_limits<scalar_t>::infinity();
    for (int64_t j = 0; j <= i; ++j) m = std::max(m, row[j] * scale);
    scalar_t sum = 0;
    for (int64_t j = 0; j <= i; ++j) {
      row[j] = std::exp(row[j] * scale - m);
      sum += row[j];
    }
    // sum >= 1 because the max term contributes exp(0), so the log and division are safe.
    lse[i] = m + std::log(sum);
    const scalar_t inv = scalar_t(1) / sum;
    if (drop.on) {
      const uint32_t key = dropout_row_key(drop.seed, b, h, s + i);
      const scalar_t kept = inv * static_cast<scalar_t>(drop.keep_scale);
      for (int64_t j = 0; j <= i; ++j)
        row[j] = dropout_keep(key, s + j, drop.threshold) ? row[j] * kept : scalar_t(0);
    } else {
      for (int64_t j = 0; j <= i; ++j) row[j] *= inv;
    }
    for (int64_t j = i + 1; j < L; ++j) row[j] = 0;
  }
}

// ---------------------------------------------------------------------------------------------
// Short sequences: whole-batch products
// ---------------------------------------------------------------------------------------------
// For small T the per-(batch, head) products below are tiny and per-call overhead dominates, so
// short sequences run a few whole-batch products on padded [B, H, T, *] tensors, and the same row
// functions on each pair's valid L x L block. The kernels are applied to the score-shaped side,
// S = q (A_k k)^T = (q k^T) A_k^T and O = P (A_v v) = (P A_v) v, so that with a shared kernel each
// mixing is one [B*H*T, T] x [T, T] GEMM on a contiguous tensor (no per-pair copies of A, no
// transposes to a time-major layout), and for T <= d it is also the cheaper order. Padded rows of
// k, v (and, in the backward, q and dout) are zeroed in the copies these products read, so padding
// contributes nothing whatever it holds. Memory is a few B*H*T*T tensors, small exactly when this
// path is chosen.
constexpr int64_t kDenseMaxT = 64;

bool use_dense(const Dims& d) { return d.T <= kDenseMaxT; }

// Sets each sequence's padded rows (t < T - lengths[b]) of a contiguous [B, H, T, C] tensor to 0.
template <typename scalar_t>
void zero_padded_rows(Tensor& x, const std::vector<int64_t>& lens, const Dims& d) {
  scalar_t* p = x.data_ptr<scalar_t>();
  const int64_t C = x.size(3);
  at::parallel_for(0, d.B * d.H, 16, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh)
      std::fill(p + bh * d.T * C, p + (bh * d.T + d.T - lens[bh / d.H]) * C, scalar_t(0));
  });
}

// Contiguous copy of x [B, H, T, D] with the padded rows zeroed, in one pass over x.
template <typename scalar_t>
Tensor zero_padded_copy(const Tensor& x, const std::vector<int64_t>& lens, const Dims& d) {
  const Tensor xc = x.contiguous();
  Tensor y = at::empty_like(xc);
  const scalar_t* src = xc.data_ptr<scalar_t>();
  scalar_t* dst = y.data_ptr<scalar_t>();
  const int64_t T = d.T, D = d.D;
  at::parallel_for(0, d.B * d.H, 16, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t pad = (T - lens[bh / d.H]) * D, base = bh * T * D;
      std::fill(dst + base, dst + base + pad, scalar_t(0));
      std::copy(src + base + pad, src + base + T * D, dst + base + pad);
    }
  });
  return y;
}

// The right operand that makes at::matmul(X, ...) compute X A_h for every (batch, head) pair of
// X [B, H, T, T], given A [Hk, T, T] (a view, transposes allowed): a shared kernel as a 2-D matrix,
// so that the batch folds into one GEMM; per-head kernels broadcast over the batch.
Tensor per_pair(const Tensor& A) { return A.size(0) == 1 ? A[0] : A; }

// Everything of a pair's [T, T] matrix M outside the valid block [s:, s:] set to 0.
template <typename scalar_t>
void zero_outside_block(scalar_t* M, int64_t T, int64_t s) {
  std::fill(M, M + s * T, scalar_t(0));
  for (int64_t i = s; i < T; ++i) std::fill(M + i * T, M + i * T + s, scalar_t(0));
}

template <typename scalar_t>
void forward_dense(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& ak,
                   const Tensor& av, const std::vector<int64_t>& lens, const Dims& d, double scale,
                   const Dropout& drop, Tensor& out, Tensor& lse) {
  const int64_t T = d.T;
  const Tensor k0 = zero_padded_copy<scalar_t>(k, lens, d);
  const Tensor v0 = zero_padded_copy<scalar_t>(v, lens, d);
  // Rows of padded queries are overwritten below, so q needs no zeroing. [B, H, T, T]
  Tensor S = at::matmul(at::matmul(q, k0.transpose(-1, -2)), per_pair(ak.transpose(-1, -2)));
  scalar_t* Sp = S.data_ptr<scalar_t>();
  scalar_t* lp = lse.data_ptr<scalar_t>();
  at::parallel_for(0, d.B * d.H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / d.H, h = bh % d.H, L = lens[b], s = T - L;
      scalar_t* M = Sp + bh * T * T;
      zero_outside_block(M, T, s);
      std::fill(lp + bh * T, lp + bh * T + s, scalar_t(0));
      softmax_rows<scalar_t>(M + s * T + s, L, T, s, b, h, static_cast<scalar_t>(scale), drop,
                             lp + bh * T + s);
    }
  });
  // padded rows of P are 0, so theirs in out are exactly 0
  at::matmul_out(out, at::matmul(S, per_pair(av)), v0);
}

template <typename scalar_t>
void forward_cpu(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& ak,
                 const Tensor& av, const std::vector<int64_t>& lens, const Dims& d, double scale,
                 const Dropout& drop, Tensor& out, Tensor& lse) {
  const int64_t T = d.T, D = d.D;
  at::parallel_for(0, d.B * d.H, 1, [&](int64_t begin, int64_t end) {
    Tensor mixed_k = at::empty({T * D}, q.options());
    Tensor mixed_v = at::empty({T * D}, q.options());
    Tensor scores = at::empty({T * T}, q.options());
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / d.H, h = bh % d.H;
      const int64_t L = lens[b], s = T - L;
      Tensor o = out[b][h];
      scalar_t* lse_row = lse.data_ptr<scalar_t>() + bh * T;
      o.narrow(0, 0, s).zero_();
      std::fill(lse_row, lse_row + s, scalar_t(0));
      if (L == 0) continue;
      Tensor qs = q[b][h].narrow(0, s, L);
      Tensor K = scratch(mixed_k, L, D), V = scratch(mixed_v, L, D), S = scratch(scores, L, L);
      mm_into(K, block(ak[d.Hk == 1 ? 0 : h], s, L), k[b][h].narrow(0, s, L));
      mm_into(V, block(av[d.Hv == 1 ? 0 : h], s, L), v[b][h].narrow(0, s, L));
      mm_into(S, qs, K.t());
      softmax_rows<scalar_t>(S.data_ptr<scalar_t>(), L, L, s, b, h, static_cast<scalar_t>(scale),
                             drop, lse_row + s);
      mm_into(o.narrow(0, s, L), S, V);
    }
  });
}

std::tuple<Tensor, Tensor> pka_fwd_cpu(const Tensor& q, const Tensor& k, const Tensor& v,
                                       const Tensor& a_k, const Tensor& a_v,
                                       const std::optional<Tensor>& lengths, double scale,
                                       double dropout_p, const std::optional<Tensor>& seed) {
  const NoAutocast no_autocast;
  const Dims d = check_inputs(q, k, v, a_k, a_v, lengths, dropout_p, seed);
  check_cpu_dtype(q, "pka_fwd");
  if (is_16bit(q)) {
    auto [out, lse] = pka_fwd_cpu(to_float(q), to_float(k), to_float(v), to_float(a_k),
                                  to_float(a_v), lengths, scale, dropout_p, seed);
    return {out.to(q.scalar_type()), lse};
  }
  const auto lens = host_lengths(lengths, d);
  Tensor out = at::empty({d.B, d.H, d.T, d.D}, q.options());
  Tensor lse = at::empty({d.B, d.H, d.T}, q.options());
  const Tensor ak = tril_heads(a_k), av = tril_heads(a_v);
  const Dropout drop = make_dropout(dropout_p, seed);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "pka_fwd_cpu", [&] {
    if (use_dense(d))
      forward_dense<scalar_t>(q, k, v, ak, av, lens, d, scale, drop, out, lse);
    else
      forward_cpu<scalar_t>(q, k, v, ak, av, lens, d, scale, drop, out, lse);
  });
  return {out, lse};
}

// dS = P * (Z * dP - D) * scale, in place over dP, where P = exp(scale * S - lse) on j <= i,
// Z is the dropout factor (mask / (1 - p)) and D_i = dO_i . O_i. Also writes P * Z into PZ, the
// matrix the forward multiplied V by, for dV = (P * Z)^T dO.
template <typename scalar_t>
void softmax_rows_backward(const scalar_t* S, scalar_t* dP, scalar_t* PZ, const scalar_t* lse,
                           const scalar_t* O, const scalar_t* dO, int64_t L, int64_t ld, int64_t D,
                           int64_t s, int64_t b, int64_t h, scalar_t scale, const Dropout& drop) {
  const scalar_t keep_scale = static_cast<scalar_t>(drop.keep_scale);
  for (int64_t i = 0; i < L; ++i) {
    const scalar_t* srow = S + i * ld;
    scalar_t* dprow = dP + i * ld;
    scalar_t* pzrow = PZ + i * ld;
    scalar_t Di = 0;
    for (int64_t c = 0; c < D; ++c) Di += dO[i * D + c] * O[i * D + c];
    const uint32_t key = drop.on ? dropout_row_key(drop.seed, b, h, s + i) : 0;
    for (int64_t j = 0; j <= i; ++j) {
      const scalar_t p = std::exp(srow[j] * scale - lse[i]);
      const scalar_t z =
          drop.on ? (dropout_keep(key, s + j, drop.threshold) ? keep_scale : scalar_t(0))
                  : scalar_t(1);
      pzrow[j] = p * z;
      dprow[j] = p * (z * dprow[j] - Di) * scale;
    }
    for (int64_t j = i + 1; j < L; ++j) pzrow[j] = dprow[j] = 0;
  }
}

template <typename scalar_t>
void backward_cpu(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                  const Tensor& ak, const Tensor& av, const Tensor& out, const Tensor& lse,
                  const std::vector<int64_t>& lens, const Dims& d, double scale,
                  const Dropout& drop, Tensor& dq, Tensor& dk, Tensor& dv, Tensor& dak_parts,
                  Tensor& dav_parts) {
  const int64_t T = d.T, D = d.D;
  at::parallel_for(0, d.B * d.H, 1, [&](int64_t begin, int64_t end) {
    // Each thread owns one slice of the partial kernel gradients: no atomics, no locks.
    Tensor dak_mine = dak_parts[at::get_thread_num()];
    Tensor dav_mine = dav_parts[at::get_thread_num()];
    auto opts = q.options();
    Tensor buf_k = at::empty({T * D}, opts), buf_v = at::empty({T * D}, opts);
    Tensor buf_dk = at::empty({T * D}, opts), buf_dv = at::empty({T * D}, opts);
    Tensor buf_s = at::empty({T * T}, opts), buf_dp = at::empty({T * T}, opts);
    Tensor buf_pz = at::empty({T * T}, opts);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / d.H, h = bh % d.H;
      const int64_t L = lens[b], s = T - L;
      Tensor dq_bh = dq[b][h], dk_bh = dk[b][h], dv_bh = dv[b][h];
      dq_bh.narrow(0, 0, s).zero_();
      dk_bh.narrow(0, 0, s).zero_();
      dv_bh.narrow(0, 0, s).zero_();
      if (L == 0) continue;
      const int64_t hk = d.Hk == 1 ? 0 : h, hv = d.Hv == 1 ? 0 : h;
      Tensor qs = q[b][h].narrow(0, s, L), ks = k[b][h].narrow(0, s, L);
      Tensor vs = v[b][h].narrow(0, s, L), dos = dout[b][h].narrow(0, s, L);
      Tensor os = out[b][h].narrow(0, s, L);
      Tensor Ak = block(ak[hk], s, L), Av = block(av[hv], s, L);
      Tensor K = scratch(buf_k, L, D), V = scratch(buf_v, L, D);
      Tensor dK = scratch(buf_dk, L, D), dV = scratch(buf_dv, L, D);
      Tensor S = scratch(buf_s, L, L), dP = scratch(buf_dp, L, L), PZ = scratch(buf_pz, L, L);
      mm_into(K, Ak, ks);
      mm_into(V, Av, vs);
      mm_into(S, qs, K.t());
      mm_into(dP, dos, V.t());
      softmax_rows_backward<scalar_t>(S.data_ptr<scalar_t>(), dP.data_ptr<scalar_t>(),
                                      PZ.data_ptr<scalar_t>(),
                                      lse.data_ptr<scalar_t>() + bh * T + s,
                                      os.data_ptr<scalar_t>(), dos.data_ptr<scalar_t>(), L, L, D,
                                      s, b, h, static_cast<scalar_t>(scale), drop);
      mm_into(dq_bh.narrow(0, s, L), dP, K);  // dP now holds dS
      mm_into(dK, dP.t(), qs);
      mm_into(dV, PZ.t(), dos);
      mm_into(dk_bh.narrow(0, s, L), Ak.t(), dK);
      mm_into(dv_bh.narrow(0, s, L), Av.t(), dV);
      block(dak_mine[hk], s, L).addmm_(dK, ks.t());
      block(dav_mine[hv], s, L).addmm_(dV, vs.t());
    }
  });
}

// sum over the batch (and over heads when the kernel is shared) of X^T Y for X, Y [B, H, T, T],
// lower triangle: the kernel gradient dA = sum G^T Y when the mixed tensor is A x.
Tensor kernel_grad_dense(const Tensor& X, const Tensor& Y, const Dims& d, int64_t Hk) {
  if (Hk == 1) {
    const int64_t rows = d.B * d.H * d.T;
    return at::mm(X.view({rows, d.T}).t(), Y.view({rows, d.T})).tril_().unsqueeze(0);
  }
  return at::matmul(X.transpose(-1, -2), Y).sum(0).tril_();
}

// The forward's reordering carried through: with S0 = q k^T and dP0 = dout v^T (padding zeroed),
//   S = S0 A_k^T,  dP = dP0 A_v^T,  dq = (dS A_k) k,  dk = (dS A_k)^T q,  dv = (PZ A_v)^T dout,
//   dA_k = sum dS^T S0,  dA_v = sum PZ^T dP0,
// where dS and PZ come from the row function (both 0 outside each pair's valid block).
template <typename scalar_t>
void backward_dense(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                    const Tensor& ak, const Tensor& av, const Tensor& out, const Tensor& lse,
                    const std::vector<int64_t>& lens, const Dims& d, double scale,
                    const Dropout& drop, Tensor& dq, Tensor& dk, Tensor& dv, Tensor& da_k,
                    Tensor& da_v) {
  const int64_t T = d.T, D = d.D;
  const Tensor q0 = zero_padded_copy<scalar_t>(q, lens, d);
  const Tensor k0 = zero_padded_copy<scalar_t>(k, lens, d);
  const Tensor v0 = zero_padded_copy<scalar_t>(v, lens, d);
  const Tensor dout0 = zero_padded_copy<scalar_t>(dout, lens, d);
  Tensor S0 = at::matmul(q0, k0.transpose(-1, -2));     // [B, H, T, T]
  Tensor dP0 = at::matmul(dout0, v0.transpose(-1, -2));  // [B, H, T, T]
  const Tensor S = at::matmul(S0, per_pair(ak.transpose(-1, -2)));
  Tensor dP = at::matmul(dP0, per_pair(av.transpose(-1, -2)));
  Tensor PZ = at::empty_like(S);
  const scalar_t* Sp = S.data_ptr<scalar_t>();
  scalar_t *dPp = dP.data_ptr<scalar_t>(), *PZp = PZ.data_ptr<scalar_t>();
  const scalar_t* lp = lse.data_ptr<scalar_t>();
  const scalar_t* op = out.data_ptr<scalar_t>();
  const scalar_t* dop = dout0.data_ptr<scalar_t>();
  at::parallel_for(0, d.B * d.H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / d.H, h = bh % d.H, L = lens[b], s = T - L;
      const int64_t off = bh * T * T + s * T + s;
      zero_outside_block(dPp + bh * T * T, T, s);
      zero_outside_block(PZp + bh * T * T, T, s);
      softmax_rows_backward<scalar_t>(Sp + off, dPp + off, PZp + off, lp + bh * T + s,
                                      op + (bh * T + s) * D, dop + (bh * T + s) * D, L, T, D, s,
                                      b, h, static_cast<scalar_t>(scale), drop);
    }
  });
  // dP now holds dS.
  da_k = kernel_grad_dense(dP, S0, d, d.Hk);
  da_v = kernel_grad_dense(PZ, dP0, d, d.Hv);
  // S0 and dP0 are spent: their buffers take dS A_k and PZ A_v.
  at::matmul_out(S0, dP, per_pair(ak));
  at::matmul_out(dP0, PZ, per_pair(av));
  at::matmul_out(dq, S0, k0);  // dS has zero padded rows, so dq's are 0
  // (dS A_k) and (PZ A_v) reach back into padded columns: their rows of dk, dv are zeroed.
  at::matmul_out(dk, S0.transpose(-1, -2), q0);
  at::matmul_out(dv, dP0.transpose(-1, -2), dout0);
  zero_padded_rows<scalar_t>(dk, lens, d);
  zero_padded_rows<scalar_t>(dv, lens, d);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> pka_bwd_cpu(
    const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& a_k,
    const Tensor& a_v, const std::optional<Tensor>& lengths, const Tensor& out, const Tensor& lse,
    double scale, double dropout_p, const std::optional<Tensor>& seed) {
  const NoAutocast no_autocast;
  const Dims d = check_inputs(q, k, v, a_k, a_v, lengths, dropout_p, seed);
  check_cpu_dtype(q, "pka_bwd");
  // CPU keeps lse in the input dtype (float32 or float64), and in float32 for 16-bit inputs.
  check_backward_inputs(dout, out, lse, q, d, is_16bit(q) ? at::kFloat : q.scalar_type());
  if (is_16bit(q)) {
    const auto dt = q.scalar_type();
    auto [dq, dk, dv, da_k, da_v] =
        pka_bwd_cpu(to_float(dout), to_float(q), to_float(k), to_float(v), to_float(a_k),
                    to_float(a_v), lengths, to_float(out), lse, scale, dropout_p, seed);
    return {dq.to(dt), dk.to(dt), dv.to(dt), da_k.to(dt), da_v.to(dt)};
  }
  const auto lens = host_lengths(lengths, d);
  // Raw-pointer loops read these three; q, k, v go to at::mm_out, which takes any strides.
  const Tensor dout_c = dout.contiguous(), out_c = out.contiguous(), lse_c = lse.contiguous();
  Tensor dq = at::empty({d.B, d.H, d.T, d.D}, q.options());
  Tensor dk = at::empty_like(dq), dv = at::empty_like(dq);
  const Tensor ak = tril_heads(a_k), av = tril_heads(a_v);
  const Dropout drop = make_dropout(dropout_p, seed);
  if (use_dense(d)) {
    Tensor da_k, da_v;
    AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "pka_bwd_cpu", [&] {
      backward_dense<scalar_t>(dout_c, q, k, v, ak, av, out_c, lse_c, lens, d, scale, drop, dq, dk,
                               dv, da_k, da_v);
    });
    return {dq, dk, dv, da_k.view(a_k.sizes()), da_v.view(a_v.sizes())};
  }
  const int64_t parts = at::get_num_threads();
  Tensor dak_parts = at::zeros({parts, d.Hk, d.T, d.T}, q.options());
  Tensor dav_parts = at::zeros({parts, d.Hv, d.T, d.T}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "pka_bwd_cpu", [&] {
    backward_cpu<scalar_t>(dout_c, q, k, v, ak, av, out_c, lse_c, lens, d, scale, drop, dq, dk, dv,
                           dak_parts, dav_parts);
  });
  Tensor da_k = dak_parts.sum(0).tril_().view(a_k.sizes());
  Tensor da_v = dav_parts.sum(0).tril_().view(a_v.sizes());
  return {dq, dk, dv, da_k, da_v};
}

}  // namespace
}  // namespace pka

TORCH_LIBRARY_IMPL(pka_ext, CPU, m) {
  m.impl("pka_fwd", &pka::pka_fwd_cpu);
  m.impl("pka_bwd", &pka::pka_bwd_cpu);
}
