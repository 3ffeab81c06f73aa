// CPU kernels for positional-kernel attention.
//
// Two paths, both exact on each sequence's valid rows (left padding: rows s = T - lengths[b] ...
// T-1) and blind to whatever the padded rows hold:
//   - T <= 24: a few whole-batch products on zero-padded [B, H, T, *] copies;
//   - T > 24: sequences sorted by length and cut into groups of similar length, each group run as
//     batched products over its last Lg positions: padding costs little, memory is bounded.
// The dense products go through ATen (mm, bmm, matmul) and so run in the BLAS torch was built with;
// the row-wise softmax and its backward are the loops below, parallel over (batch, head) pairs.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
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

struct Dropout {
  bool on;
  uint64_t seed;
  uint32_t threshold;
  double keep_scale;  // 1 / (1 - p)
};

Dropout make_dropout(double p, const std::optional<Tensor>& seed) {
  return Dropout{p > 0.0, seed_value(seed), dropout_threshold(p), p > 0.0 ? 1.0 / (1.0 - p) : 1.0};
}

// Rows of S (L x L with row stride ld, raw scores) become probabilities P in place: causal,
// max-subtracted, with the dropout mask and 1/(1-p) applied after normalisation. Writes
// lse = m + log(sum) per row.
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

// dS = P * (Z * dP - D) * scale, in place over dP, where P is the row's softmax on j <= i, Z is the
// dropout factor (mask / (1 - p)) and D_i = sum_j P_ij Z_ij dP_ij. Also writes P * Z into PZ, the
// matrix the forward multiplied V by, for dV = (P * Z)^T dO.
// P is exp(scale * S - lse) divided by its row sum: lse is rounded to the precision of its
// magnitude, which scales every exp() of the row by a common factor off 1 by up to |lse| * eps, and
// the division removes it, so P sums to 1 as the forward's does. D_i equals dO_i . O_i, but it is
// formed from the row's own P Z and dP rather than from the saved output: it then cancels against
// Z dP as exactly as the rounding allows (a row with one dominant key, or a sequence's first row,
// gets dS = 0, not the rounding error of O times |K|), and no rounded copy of O enters (for 16-bit
// inputs out is stored in the 16-bit dtype, and in float16 it may have overflowed to Inf).
template <typename scalar_t>
void softmax_rows_backward(const scalar_t* S, scalar_t* dP, scalar_t* PZ, const scalar_t* lse,
                           int64_t L, int64_t ld, int64_t s, int64_t b, int64_t h, scalar_t scale,
                           const Dropout& drop) {
  const scalar_t keep_scale = static_cast<scalar_t>(drop.keep_scale);
  // The row's dropout factors, hashed once for both passes (empty without dropout).
  std::vector<scalar_t> z(drop.on ? L : 0);
  for (int64_t i = 0; i < L; ++i) {
    const scalar_t* srow = S + i * ld;
    scalar_t* dprow = dP + i * ld;
    scalar_t* pzrow = PZ + i * ld;
    if (drop.on) {
      const uint32_t key = dropout_row_key(drop.seed, b, h, s + i);
      for (int64_t j = 0; j <= i; ++j)
        z[j] = dropout_keep(key, s + j, drop.threshold) ? keep_scale : scalar_t(0);
    }
    // First pass: the unnormalised exp() into PZ, their sum, and D_i times that sum. With the
    // forward's lse (the scores recomputed here are the forward's), the max term is 1 / (the
    // forward's row sum) >= 1 / L, so the sum is positive.
    scalar_t sum = 0, Dsum = 0;
    for (int64_t j = 0; j <= i; ++j) {
      const scalar_t e = std::exp(srow[j] * scale - lse[i]);
      pzrow[j] = e;
      sum += e;
      Dsum += e * (drop.on ? z[j] : scalar_t(1)) * dprow[j];
    }
    const scalar_t inv = scalar_t(1) / sum, Di = Dsum * inv;
    for (int64_t j = 0; j <= i; ++j) {
      const scalar_t p = pzrow[j] * inv, zj = drop.on ? z[j] : scalar_t(1);
      pzrow[j] = p * zj;
      dprow[j] = p * (zj * dprow[j] - Di) * scale;
    }
    for (int64_t j = i + 1; j < L; ++j) pzrow[j] = dprow[j] = 0;
  }
}

// ---------------------------------------------------------------------------------------------
// Short sequences: whole-batch products
// ---------------------------------------------------------------------------------------------
// For small T, products per (batch, head) pair are tiny and per-call overhead dominates, so
// short sequences run a few whole-batch products on padded [B, H, T, *] tensors, and the same row
// functions on each pair's valid L x L block. The kernels are applied to the score-shaped side,
// S = q (A_k k)^T = (q k^T) A_k^T and O = P (A_v v) = (P A_v) v, so that with a shared kernel each
// mixing is one [B*H*T, T] x [T, T] GEMM on a contiguous tensor (no per-pair copies of A, no
// transposes to a time-major layout), and for T <= d it is also the cheaper order. Padded rows of
// k, v (and, in the backward, q and dout) are zeroed in the copies these products read, so padding
// contributes nothing whatever it holds. Memory is a few B*H*T*T tensors, small exactly when this
// path is chosen. The grouped path below measured faster from T = 28 on (T^3 mixing and padding
// overtake its extra calls there); they were level at T = 24.
constexpr int64_t kDenseMaxT = 24;

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
                    const Tensor& ak, const Tensor& av, const Tensor& lse,
                    const std::vector<int64_t>& lens, const Dims& d, double scale,
                    const Dropout& drop, Tensor& dq, Tensor& dk, Tensor& dv, Tensor& da_k,
                    Tensor& da_v) {
  const int64_t T = d.T;
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
  at::parallel_for(0, d.B * d.H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / d.H, h = bh % d.H, L = lens[b], s = T - L;
      const int64_t off = bh * T * T + s * T + s;
      zero_outside_block(dPp + bh * T * T, T, s);
      zero_outside_block(PZp + bh * T * T, T, s);
      softmax_rows_backward<scalar_t>(Sp + off, dPp + off, PZp + off, lp + bh * T + s, L, T, s,
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

// ---------------------------------------------------------------------------------------------
// Longer sequences: groups of similar length
// ---------------------------------------------------------------------------------------------
// Past kDenseMaxT the whole-batch products cost T^3 per pair for the score-side mixing and
// B*H*T*T memory, while products per (batch, head) pair are too small to outweigh their per-call
// overhead. So sequences are sorted by length and cut into groups of similar length, and each
// group runs batched products over its last Lg positions (left padding puts every valid row
// there), on zero-padded copies laid out so that mixing with a shared kernel is one GEMM:
//   keys and values time-last, [H, G, D, Lg]: the mixed K^T = k^T A^T is [H*G*D, Lg] x [Lg, Lg];
//   queries and dout time-major, [H, G, Lg, D].
// The three constants below were tuned on a 2-core EPYC, B=64, H=2, lengths uniform in [1, T]
// (fwd+bwd, configurations interleaved in one process); the results were flat around them.
// Every product here has a triangular operand or needs only a triangular result; cutting time into
// tiles to skip the zero blocks was measured 2-30 % slower with two threads at T = 128-512 (the
// smaller calls cost more than the 25-45 % of multiply-adds they save), so it is not done.
//
// A group's score-shaped buffers hold at most kGroupElems elements (2 MiB of float32), so memory
// does not grow with B; a single sequence may exceed it (its H blocks of Lg x Lg are the floor).
// Larger groups were no faster up to T=200 and 20 % slower at T=512, out of cache.
constexpr int64_t kGroupElems = int64_t(1) << 19;
// A sequence joins the group of a longer one if its L^2 is at least this share of Lg^2 (its padding
// then costs at most 1/kGroupFill - 1 of its own work) ...
constexpr double kGroupFill = 0.7;
// ... or if the group is this short, where a separate group would cost more in calls than padding.
constexpr int64_t kGroupAnyLength = 16;

struct Group {
  std::vector<int64_t> batch;  // batch indices, longest first
  int64_t Lg;                  // the longest length in the group
};

// Non-empty sequences in groups, longest first. Deterministic in lengths alone, so the backward
// forms the forward's groups.
std::vector<Group> length_groups(const std::vector<int64_t>& lens, int64_t H) {
  std::vector<int64_t> order(lens.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return lens[a] > lens[b]; });
  std::vector<Group> groups;
  for (const int64_t b : order) {
    const int64_t L = lens[b];
    if (L == 0) break;
    if (!groups.empty()) {
      Group& g = groups.back();
      const int64_t G = static_cast<int64_t>(g.batch.size());
      const bool similar = L * L >= kGroupFill * g.Lg * g.Lg || g.Lg <= kGroupAnyLength;
      if (similar && (G + 1) * H * g.Lg * g.Lg <= kGroupElems) {
        g.batch.push_back(b);
        continue;
      }
    }
    groups.push_back(Group{{b}, L});
  }
  return groups;
}

// A group's last Lg positions of x [B, H, T, D] (contiguous) as a zero-padded copy, [H, G, Lg, D]
// or, time_last, [H, G, D, Lg]. Every member's padded rows are 0 in it.
template <typename scalar_t>
Tensor gather_group(const Tensor& x, const Group& g, const std::vector<int64_t>& lens,
                    const Dims& d, bool time_last) {
  const int64_t G = static_cast<int64_t>(g.batch.size()), Lg = g.Lg, T = d.T, D = d.D;
  Tensor y = time_last ? at::empty({d.H, G, D, Lg}, x.options())
                       : at::empty({d.H, G, Lg, D}, x.options());
  const scalar_t* src = x.data_ptr<scalar_t>();
  scalar_t* dst = y.data_ptr<scalar_t>();
  at::parallel_for(0, d.H * G, 1, [&](int64_t begin, int64_t end) {
    for (int64_t hg = begin; hg < end; ++hg) {
      const int64_t h = hg / G, b = g.batch[hg % G], r = Lg - lens[b];
      const scalar_t* xs = src + ((b * d.H + h) * T + T - Lg) * D;
      scalar_t* ys = dst + hg * Lg * D;
      if (!time_last) {
        std::fill(ys, ys + r * D, scalar_t(0));
        std::copy(xs + r * D, xs + Lg * D, ys + r * D);
        continue;
      }
      for (int64_t c = 0; c < D; ++c) std::fill(ys + c * Lg, ys + c * Lg + r, scalar_t(0));
      for (int64_t i = r; i < Lg; ++i)
        for (int64_t c = 0; c < D; ++c) ys[c * Lg + i] = xs[i * D + c];
    }
  });
  return y;
}

// The inverse for results: each member's valid rows of y (laid out as gather_group's) written to
// x [B, H, T, D], and its padded rows of x set to 0.
template <typename scalar_t>
void scatter_group(const Tensor& y, Tensor& x, const Group& g, const std::vector<int64_t>& lens,
                   const Dims& d, bool time_last) {
  const int64_t G = static_cast<int64_t>(g.batch.size()), Lg = g.Lg, T = d.T, D = d.D;
  const scalar_t* src = y.data_ptr<scalar_t>();
  scalar_t* dst = x.data_ptr<scalar_t>();
  at::parallel_for(0, d.H * G, 1, [&](int64_t begin, int64_t end) {
    for (int64_t hg = begin; hg < end; ++hg) {
      const int64_t h = hg / G, b = g.batch[hg % G], L = lens[b], r = Lg - L;
      scalar_t* xs = dst + ((b * d.H + h) * T + T - L) * D;  // the first valid row
      const scalar_t* ys = src + hg * Lg * D;
      std::fill(dst + (b * d.H + h) * T * D, xs, scalar_t(0));
      if (!time_last) {
        std::copy(ys + r * D, ys + Lg * D, xs);
        continue;
      }
      for (int64_t i = 0; i < L; ++i)
        for (int64_t c = 0; c < D; ++c) xs[i * D + c] = ys[c * Lg + r + i];
    }
  });
}

// X [H, G, D, Lg] (time last) times each kernel head's block A[s0:, s0:], or its transpose: the
// time mixing of a group, one product over the group's rows per kernel head (a shared kernel,
// Hk = 1, takes all of them in one GEMM).
Tensor mix_time(const Tensor& X, const Tensor& A, int64_t s0, bool transposed) {
  const int64_t Lg = X.size(3);
  const Tensor Ab = A.narrow(1, s0, Lg).narrow(2, s0, Lg);
  return at::bmm(X.view({A.size(0), -1, Lg}), transposed ? Ab.transpose(1, 2) : Ab)
      .view(X.sizes());
}

// dA[s0:, s0:] += sum over the group of dM k^T for the mixing M = A k, from the time-last dM^T and
// k^T [H, G, D, Lg]: one product over the group's rows per kernel head.
void add_kernel_grad(Tensor& dA, const Tensor& dXT, const Tensor& XT, int64_t s0) {
  const int64_t Lg = XT.size(3), Hk = dA.size(0);
  dA.narrow(1, s0, Lg).narrow(2, s0, Lg).baddbmm_(dXT.view({Hk, -1, Lg}).transpose(1, 2),
                                                  XT.view({Hk, -1, Lg}));
}

// Results of sequences of length 0, which no group holds, are all 0.
void zero_empty_sequences(const std::vector<int64_t>& lens, std::initializer_list<Tensor*> xs) {
  for (size_t b = 0; b < lens.size(); ++b)
    if (lens[b] == 0)
      for (Tensor* x : xs) (*x)[b].zero_();
}

template <typename scalar_t>
void forward_grouped(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& ak,
                     const Tensor& av, const std::vector<int64_t>& lens, const Dims& d,
                     double scale, const Dropout& drop, Tensor& out, Tensor& lse) {
  const int64_t T = d.T, D = d.D;
  const Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  zero_empty_sequences(lens, {&out, &lse});
  scalar_t* lp = lse.data_ptr<scalar_t>();
  for (const Group& g : length_groups(lens, d.H)) {
    const int64_t G = static_cast<int64_t>(g.batch.size()), Lg = g.Lg, s0 = T - Lg;
    const Tensor qg = gather_group<scalar_t>(qc, g, lens, d, false);  // [H, G, Lg, D]
    const Tensor kT = mix_time(gather_group<scalar_t>(kc, g, lens, d, true), ak, s0, true);
    const Tensor vT = mix_time(gather_group<scalar_t>(vc, g, lens, d, true), av, s0, true);
    Tensor S = at::bmm(qg.view({-1, Lg, D}), kT.view({-1, D, Lg}));  // [H*G, Lg, Lg]
    scalar_t* Sp = S.data_ptr<scalar_t>();
    at::parallel_for(0, d.H * G, 1, [&](int64_t begin, int64_t end) {
      for (int64_t hg = begin; hg < end; ++hg) {
        const int64_t h = hg / G, b = g.batch[hg % G], L = lens[b], r = Lg - L, s = T - L;
        scalar_t* M = Sp + hg * Lg * Lg;
        scalar_t* lse_row = lp + (b * d.H + h) * T;
        zero_outside_block(M, Lg, r);
        std::fill(lse_row, lse_row + s, scalar_t(0));
        softmax_rows<scalar_t>(M + r * Lg + r, L, Lg, s, b, h, static_cast<scalar_t>(scale), drop,
                               lse_row + s);
      }
    });
    scatter_group<scalar_t>(at::bmm(S, vT.view({-1, D, Lg}).transpose(1, 2)), out, g, lens, d,
                            false);
  }
}

// The forward's products, differentiated with the kernel blocks applied to the time-last side:
//   dq = dS K,  dK^T = q^T dS,  dV^T = dout^T PZ,  dk^T = dK^T A_k,  dv^T = dV^T A_v,
//   dA_k += dK k^T,  dA_v += dV v^T,
// where dS and PZ come from the row function (both 0 outside each pair's valid block).
template <typename scalar_t>
void backward_grouped(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                      const Tensor& ak, const Tensor& av, const Tensor& lse,
                      const std::vector<int64_t>& lens, const Dims& d, double scale,
                      const Dropout& drop, Tensor& dq, Tensor& dk, Tensor& dv, Tensor& da_k,
                      Tensor& da_v) {
  const int64_t T = d.T, D = d.D;
  const Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  zero_empty_sequences(lens, {&dq, &dk, &dv});
  da_k = at::zeros({d.Hk, T, T}, q.options());
  da_v = at::zeros({d.Hv, T, T}, q.options());
  const scalar_t* lp = lse.data_ptr<scalar_t>();
  for (const Group& g : length_groups(lens, d.H)) {
    const int64_t G = static_cast<int64_t>(g.batch.size()), Lg = g.Lg, s0 = T - Lg;
    const Tensor qg = gather_group<scalar_t>(qc, g, lens, d, false).view({-1, Lg, D});
    const Tensor dog = gather_group<scalar_t>(dout, g, lens, d, false).view({-1, Lg, D});
    const Tensor k0T = gather_group<scalar_t>(kc, g, lens, d, true);  // [H, G, D, Lg]
    const Tensor v0T = gather_group<scalar_t>(vc, g, lens, d, true);
    const Tensor kT = mix_time(k0T, ak, s0, true).view({-1, D, Lg});
    const Tensor vT = mix_time(v0T, av, s0, true).view({-1, D, Lg});
    const Tensor S = at::bmm(qg, kT);  // [H*G, Lg, Lg]
    Tensor dP = at::bmm(dog, vT);
    Tensor PZ = at::empty_like(S);
    const scalar_t* Sp = S.data_ptr<scalar_t>();
    scalar_t *dPp = dP.data_ptr<scalar_t>(), *PZp = PZ.data_ptr<scalar_t>();
    at::parallel_for(0, d.H * G, 1, [&](int64_t begin, int64_t end) {
      for (int64_t hg = begin; hg < end; ++hg) {
        const int64_t h = hg / G, b = g.batch[hg % G], L = lens[b], r = Lg - L, s = T - L;
        const int64_t bh = b * d.H + h, off = hg * Lg * Lg + r * Lg + r;
        zero_outside_block(dPp + hg * Lg * Lg, Lg, r);
        zero_outside_block(PZp + hg * Lg * Lg, Lg, r);
        softmax_rows_backward<scalar_t>(Sp + off, dPp + off, PZp + off, lp + bh * T + s, L, Lg,
                                        s, b, h, static_cast<scalar_t>(scale), drop);
      }
    });
    // dP now holds dS.
    scatter_group<scalar_t>(at::bmm(dP, kT.transpose(1, 2)), dq, g, lens, d, false);
    const Tensor dKT = at::bmm(qg.transpose(1, 2), dP).view(k0T.sizes());  // [H, G, D, Lg]
    const Tensor dVT = at::bmm(dog.transpose(1, 2), PZ).view(v0T.sizes());
    add_kernel_grad(da_k, dKT, k0T, s0);
    add_kernel_grad(da_v, dVT, v0T, s0);
    scatter_group<scalar_t>(mix_time(dKT, ak, s0, false), dk, g, lens, d, true);
    scatter_group<scalar_t>(mix_time(dVT, av, s0, false), dv, g, lens, d, true);
  }
  da_k.tril_();
  da_v.tril_();
}

// ---------------------------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------------------------
std::tuple<Tensor, Tensor> pka_fwd_cpu(const Tensor& q, const Tensor& k, const Tensor& v,
                                       const Tensor& a_k, const Tensor& a_v,
                                       const std::optional<Tensor>& lengths, double scale,
                                       double dropout_p, const std::optional<Tensor>& seed) {
  const NoAutocast no_autocast;
  const Dims d = check_inputs(q, k, v, a_k, a_v, lengths, scale, dropout_p, seed);
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
      forward_grouped<scalar_t>(q, k, v, ak, av, lens, d, scale, drop, out, lse);
  });
  return {out, lse};
}

// The backward on checked float32 / float64 inputs. It needs no forward output: the row function
// forms D_i from P and dP.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> backward_cpu(
    const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& a_k,
    const Tensor& a_v, const std::optional<Tensor>& lengths, const Tensor& lse, const Dims& d,
    double scale, double dropout_p, const std::optional<Tensor>& seed) {
  const auto lens = host_lengths(lengths, d);
  // The row loops read these two through raw pointers.
  const Tensor dout_c = dout.contiguous(), lse_c = lse.contiguous();
  Tensor dq = at::empty({d.B, d.H, d.T, d.D}, q.options());
  Tensor dk = at::empty_like(dq), dv = at::empty_like(dq), da_k, da_v;
  const Tensor ak = tril_heads(a_k), av = tril_heads(a_v);
  const Dropout drop = make_dropout(dropout_p, seed);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "pka_bwd_cpu", [&] {
    if (use_dense(d))
      backward_dense<scalar_t>(dout_c, q, k, v, ak, av, lse_c, lens, d, scale, drop, dq, dk, dv,
                               da_k, da_v);
    else
      backward_grouped<scalar_t>(dout_c, q, k, v, ak, av, lse_c, lens, d, scale, drop, dq, dk,
                                 dv, da_k, da_v);
  });
  return {dq, dk, dv, da_k.view(a_k.sizes()), da_v.view(a_v.sizes())};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> pka_bwd_cpu(
    const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& a_k,
    const Tensor& a_v, const std::optional<Tensor>& lengths, const Tensor& out, const Tensor& lse,
    double scale, double dropout_p, const std::optional<Tensor>& seed) {
  const NoAutocast no_autocast;
  const Dims d = check_inputs(q, k, v, a_k, a_v, lengths, scale, dropout_p, seed);
  check_cpu_dtype(q, "pka_bwd");
  // CPU keeps lse in the input dtype (float32 or float64), and in float32 for 16-bit inputs.
  // out is checked (the schema's contract) but not read.
  check_backward_inputs(dout, out, lse, q, d, is_16bit(q) ? at::kFloat : q.scalar_type());
  if (is_16bit(q)) {
    const auto dt = q.scalar_type();
    auto [dq, dk, dv, da_k, da_v] =
        backward_cpu(to_float(dout), to_float(q), to_float(k), to_float(v), to_float(a_k),
                     to_float(a_v), lengths, lse, d, scale, dropout_p, seed);
    return {dq.to(dt), dk.to(dt), dv.to(dt), da_k.to(dt), da_v.to(dt)};
  }
  return backward_cpu(dout, q, k, v, a_k, a_v, lengths, lse, d, scale, dropout_p, seed);
}

}  // namespace
}  // namespace pka

TORCH_LIBRARY_IMPL(pka_ext, CPU, m) {
  m.impl("pka_fwd", &pka::pka_fwd_cpu);
  m.impl("pka_bwd", &pka::pka_bwd_cpu);
}
