// Device code of the fused kernels, included by pka_fused.cu (nvcc) and by the CPU emulation in
// tests/cuda_emu (plain C++ with a thread-per-lane model of a block and of WMMA), which checks the
// indexing, masking, tiling, alignment and synchronisation logic on machines without a GPU. See
// pka_fused.cu for the algorithm.
#pragma once

#include <c10/macros/Macros.h>  // CUDA_KERNEL_ASSERT_MSG

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#define PKA_DYNAMIC_SMEM(name) extern __shared__ __align__(128) unsigned char name[]
#endif

#include "pka_dropout.h"

namespace pka {
namespace fused {

#if defined(__CUDACC__) || defined(PKA_EMU_WMMA)
namespace wmma = nvcuda::wmma;
#endif

// Blocks have 4 or 8 warps (template parameter W); the host picks per launch (fwd_plan, bwd_plan).

// Keys per softmax step in the forward. 32 rather than 64 halves the warps' score and probability
// space, which lets three forward blocks share an SM at the headline sizes (T = 200, d = 64).
constexpr int kChunk = 32;
constexpr unsigned kFull = 0xffffffffu;

// bfloat16 WMMA needs sm_80; older targets compile a body that traps (fused_supported() keeps
// them on the unfused path at run time).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define PKA_FUSED_ARCH_OK 0
#else
#define PKA_FUSED_ARCH_OK 1
#endif

__device__ __forceinline__ float to_f(float x) { return x; }
#ifdef __CUDACC__
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
#endif
template <typename T>
__device__ __forceinline__ T from_f(float x);
template <>
__device__ __forceinline__ float from_f<float>(float x) { return x; }
#ifdef __CUDACC__
template <>
__device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
#endif

// One warp's 16x16x16 tile product C += op(A) op(B), fp32 accumulation. A is read at `a` with
// leading dimension lda, row-major, or as its transpose when AT (element (m, k) at a[k * lda + m]);
// likewise B with BT. Pointers must be 32-byte aligned and leading dimensions multiples of 8
// (WMMA's rules); every caller indexes whole 16-element tiles of buffers laid out that way.
template <typename T>
struct Mma;

#if defined(__CUDA_ARCH__)
// Fragment loads from shared memory in PTX's shared-space form of wmma.load, which ptxas turns into
// ldmatrix. The C++ API (load_matrix_sync) emits the generic form even for a pointer known to be
// shared, and that becomes four generic loads plus register shuffles per fragment (cuobjdump of the
// 2026-11-28 forward: 128 LD.E and 64 MOVM, no LDSM). The fragment's registers are its storage x in
// order, as the API's own loads fill it: 4 x .b32 for bfloat16, 8 x .f16x2 for float16.
#define PKA_WMMA_LOAD4(SHAPE)                                                                    \
  asm volatile("wmma.load." SHAPE " {%0, %1, %2, %3}, [%4], %5;"                                \
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])                                 \
               : "r"(addr), "r"(ld)                                                             \
               : "memory")
#define PKA_WMMA_LOAD8(SHAPE)                                                                    \
  asm volatile("wmma.load." SHAPE " {%0, %1, %2, %3, %4, %5, %6, %7}, [%8], %9;"                \
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]), "=r"(r[4]), "=r"(r[5]),        \
                 "=r"(r[6]), "=r"(r[7])                                                         \
               : "r"(addr), "r"(ld)                                                             \
               : "memory")

template <typename T, typename Use, typename L>
__device__ __forceinline__ void load_shared(wmma::fragment<Use, 16, 16, 16, T, L>& f, const T* p,
                                            int ld) {
  unsigned* r = reinterpret_cast<unsigned*>(&f.x[0]);
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(p));
  constexpr bool b = std::is_same_v<Use, wmma::matrix_b>, col = std::is_same_v<L, wmma::col_major>;
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    if constexpr (!b && !col) PKA_WMMA_LOAD4("a.sync.aligned.row.m16n16k16.shared.bf16");
    if constexpr (!b && col) PKA_WMMA_LOAD4("a.sync.aligned.col.m16n16k16.shared.bf16");
    if constexpr (b && !col) PKA_WMMA_LOAD4("b.sync.aligned.row.m16n16k16.shared.bf16");
    if constexpr (b && col) PKA_WMMA_LOAD4("b.sync.aligned.col.m16n16k16.shared.bf16");
  } else {
    static_assert(std::is_same_v<T, __half>, "16-bit fragments only");
    if constexpr (!b && !col) PKA_WMMA_LOAD8("a.sync.aligned.row.m16n16k16.shared.f16");
    if constexpr (!b && col) PKA_WMMA_LOAD8("a.sync.aligned.col.m16n16k16.shared.f16");
    if constexpr (b && !col) PKA_WMMA_LOAD8("b.sync.aligned.row.m16n16k16.shared.f16");
    if constexpr (b && col) PKA_WMMA_LOAD8("b.sync.aligned.col.m16n16k16.shared.f16");
  }
}
#undef PKA_WMMA_LOAD4
#undef PKA_WMMA_LOAD8
#endif

#if defined(__CUDACC__) || defined(PKA_EMU_WMMA)
// An operand fragment from p: the shared-space load where p is in shared memory (the block buffers
// may also be in the global workspace, so it is checked; the test is uniform across the warp).
template <typename F, typename T>
__device__ __forceinline__ void load_frag(F& f, const T* p, int ld) {
#if defined(__CUDA_ARCH__)
  if (__isShared(p)) {
    load_shared(f, p, ld);
    return;
  }
#endif
  wmma::load_matrix_sync(f, p, ld);
}

template <typename T>
struct Mma {
  using Acc = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;
  __device__ static void zero(Acc& c) { wmma::fill_fragment(c, 0.f); }
  __device__ static void store(float* p, int ld, const Acc& c) {
    wmma::store_matrix_sync(p, c, ld, wmma::mem_row_major);
  }
  template <bool AT, bool BT>
  __device__ static void mma(Acc& c, const T* a, int lda, const T* b, int ldb) {
    using LA = std::conditional_t<AT, wmma::col_major, wmma::row_major>;
    using LB = std::conditional_t<BT, wmma::col_major, wmma::row_major>;
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, LA> fa;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, LB> fb;
    load_frag(fa, a, lda);
    load_frag(fb, b, ldb);
    wmma::mma_sync(c, fa, fb, c);
  }
  // An A operand held in registers across several products (load_a, then mma_a), row-major or
  // transposed (AT) as in mma; the memory it came from may be reused once it is loaded.
  static constexpr bool kHoldsA = true;
  template <bool AT>
  using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, T,
                               std::conditional_t<AT, wmma::col_major, wmma::row_major>>;
  template <typename F>
  __device__ static void load_a(F& f, const T* a, int lda) { load_frag(f, a, lda); }
  template <bool BT, typename F>
  __device__ static void mma_a(Acc& c, const F& fa, const T* b, int ldb) {
    using LB = std::conditional_t<BT, wmma::col_major, wmma::row_major>;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, LB> fb;
    load_frag(fb, b, ldb);
    wmma::mma_sync(c, fa, fb, c);
  }
};
#endif

// float32: the same interface on CUDA cores (TF32 tensor cores would miss its accuracy). Lane l
// owns row l / 2, columns 8 (l % 2) ... + 7.
template <>
struct Mma<float> {
  struct Acc {
    float x[8];
  };
  __device__ static int row() { return (threadIdx.x & 31) >> 1; }
  __device__ static int col0() { return (threadIdx.x & 1) * 8; }
  __device__ static void zero(Acc& c) {
#pragma unroll
    for (int e = 0; e < 8; ++e) c.x[e] = 0.f;
  }
  __device__ static void store(float* p, int ld, const Acc& c) {
#pragma unroll
    for (int e = 0; e < 8; ++e) p[row() * ld + col0() + e] = c.x[e];
  }
  template <bool AT, bool BT>
  __device__ static void mma(Acc& c, const float* a, int lda, const float* b, int ldb) {
    const int r = row(), c0 = col0();
#pragma unroll 4
    for (int kk = 0; kk < 16; ++kk) {
      const float av = AT ? a[kk * lda + r] : a[r * lda + kk];
#pragma unroll
      for (int e = 0; e < 8; ++e) c.x[e] += av * (BT ? b[(c0 + e) * ldb + kk] : b[kk * ldb + c0 + e]);
    }
  }
  // On CUDA cores each product reads one row of A per lane, so there is nothing to keep: the
  // "fragment" is where the operand lies, and that memory must stay as it is while it is used.
  static constexpr bool kHoldsA = false;
  template <bool AT>
  struct FragA {
    static constexpr bool kT = AT;
    const float* a;
    int lda;
  };
  template <typename F>
  __device__ static void load_a(F& f, const float* a, int lda) {
    f.a = a;
    f.lda = lda;
  }
  template <bool BT, typename F>
  __device__ static void mma_a(Acc& c, const F& fa, const float* b, int ldb) {
    mma<F::kT, BT>(c, fa.a, fa.lda, b, ldb);
  }
};

// The D / 16 column blocks of a 16-row tile as A operands, held while the tile meets many others.
template <typename T, int D>
using TileFrags = typename Mma<T>::template FragA<false>[D / 16];

// acc[c] += op(A) B[:, 16 c ... 16 c + 15] for the D / 16 column blocks of B (pitch ldb), with A
// (transposed when AT) loaded once for all of them. One warp.
template <bool AT, typename T, int D>
__device__ void mma_row(typename Mma<T>::Acc (&acc)[D / 16], const T* a, int lda, const T* b,
                        int ldb) {
  using M = Mma<T>;
  typename M::template FragA<AT> fa;
  M::load_a(fa, a, lda);
#pragma unroll
  for (int c = 0; c < D / 16; ++c) M::template mma_a<false>(acc[c], fa, b + c * 16, ldb);
}

// Register-level tensor-core products (mma.sync m16n8k16, operands through ldmatrix) for the
// 16-bit attention, forward and backward: the softmax and the score gradients must know which row
// each accumulator element belongs to, which WMMA keeps opaque. Layouts are the PTX ISA's; lane l
// is thread t = l % 4 of group g = l / 4, and a 32-bit register holds two 16-bit elements, the
// lower-indexed in its low half:
//   A, 16 x 16 row-major:  {(g, 2t..2t+1), (g+8, 2t..), (g, 2t+8..), (g+8, 2t+8..)}
//   B, 16 x 8 (k x n):     {(k = 2t..2t+1, n = g), (k = 2t+8.., n = g)}
//   C, 16 x 8 fp32:        {(g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1)}
// So the C blocks of two adjacent 8-column blocks are, packed in pairs, the A operand of the next
// product (P V; the backward's (P Z)^T dO, dS^T Q, dS K): probabilities never leave registers.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float a, float b) {
  struct alignas(4) Pair {
    T x, y;
  } v{from_f<T>(a), from_f<T>(b)};
  uint32_t u;
  std::memcpy(&u, &v, 4);
  return u;
}

// The bits of one 16-bit element (U = uint16_t) or of two adjacent ones (uint32_t, 4-byte
// aligned) in a single load.
template <typename U, typename T>
__device__ __forceinline__ uint32_t load_bits(const T* p) {
#if defined(__CUDA_ARCH__)
  return *reinterpret_cast<const U*>(p);
#else
#ifndef __CUDACC__
  PKA_EMU_REQUIRE_ALIGNED(p, sizeof(U));
#endif
  U u;
  std::memcpy(&u, p, sizeof(U));
  return u;
#endif
}

template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    static_assert(std::is_same_v<T, __half>, "16-bit operands only");
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#elif defined(PKA_EMU_WMMA)
  ::pka_emu::mma_m16n8k16<T>(c, a, b);
#endif
}

// Four 8 x 8 matrices of the 16 x 16 tile at p (pitch ld elements): matrix m at rows 8 (m % 2),
// columns 8 (m / 2), or, with COLS_FIRST, rows 8 (m / 2), columns 8 (m % 2). r[m] = its row g,
// elements 2t, 2t + 1, or with TRANS its column g, rows 2t, 2t + 1. From shared memory this is
// one ldmatrix (rows 16-byte aligned); the block buffers of long sequences live in the global
// workspace, where each lane loads its elements itself.
template <bool TRANS, bool COLS_FIRST, typename T>
__device__ __forceinline__ void load_x4(uint32_t (&r)[4], const T* p, int ld) {
  const int lane = threadIdx.x & 31;
  auto origin = [&](int m) {
    const int ro = 8 * (COLS_FIRST ? m >> 1 : m & 1), co = 8 * (COLS_FIRST ? m & 1 : m >> 1);
    return p + static_cast<size_t>(ro) * ld + co;
  };
#if defined(__CUDA_ARCH__)
  if (__isShared(p)) {
    const T* row = origin(lane >> 3) + (lane & 7) * ld;  // lane 8 m + k: row k of matrix m
    const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(row));
    if constexpr (TRANS) {
      asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                   : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                   : "r"(addr)
                   : "memory");
    } else {
      asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                   : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                   : "r"(addr)
                   : "memory");
    }
    return;
  }
#elif defined(PKA_EMU_WMMA)
  if (__isShared(p)) {
    ::pka_emu::ldmatrix_x4<TRANS>(r, origin(lane >> 3) + (lane & 7) * ld);
    return;
  }
#endif
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int m = 0; m < 4; ++m) {
    const T* o = origin(m);
    if constexpr (TRANS) {
      r[m] = load_bits<uint16_t>(o + static_cast<size_t>(2 * t) * ld + g) |
             load_bits<uint16_t>(o + static_cast<size_t>(2 * t + 1) * ld + g) << 16;
    } else {
      r[m] = load_bits<uint32_t>(o + static_cast<size_t>(g) * ld + 2 * t);  // ld, 2t even
    }
  }
}

template <typename E>
struct Params {
  const E *q, *k, *v;     // [B, H, T, D], contiguous
  const E *ak, *av;       // [Hk, T, T], [Hv, T, T]; only the lower triangle is read
  const int64_t* lengths;  // device [B] or nullptr (no padding)
  const int64_t* order;    // device [B]: batch rows, longest sequence first, or nullptr (in order)
  // Block buffers 0 ... smem_bufs - 1 in shared memory, the rest in the workspace
  // [B*H, nbuf - smem_bufs, Tp, D] (nullptr when all are in shared memory).
  E* work;
  int smem_bufs;
  // forward
  E* out;
  float* lse_out;
  // backward
  const E *dout, *o;
  const float* lse;
  E *dq, *dk, *dv;
  float *dak, *dav;  // fp32 accumulators [Hk, T, T], [Hv, T, T], zero-initialised
  int H, T, Tp, Hk, Hv;
  float scale, keep_scale;
  bool dropout;
  // 16-bit types: scores and probabilities through shared memory (WMMA; the forward's softmax in
  // two passes) instead of on mma.sync registers (PKA_SMEM_SCORES=1, to compare on a device).
  bool smem_scores;
  uint64_t seed;
  uint32_t threshold;
};

// Row pitch, in elements of E, of a shared buffer whose rows hold n elements: 16 bytes more than
// the row. With a pitch of n elements (128 or 256 bytes for the common head dims) every row of a
// 16-row fragment starts in the same bank and each fragment load or store is an 8- to 32-way bank
// conflict; 16 bytes of padding put consecutive rows in different banks. Keeps WMMA's rules:
// pitches are multiples of 16 bytes and 16-row tiles start on 32-byte boundaries.
template <typename E>
__host__ __device__ constexpr int pitch(int n) {
  return n + 16 / static_cast<int>(sizeof(E));
}

// Shared-memory budget, shared by host (launch size) and device (carving).
// Block buffers of Tp rows (pitch ld): forward K and V (raw rows mixed in place); backward K, V,
// staging rows (then dK_mixed) and dV_mixed.
constexpr int kFwdBuffers = 2;
constexpr int kBwdBuffers = 4;

template <typename T, int D>
struct Smem {
  static constexpr int ld = pitch<T>(D);            // block buffers, query / dout tiles
  static constexpr int ld_s = pitch<float>(kChunk);  // forward scores [16, kChunk]
  static constexpr int ld_p = pitch<T>(kChunk);      // forward probabilities [16, kChunk]
  static constexpr int ld_t = pitch<T>(16);          // 16 x 16 tiles of T
  // A tile of T (kernel-matrix block) + a 16 x 16 fp32 tile, per warp.
  static constexpr size_t mix = 16 * ld_t * sizeof(T) + 256 * sizeof(float);
  // Forward, per warp: the query tile, then the scores and probabilities from offset fwd_sf: in
  // the same space where the query's fragments are held in registers (Mma::kHoldsA); the mixing
  // step's scratch before all of it.
  static constexpr size_t fwd_q = 16 * ld * sizeof(T);
  static constexpr size_t fwd_sf = Mma<T>::kHoldsA ? 0 : fwd_q;
  static constexpr size_t fwd_sp = 16 * ld_s * sizeof(float) + 16 * ld_p * sizeof(T);
  static constexpr size_t fwd_warp = std::max({fwd_q, fwd_sf + fwd_sp, mix});
  // Query and dout tiles, S and dP (fp32 16 x 16), P Z and dS (16 x 16 of T).
  static constexpr size_t bwd_warp =
      2 * 16 * ld * sizeof(T) + 2 * 256 * sizeof(float) + 2 * 16 * ld_t * sizeof(T);
  __host__ __device__ static size_t buf_elems(int Tp) { return static_cast<size_t>(Tp) * ld; }
  __host__ __device__ static size_t buf(int Tp) { return buf_elems(Tp) * sizeof(T); }
  // Bytes with the first smem_bufs block buffers in shared memory.
  static size_t fwd(int Tp, int smem_bufs, int warps) {
    return smem_bufs * buf(Tp) + warps * fwd_warp;
  }
  static size_t bwd(int Tp, int smem_bufs, int warps) {
    return smem_bufs * buf(Tp) + warps * (bwd_warp + mix) + 3 * sizeof(float) * Tp;
  }
};

// Warps per block and how many of its block buffers (from the first) live in shared memory; the
// others go to the global workspace. The buffers come in order of use: the forward's K (read twice
// per tile pair) before V (once); the backward's K and V (read for every pair) before the staging
// rows / dK_mixed and dV_mixed (written once, read twice). So when not all fit, the most used stay.
struct Plan {
  int warps;
  int smem_bufs;
};

// Which buffers may go to shared memory: all that fit, or only the forward's K and the backward's K
// and V, or none (PKA_FUSED_WORKSPACE=split / 1, so that tests and compute-sanitizer cover the
// placements of long sequences on short ones).
enum class Placement { kFree, kSplit, kWorkspace };

inline int max_smem_bufs(Placement placement, int nbuf) {
  return placement == Placement::kWorkspace ? 0 : placement == Placement::kSplit ? nbuf / 2 : nbuf;
}

// Forward: as many buffers in shared memory as fit with 4 warps; 8 warps instead where a 4-warp
// block would sit alone on its SM (its shared memory, plus the `reserved` bytes the device keeps
// per block, leaves no room for a second of `per_sm`: long sequences, d = 128), which keeps twice
// the loads in flight in the same shared memory. With no buffer in shared memory the count per SM is
// bounded by registers, and 4-warp blocks pack better. `forced` (4 or 8; 0: free) fixes the count.
template <typename T, int D>
Plan fwd_plan(int Tp, size_t limit, size_t per_sm, size_t reserved, int forced,
              Placement placement) {
  using SM = Smem<T, D>;
  int n = max_smem_bufs(placement, kFwdBuffers);
  while (n > 0 && SM::fwd(Tp, n, 4) > limit) --n;
  if (forced == 4 || forced == 8) {
    while (n > 0 && SM::fwd(Tp, n, forced) > limit) --n;
    return {forced, n};
  }
  const bool alone = 2 * (SM::fwd(Tp, n, 4) + reserved) > per_sm;
  return {n > 0 && alone && SM::fwd(Tp, n, 8) <= limit ? 8 : 4, n};
}

// Backward: the most buffers in shared memory first (all four, then K and V, then K), and for each
// 8 warps before 4: 8 keep more loads in flight in the one block that fits on an SM at the usual
// sizes. `forced` (4 or 8; 0: free) fixes the count.
template <typename T, int D>
Plan bwd_plan(int Tp, size_t limit, int forced, Placement placement) {
  const int most = max_smem_bufs(placement, kBwdBuffers);
  for (int n : {4, 2, 1, 0}) {
    if (n > most) continue;
    for (int warps : {8, 4}) {
      if (forced != 0 && warps != forced) continue;
      if (Smem<T, D>::bwd(Tp, n, warps) <= limit) return {warps, n};
    }
  }
  return {4, 0};  // fused_supported() checked that this fits; a forced 8 that does not, yields
}

// Calls f(std::integral_constant<int, D>) for the head dims the kernels are built for; false for
// any other.
template <typename F>
bool with_head_dim(int64_t D, F&& f) {
  switch (D) {
    case 16: f(std::integral_constant<int, 16>{}); return true;
    case 32: f(std::integral_constant<int, 32>{}); return true;
    case 64: f(std::integral_constant<int, 64>{}); return true;
    case 128: f(std::integral_constant<int, 128>{}); return true;
    default: return false;
  }
}

struct Seq {
  int b, h, bh, L, s, nt, Lp;
};

template <typename T>
__device__ Seq seq_of(const Params<T>& p) {
  Seq q;
  // Blocks are handed to SMs in index order; taking the longest sequences first keeps a long one
  // from starting last and running alone at the end of the grid.
  const int slot = blockIdx.x / p.H;
  q.b = p.order != nullptr ? static_cast<int>(p.order[slot]) : slot;
  q.h = blockIdx.x % p.H;
  q.bh = q.b * p.H + q.h;
  const int64_t L = p.lengths != nullptr ? p.lengths[q.b] : p.T;
  // Device lengths are range-checked here rather than on the host, where reading them would
  // synchronise the stream on every call (CPU lengths were checked on the host already).
  CUDA_KERNEL_ASSERT_MSG(L >= 0 && L <= p.T, "pka_ext: lengths[b] must lie in [0, T]");
  q.L = static_cast<int>(L);
  q.s = p.T - q.L;
  q.nt = (q.L + 15) / 16;
  q.Lp = 16 * q.nt;
  return q;
}

// Work dealing: warp w's k-th item (or -1) when n items are dealt to the warps in snake order
// (0 .. W-1, then W-1 .. 0, ...) starting from the most expensive. An item's cost grows with its
// index when `rising` (query tiles: tile t sees t + 1 key tiles), else falls with it (key tiles).
// Round-robin dealing gave warp 0 the largest tile of every round: 28 of 91 units of work at
// T = 200 against an even share of 23, and the block waits for its slowest warp.
template <int W>
__device__ __forceinline__ int dealt(int k, int w, int n, bool rising) {
  const int idx = k * W + ((k & 1) ? W - 1 - w : w);
  if (idx >= n) return -1;
  return rising ? n - 1 - idx : idx;
}

// Two adjacent floats (8-byte aligned): one 64-bit shared-memory access on the device.
__device__ __forceinline__ void load2(const float* p, float& a, float& b) {
#ifdef __CUDACC__
  const float2 v = *reinterpret_cast<const float2*>(p);
  a = v.x;
  b = v.y;
#else
  PKA_EMU_REQUIRE_ALIGNED(p, 8);
  a = p[0];
  b = p[1];
#endif
}

// p[0], p[1] = a, b in one store (p 2-element aligned).
template <typename T>
__device__ __forceinline__ void store2(T* p, float a, float b) {
  struct alignas(2 * sizeof(T)) Pair {
    T x, y;
  };
#ifndef __CUDACC__
  PKA_EMU_REQUIRE_ALIGNED(p, sizeof(Pair));
#endif
  *reinterpret_cast<Pair*>(p) = Pair{from_f<T>(a), from_f<T>(b)};
}

// 16 bytes of a row: the unit of the staging copies. The entry points hand the kernels q, k, v,
// dout and out 16-byte aligned, and every row (D * sizeof(T) bytes) is a multiple of 16, so each
// chunk is one 128-bit load; several are issued before the first is stored, because a staging loop
// that waits for each load in turn spends an L2 round trip per element (the profile of the
// 2026-11-28 kernels: two thirds of the forward's stall cycles).
#ifdef __CUDACC__
using Chunk = uint4;
__device__ __forceinline__ void ld16(const void* src, Chunk& c) { c = *reinterpret_cast<const uint4*>(src); }
__device__ __forceinline__ void st16(void* dst, const Chunk& c) { *reinterpret_cast<uint4*>(dst) = c; }
#else
struct Chunk {
  uint32_t x, y, z, w;
};
__device__ __forceinline__ void ld16(const void* src, Chunk& c) {
  PKA_EMU_REQUIRE_ALIGNED(src, 16);
  std::memcpy(&c, src, 16);
}
__device__ __forceinline__ void st16(void* dst, const Chunk& c) {
  PKA_EMU_REQUIRE_ALIGNED(dst, 16);
  std::memcpy(dst, &c, 16);
}
#endif
__device__ __forceinline__ Chunk zero_chunk() {
  Chunk c;
  c.x = c.y = c.z = c.w = 0u;  // all-zero bits are 0.0 in every float type
  return c;
}

// v[0..7] = p[0..7] (p 16-byte aligned): two 16-byte shared-memory loads on the device.
__device__ __forceinline__ void load8(const float* p, float (&v)[8]) {
#ifdef __CUDACC__
  const float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
  v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
#else
  PKA_EMU_REQUIRE_ALIGNED(p, 16);
  for (int e = 0; e < 8; ++e) v[e] = p[e];
#endif
}

// dst[0..7] = src[0..7] * mul as T (dst 16-byte aligned): one or two 16-byte stores, not eight.
template <typename T>
__device__ __forceinline__ void store8(T* dst, const float* src, float mul) {
  constexpr int V = 16 / static_cast<int>(sizeof(T));
#pragma unroll
  for (int u = 0; u < 8 / V; ++u) {
    alignas(16) T v[V];
#pragma unroll
    for (int e = 0; e < V; ++e) v[e] = from_f<T>(src[u * V + e] * mul);
    Chunk c;
    std::memcpy(&c, v, 16);
    st16(dst + u * V, c);
  }
}

// The first `rows` rows of a [T, D] output slice (16-byte aligned: a fresh allocation) set to 0 in
// 16-byte chunks, by the block's `threads` threads.
template <typename T, int D>
__device__ void zero_rows(T* g, int rows, int threads) {
  constexpr int V = 16 / static_cast<int>(sizeof(T));
  for (int i = threadIdx.x; i < rows * (D / V); i += threads)
    st16(g + static_cast<size_t>(i) * V, zero_chunk());
}

// rows x D elements from global rows g[g0 + r, :] (row r valid when r < valid, else zeros) into
// dst[r * ldd + :], by `threads` threads numbered t. Up to 4 chunks per thread in flight.
template <typename T, int D>
__device__ void copy_rows(const T* __restrict__ g, int g0, int valid, int rows, T* dst, int ldd,
                          int t, int threads) {
  constexpr int V = 16 / static_cast<int>(sizeof(T)), CPR = D / V;  // chunks per row
  constexpr int U = 4;
  const int n = rows * CPR;
  for (int first = t; first < n; first += U * threads) {
    Chunk c[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int idx = first + u * threads, r = idx / CPR;
      c[u] = zero_chunk();
      if (idx < n && r < valid) ld16(g + static_cast<size_t>(g0 + r) * D + (idx - r * CPR) * V, c[u]);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int idx = first + u * threads, r = idx / CPR;
      if (idx < n) st16(dst + static_cast<size_t>(r) * ldd + (idx - r * CPR) * V, c[u]);
    }
  }
}

// dst[r, :] = g[s + r, :] for r < L and 0 for L <= r < rows; dst has row pitch LD. Whole block
// (W warps).
template <typename T, int D, int W>
__device__ void stage_rows(const T* __restrict__ g, int s, int L, int rows, T* dst) {
  copy_rows<T, D>(g, s, L, rows, dst, Smem<T, D>::ld, threadIdx.x, 32 * W);
}

// acc = output tile ti of M src, where M = tril(A)[s:s+L, s:s+L] (TRANS: its transpose) and src
// (pitch LD) is Lp rows with zeros from L on. `stage` (16 x 16 of T, pitch ld_t) is the warp's
// own scratch. One warp.
template <typename T, int D, bool TRANS>
__device__ void mix_tile(const T* __restrict__ A, int Tn, int s, int L, int nt, int ti, const T* src,
                         typename Mma<T>::Acc (&acc)[D / 16], T* stage) {
  using M = Mma<T>;
  constexpr int LD = Smem<T, D>::ld, LT = Smem<T, D>::ld_t;
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int c = 0; c < D / 16; ++c) M::zero(acc[c]);
  // Output tile ti sums over tj <= ti (ti + 1 tiles), transposed over tj >= ti (nt - ti tiles).
  const int lo = TRANS ? ti : 0, hi = TRANS ? nt - 1 : ti;
  // The block of A whose rows are the (output, summed) index in the plain (transposed) case,
  // read along its rows, so that the loads are contiguous; the transposed case then reads it as
  // a column-major operand. Its rows start anywhere (s is arbitrary), so the loads are scalar:
  // all 8 of a lane (row r, columns c0 ... c0 + 7) are issued together, and the next block's while
  // this one is multiplied; they go to the stage in one or two 16-byte stores.
  const int r = lane >> 1, c0 = (lane & 1) * 8;
  alignas(16) T a[8];
  auto fetch = [&](int tj) {
    const int rt = TRANS ? tj : ti, ct = TRANS ? ti : tj, row = rt * 16 + r;
#pragma unroll
    for (int u = 0; u < 8; ++u) {
      const int col = ct * 16 + c0 + u;
      a[u] = row < L && col <= row ? A[static_cast<size_t>(s + row) * Tn + s + col] : from_f<T>(0.f);
    }
  };
  fetch(lo);
  for (int tj = lo; tj <= hi; ++tj) {
    constexpr int V = 16 / static_cast<int>(sizeof(T));
#pragma unroll
    for (int u = 0; u < 8 / V; ++u) {
      Chunk c;
      std::memcpy(&c, a + u * V, 16);
      st16(stage + r * LT + c0 + u * V, c);
    }
    __syncwarp();
    if (tj < hi) fetch(tj + 1);
    mma_row<TRANS, T, D>(acc, stage, LT, src + static_cast<size_t>(tj) * 16 * LD, LD);
    __syncwarp();
  }
}

// Rows r < limit of tile ti of dst (row pitch ldd, 16-byte aligned rows) = acc, through the warp's
// fp32 scratch `tile` (16 x 16); lane (r, half) stores 8 contiguous elements of row r. One warp.
template <typename T, int D>
__device__ void put_tile(const typename Mma<T>::Acc (&acc)[D / 16], int ti, T* dst, int ldd,
                         int limit, float* tile) {
  const int lane = threadIdx.x & 31, r = lane >> 1, half = lane & 1, row = ti * 16 + r;
#pragma unroll
  for (int c = 0; c < D / 16; ++c) {
    Mma<T>::store(tile, 16, acc[c]);
    __syncwarp();
    if (row < limit)
      store8(dst + static_cast<size_t>(row) * ldd + c * 16 + half * 8, tile + r * 16 + half * 8, 1.f);
    __syncwarp();
  }
}

// Rows r < limit of dst (row pitch ldd) = M src (see mix_tile), tiles dealt to the W warps. Whole
// block.
template <typename T, int D, bool TRANS, int W>
__device__ void mix_rows(const T* __restrict__ A, int Tn, int s, int L, int nt, const T* src,
                         T* dst, int ldd, int limit, T* stage, float* tile) {
  const int warp = threadIdx.x >> 5;
  for (int k = 0; k * W < nt; ++k) {
    const int ti = dealt<W>(k, warp, nt, !TRANS);
    if (ti < 0) continue;
    typename Mma<T>::Acc acc[D / 16];
    mix_tile<T, D, TRANS>(A, Tn, s, L, nt, ti, src, acc, stage);
    put_tile<T, D>(acc, ti, dst, ldd, limit, tile);
  }
}

// K and V (Lp rows, pitch LD; zeros from L on) become Mk K and Mv V, M = tril(A)[s:s+L, s:s+L],
// without a second buffer: output tile ti reads input tiles 0 ... ti, so the tiles are computed
// from the last down in rounds, and a round stores its tiles only after all of its warps have read
// their inputs; no later round reads a tile an earlier one stored. Half the warps take K, half V,
// one tile each per round. Whole block.
template <typename T, int D, int W>
__device__ void mix_in_place(const T* __restrict__ Ak, const T* __restrict__ Av, int Tn, int s, int L,
                             int nt, T* K, T* V, T* stage, float* tile) {
  constexpr int Half = W / 2;
  const int warp = threadIdx.x >> 5;
  const bool on_v = warp >= Half;
  const T* A = on_v ? Av : Ak;
  T* buf = on_v ? V : K;
  for (int top = nt - 1; top >= 0; top -= Half) {
    const int ti = top - warp % Half;
    typename Mma<T>::Acc acc[D / 16];
    if (ti >= 0) mix_tile<T, D, false>(A, Tn, s, L, nt, ti, buf, acc, stage);
    __syncthreads();
    if (ti >= 0) put_tile<T, D>(acc, ti, buf, Smem<T, D>::ld, 16 * nt, tile);
    __syncthreads();
  }
}

// da[s+i, s+j] += sum_c G[i, c] X[j, c] for j <= i < L (fp32 atomics into the shared accumulator).
// G and X have row pitch LD.
template <typename T, int D, int W>
__device__ void kernel_grad(const T* G, const T* X, float* da, int Tn, int s, int L, int nt,
                            float* tile) {
  using M = Mma<T>;
  constexpr int LD = Smem<T, D>::ld;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  // A warp takes whole rows of tile pairs (row ti holds ti + 1 of them; rows dealt by cost) and
  // keeps G's tile ti in registers across its row.
  for (int k = 0; k * W < nt; ++k) {
    const int ti = dealt<W>(k, warp, nt, true);
    if (ti < 0) continue;
    TileFrags<T, D> fg;
#pragma unroll
    for (int c = 0; c < D / 16; ++c) M::load_a(fg[c], G + static_cast<size_t>(ti) * 16 * LD + c * 16, LD);
    for (int tj = 0; tj <= ti; ++tj) {
      typename M::Acc acc;
      M::zero(acc);
#pragma unroll
      for (int c = 0; c < D / 16; ++c)
        M::template mma_a<true>(acc, fg[c], X + static_cast<size_t>(tj) * 16 * LD + c * 16, LD);
      M::store(tile, 16, acc);
      __syncwarp();
      for (int e = lane; e < 256; e += 32) {
        const int i = ti * 16 + (e >> 4), j = tj * 16 + (e & 15);
        if (i < L && j <= i) atomicAdd(da + static_cast<size_t>(s + i) * Tn + s + j, tile[e]);
      }
      __syncwarp();
    }
  }
}

// Block buffer i (of nbuf, buf elements each) of this block: in shared memory or the workspace.
template <typename T>
__device__ T* block_buffer(const Params<T>& p, const Seq& q, unsigned char* smem, int nbuf,
                           size_t buf, int i) {
  if (i < p.smem_bufs) return reinterpret_cast<T*>(smem) + i * buf;
  const int in_work = nbuf - p.smem_bufs;
  return p.work + (static_cast<size_t>(q.bh) * in_work + (i - p.smem_bufs)) * buf;
}

// Rows of 16-row tile t of a [T, D] sequence slice into dst (16 rows, pitch LD), zero beyond L.
// One warp.
template <typename T, int D>
__device__ void stage_tile(const T* g, const Seq& q, int t, T* dst) {
  copy_rows<T, D>(g, q.s + t * 16, q.L - t * 16, 16, dst, Smem<T, D>::ld, threadIdx.x & 31, 32);
}

// One warp's 16-row tile of a [T, D] sequence slice (zero beyond L) in flight: fetched into
// registers, put into shared memory (pitch LD) later, so that the fetch's round trip overlaps the
// work on the tile before. Only while a lane holds at most four chunks (kFits): larger tiles would
// take registers the backward does not have.
template <typename T, int D>
struct TileInFlight {
  static constexpr int V = 16 / static_cast<int>(sizeof(T)), CPR = D / V, N = 16 * CPR / 32;
  static constexpr bool kFits = N <= 4;
  Chunk c[N];
  __device__ void fetch(const T* g, const Seq& q, int t) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int u = 0; u < N; ++u) {
      const int idx = lane + 32 * u, r = idx / CPR, row = t * 16 + r;
      c[u] = zero_chunk();
      if (row < q.L) ld16(g + static_cast<size_t>(q.s + row) * D + (idx - r * CPR) * V, c[u]);
    }
  }
  __device__ void put(T* dst) const {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int u = 0; u < N; ++u) {
      const int idx = lane + 32 * u, r = idx / CPR;
      st16(dst + static_cast<size_t>(r) * Smem<T, D>::ld + (idx - r * CPR) * V, c[u]);
    }
  }
};

// The query and dout tiles of pass 1's pairs (query tiles kt, kt + 1, ... of a key tile), staged
// into the warp's Qs and dOs one pair at a time: every pair restages both, so where a tile fits in
// a lane's registers the next pair's are fetched while this one is computed. One warp.
template <typename T, int D>
struct PairTiles {
  using Ahead = TileInFlight<T, D>;
  const T *qg, *dog;  // the sequence's q and dout rows
  Ahead next_q, next_do;
  __device__ void first(const Seq& q, int qt) {
    if constexpr (Ahead::kFits) {
      next_q.fetch(qg, q, qt);
      next_do.fetch(dog, q, qt);
    }
  }
  __device__ void stage(const Seq& q, int qt, T* Qs, T* dOs) {
    if constexpr (Ahead::kFits) {
      next_q.put(Qs);
      next_do.put(dOs);
      if (qt + 1 < q.nt) {
        next_q.fetch(qg, q, qt + 1);
        next_do.fetch(dog, q, qt + 1);
      }
    } else {
      stage_tile<T, D>(qg, q, qt, Qs);
      stage_tile<T, D>(dog, q, qt, dOs);
    }
  }
};

// Writes accumulator fragment `acc` (rows 16 t ..., columns c0 ... c0 + 15) times the per-row
// factor `mul` (lane (r, half) holds row r's) to g[s + row, :] (row pitch D) for rows < L,
// through the warp's fp32 scratch `tile` (16 x 16). One warp.
template <typename T, int D>
__device__ void write_tile(const typename Mma<T>::Acc& acc, float mul, const Seq& q, int t,
                           int c0, float* tile, T* g) {
  const int lane = threadIdx.x & 31, r = lane >> 1, half = lane & 1;
  Mma<T>::store(tile, 16, acc);
  __syncwarp();
  const int rr = t * 16 + r;
  // g is a fresh allocation, rows and c0 + 8 half are multiples of 8 elements: 16-byte aligned.
  if (rr < q.L)
    store8(g + static_cast<size_t>(q.s + rr) * D + c0 + half * 8, tile + r * 16 + half * 8, mul);
  __syncwarp();
}

// The [T, T] kernel matrix a head reads: the only one (shared) or its own.
template <typename T>
__device__ const T* head_kernel(const T* a, int heads, int h, int Tn) {
  return a + static_cast<size_t>(heads == 1 ? 0 : h) * Tn * Tn;
}

// K = tril(A_k) k and V = tril(A_v) v on the block's valid rows (zeros from L to Lp), each mixed
// in place in its buffer: the forward has no third block buffer, so that three blocks fit on an SM
// at the headline sizes. Whole block.
template <typename T, int D, int W>
__device__ void mix_keys_values_in_place(const Params<T>& p, const Seq& q, size_t base, T* K, T* V,
                                         T* stage, float* tile) {
  stage_rows<T, D, W>(p.k + base, q.s, q.L, q.Lp, K);
  stage_rows<T, D, W>(p.v + base, q.s, q.L, q.Lp, V);
  __syncthreads();
  mix_in_place<T, D, W>(head_kernel(p.ak, p.Hk, q.h, p.T), head_kernel(p.av, p.Hv, q.h, p.T), p.T,
                        q.s, q.L, q.nt, K, V, stage, tile);
}

// The same through staging space X: the backward has that buffer anyway (it holds dK_mixed later),
// and dealing whole tiles to the warps avoids the in-place order's rounds and barriers. Whole block.
template <typename T, int D, int W>
__device__ void mix_keys_values(const Params<T>& p, const Seq& q, size_t base, T* X, T* K, T* V,
                                T* stage, float* tile) {
  constexpr int LD = Smem<T, D>::ld;
  stage_rows<T, D, W>(p.k + base, q.s, q.L, q.Lp, X);
  __syncthreads();
  mix_rows<T, D, false, W>(head_kernel(p.ak, p.Hk, q.h, p.T), p.T, q.s, q.L, q.nt, X, K, LD, q.Lp,
                           stage, tile);
  __syncthreads();
  stage_rows<T, D, W>(p.v + base, q.s, q.L, q.Lp, X);
  __syncthreads();
  mix_rows<T, D, false, W>(head_kernel(p.av, p.Hv, q.h, p.T), p.T, q.s, q.L, q.nt, X, V, LD, q.Lp,
                           stage, tile);
  __syncthreads();
}

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Scores of the query tile (fragments fq) against key tiles k0 / 16 ... + ntiles - 1 into Sf
// (pitch ld_s). One warp.
template <typename T, int D>
__device__ void score_chunk(const TileFrags<T, D>& fq, const T* K, int k0, int ntiles, float* Sf) {
  using M = Mma<T>;
  constexpr int LD = Smem<T, D>::ld, LS = Smem<T, D>::ld_s;
  for (int kt = 0; kt < ntiles; ++kt) {
    typename M::Acc acc;
    M::zero(acc);
#pragma unroll
    for (int c = 0; c < D / 16; ++c)
      M::template mma_a<true>(acc, fq[c], K + static_cast<size_t>(k0 + kt * 16) * LD + c * 16, LD);
    M::store(Sf + kt * 16, LS, acc);
  }
  __syncwarp();
}

// Streams the query tile's visible keys (0 ... last) in chunks of kChunk: the scores go to Sf, then
// f(c, j, s0, s1) runs for each of the lane's column pairs (chunk column c, key j, scores of keys
// j and j + 1; lane (r, half) owns row r and the pairs 4 it + 2 half), then after(k0, ntiles)
// once per chunk. One warp.
template <typename T, int D, typename F, typename G>
__device__ void over_scores(const TileFrags<T, D>& fq, const T* K, int last, float* Sf, F&& f,
                            G&& after) {
  constexpr int LS = Smem<T, D>::ld_s;
  const int lane = threadIdx.x & 31, r = lane >> 1, half = lane & 1;
  for (int k0 = 0; k0 <= last; k0 += kChunk) {
    const int ntiles = min(kChunk / 16, (last - k0) / 16 + 1);
    score_chunk<T, D>(fq, K, k0, ntiles, Sf);
    for (int it = 0; it < 4 * ntiles; ++it) {
      const int c = 4 * it + 2 * half;
      float s0, s1;
      load2(Sf + r * LS + c, s0, s1);
      f(c, k0 + c, s0, s1);
    }
    __syncwarp();
    after(k0, ntiles);
  }
}

// acc (16 rows x D, mma.sync C layout: D / 8 column blocks), its rows g and g + 8 times mul[0] and
// mul[1], into the 16 rows of dst (pitch ld) as T, in pairs. One warp.
template <typename T, int D>
__device__ void put_acc(const float (&acc)[D / 8][4], T* dst, int ld,
                        const float (&mul)[2] = {1.f, 1.f}) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int n = 0; n < D / 8; ++n)
#pragma unroll
    for (int h = 0; h < 2; ++h)
      store2(dst + (g + 8 * h) * ld + n * 8 + 2 * t, acc[n][2 * h] * mul[h], acc[n][2 * h + 1] * mul[h]);
}

// Rows r of tile qt with 16 qt + r < L of acc (times mul, as put_acc) to g[s + 16 qt + r, :] (row
// pitch D), through the warp's scratch tile (16 x ld; free once every lane is past the barrier
// here), in 16-byte stores. 16-bit types. One warp.
template <typename T, int D>
__device__ void write_acc_rows(const float (&acc)[D / 8][4], const float (&mul)[2], T* scratch,
                               const Seq& q, int qt, T* g) {
  constexpr int LD = Smem<T, D>::ld, CPR = D * static_cast<int>(sizeof(T)) / 16;  // chunks per row
  const int lane = threadIdx.x & 31;
  __syncwarp();
  put_acc<T, D>(acc, scratch, LD, mul);
  __syncwarp();
  for (int idx = lane; idx < 16 * CPR; idx += 32) {
    const int r = idx / CPR, c = idx - r * CPR, row = qt * 16 + r;
    if (row >= q.L) continue;
    Chunk ch;
    ld16(scratch + r * LD + c * 8, ch);
    st16(g + static_cast<size_t>(q.s + row) * D + c * 8, ch);
  }
  __syncwarp();  // the next tile is staged into the scratch
}

// One warp's query tile qt (staged in Qs) through its visible keys, 16 at a time, on registers:
// S = Q K^T by mma.sync, the online softmax (running row maxima m, sums l, the output rescaled when
// a maximum grows) on the accumulators, P packed into the A operand of P V. Writes the tile's
// output rows (through Qs, in 16-byte stores) and lse. 16-bit types. One warp.
template <typename T, int D>
__device__ void attend_registers(const Params<T>& p, const Seq& q, int qt, const T* K, const T* V,
                                 T* Qs, T* out, float* lse) {
  constexpr int LD = Smem<T, D>::ld;
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  uint32_t qf[D / 16][4];
#pragma unroll
  for (int c = 0; c < D / 16; ++c) load_x4<false, false>(qf[c], Qs + c * 16, LD);
  __syncwarp();  // Qs takes the output at the end
  // This lane's rows: i[0] = 16 qt + g and i[1] = i[0] + 8 (accumulator elements 0, 1 and 2, 3).
  const int i[2] = {qt * 16 + g, qt * 16 + g + 8};
  const bool ok[2] = {i[0] < q.L, i[1] < q.L};
  uint32_t key[2] = {0u, 0u};
  if (p.dropout) {
#pragma unroll
    for (int h = 0; h < 2; ++h)
      if (ok[h]) key[h] = dropout_row_key(p.seed, q.b, q.h, q.s + i[h]);
  }
  const float c2 = p.scale * kLog2e;  // scores in log2 units: exp2 instead of exp
  float o[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};  // l: sums of the un-dropped probabilities
  const int last = min(qt * 16 + 15, q.L - 1);  // the tile's last visible key
  for (int kt = 0; kt * 16 <= last; ++kt) {
    float sc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};  // keys 16 kt + 8 nb + ...
#pragma unroll
    for (int c = 0; c < D / 16; ++c) {
      uint32_t kb[4];
      load_x4<false, true>(kb, K + static_cast<size_t>(kt) * 16 * LD + c * 16, LD);
      const uint32_t b0[2] = {kb[0], kb[1]}, b1[2] = {kb[2], kb[3]};
      mma16816<T>(sc[0], qf[c], b0);
      mma16816<T>(sc[1], qf[c], b1);
    }
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nb = 0; nb < 2; ++nb)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int h = e >> 1, j = kt * 16 + nb * 8 + 2 * t + (e & 1);
        sc[nb][e] = ok[h] && j <= i[h] ? sc[nb][e] * c2 : -INFINITY;
        mx[h] = fmaxf(mx[h], sc[nb][e]);
      }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      mx[h] = fmaxf(mx[h], __shfl_xor_sync(kFull, mx[h], 1));
      mx[h] = fmaxf(mx[h], __shfl_xor_sync(kFull, mx[h], 2));
      const float mn = fmaxf(m[h], mx[h]);
      // A row with no visible key yet (or none at all: rows past L) keeps m = -inf and nothing.
      const float alpha = mn == -INFINITY ? 1.f : exp2f(m[h] - mn);
      m[h] = mn;
      l[h] *= alpha;
#pragma unroll
      for (int n = 0; n < D / 8; ++n) {
        o[n][2 * h] *= alpha;
        o[n][2 * h + 1] *= alpha;
      }
    }
#pragma unroll
    for (int nb = 0; nb < 2; ++nb)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int h = e >> 1, j = kt * 16 + nb * 8 + 2 * t + (e & 1);
        float pr = sc[nb][e] == -INFINITY ? 0.f : exp2f(sc[nb][e] - m[h]);
        l[h] += pr;
        if (p.dropout) pr = dropout_keep(key[h], q.s + j, p.threshold) ? pr * p.keep_scale : 0.f;
        sc[nb][e] = pr;
      }
    const uint32_t pa[4] = {pack2<T>(sc[0][0], sc[0][1]), pack2<T>(sc[0][2], sc[0][3]),
                            pack2<T>(sc[1][0], sc[1][1]), pack2<T>(sc[1][2], sc[1][3])};
#pragma unroll
    for (int c = 0; c < D / 16; ++c) {
      uint32_t vb[4];
      load_x4<true, false>(vb, V + static_cast<size_t>(kt) * 16 * LD + c * 16, LD);
      const uint32_t b0[2] = {vb[0], vb[1]}, b1[2] = {vb[2], vb[3]};
      mma16816<T>(o[2 * c], pa, b0);
      mma16816<T>(o[2 * c + 1], pa, b1);
    }
  }
  float inv[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    l[h] += __shfl_xor_sync(kFull, l[h], 1);
    l[h] += __shfl_xor_sync(kFull, l[h], 2);
    inv[h] = ok[h] ? 1.f / l[h] : 0.f;
    if (t == 0 && ok[h]) lse[q.s + i[h]] = (m[h] + log2f(l[h])) * kLn2;
  }
  write_acc_rows<T, D>(o, inv, Qs, q, qt, out);
}

template <typename T, int D, int W>
__global__ void __launch_bounds__(32 * W) pka_fwd_kernel(const Params<T> p) {
#if !PKA_FUSED_ARCH_OK
  __trap();
#else
  PKA_DYNAMIC_SMEM(smem);
  using M = Mma<T>;
  using SM = Smem<T, D>;
  constexpr int LS = SM::ld_s, LP = SM::ld_p;
  const Seq q = seq_of(p);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const size_t base = static_cast<size_t>(q.bh) * p.T * D;
  T* out = p.out + base;
  float* lse = p.lse_out + static_cast<size_t>(q.bh) * p.T;
  zero_rows<T, D>(out, q.s, 32 * W);
  for (int i = threadIdx.x; i < q.s; i += 32 * W) lse[i] = 0.f;
  if (q.L == 0) return;  // uniform over the block

  const size_t buf = SM::buf_elems(p.Tp);
  T* K = block_buffer(p, q, smem, kFwdBuffers, buf, 0);
  T* V = block_buffer(p, q, smem, kFwdBuffers, buf, 1);
  unsigned char* mine = smem + p.smem_bufs * SM::buf(p.Tp) + warp * SM::fwd_warp;
  T* stage = reinterpret_cast<T*>(mine);
  float* tile = reinterpret_cast<float*>(mine + 16 * SM::ld_t * sizeof(T));

  mix_keys_values_in_place<T, D, W>(p, q, base, K, V, stage, tile);

  T* Qs = reinterpret_cast<T*>(mine);                  // [16, ld]
  float* Sf = reinterpret_cast<float*>(mine + SM::fwd_sf);  // [16, ld_s] raw scores
  T* P = reinterpret_cast<T*>(Sf + 16 * LS);           // [16, ld_p] probabilities (x dropout)
  // Lane (r, half) owns query row r of the tile (see over_scores): the pair of lanes of a row reads
  // 16 contiguous bytes of scores per step, and the 16 rows fall in different banks (pitch ld_s).
  const int r = lane >> 1, half = lane & 1;
  const float c2 = p.scale * kLog2e;  // scores in log2 units: exp2 instead of exp

  for (int k = 0; k * W < q.nt; ++k) {
    const int qt = dealt<W>(k, warp, q.nt, true);
    if (qt < 0) continue;
    const int i = qt * 16 + r;
    const bool row_ok = i < q.L;
    stage_tile<T, D>(p.q + base, q, qt, Qs);
    __syncwarp();
    if constexpr (M::kHoldsA) {
      if (!p.smem_scores) {
        attend_registers<T, D>(p, q, qt, K, V, Qs, out, lse);
        continue;
      }
    }
    // Loaded once for the tile's two passes over its keys, not once per key tile.
    TileFrags<T, D> fq;
#pragma unroll
    for (int c = 0; c < D / 16; ++c) M::load_a(fq[c], Qs + c * 16, SM::ld);
    __syncwarp();  // the scores may overwrite Qs
    const int last = min(qt * 16 + 15, q.L - 1);  // the tile's last visible key
    // Two passes over the visible keys: the row maxima first, then the probabilities with the
    // final maxima, so that the output accumulates in registers with no rescaling (the scores
    // are recomputed: tensor-core work is cheap here, shared-memory traffic is not).
    float m2 = -INFINITY;
    over_scores<T, D>(fq, K, last, Sf, [&](int c, int j, float s0, float s1) {
      if (row_ok && j <= i) m2 = fmaxf(m2, s0 * c2);
      if (row_ok && j + 1 <= i) m2 = fmaxf(m2, s1 * c2);
    }, [](int, int) {});
    m2 = fmaxf(m2, __shfl_xor_sync(kFull, m2, 1));
    // m2 is finite on every real row (key 0 is visible to all).

    const uint32_t key = p.dropout && row_ok ? dropout_row_key(p.seed, q.b, q.h, q.s + i) : 0u;
    typename M::Acc o[D / 16];
#pragma unroll
    for (int c = 0; c < D / 16; ++c) M::zero(o[c]);
    float l = 0.f;  // sum of the un-dropped probabilities
    over_scores<T, D>(fq, K, last, Sf, [&](int c, int j, float s0, float s1) {
      float e0 = 0.f, e1 = 0.f;
      if (row_ok && j <= i) e0 = exp2f(s0 * c2 - m2);
      if (row_ok && j + 1 <= i) e1 = exp2f(s1 * c2 - m2);
      l += e0 + e1;
      if (p.dropout) {
        e0 = dropout_keep(key, q.s + j, p.threshold) ? e0 * p.keep_scale : 0.f;
        e1 = dropout_keep(key, q.s + j + 1, p.threshold) ? e1 * p.keep_scale : 0.f;
      }
      store2(P + r * LP + c, e0, e1);
    }, [&](int k0, int ntiles) {
      for (int kt = 0; kt < ntiles; ++kt)
        mma_row<false, T, D>(o, P + kt * 16, LP, V + static_cast<size_t>(k0 + kt * 16) * SM::ld, SM::ld);
      __syncwarp();
    });
    l += __shfl_xor_sync(kFull, l, 1);
    const float inv = row_ok ? 1.f / l : 0.f;
#pragma unroll
    for (int c = 0; c < D / 16; ++c) write_tile<T, D>(o[c], inv, q, qt, c * 16, Sf, out);
    if (half == 0 && row_ok) lse[q.s + i] = (m2 + log2f(l)) * kLn2;
  }
#endif
}

// Scores S = Q K_t^T and dP = dO V_t^T of one 16 x 16 (query tile, key tile) pair, turned into
// PZ = P Z and dS = P (Z dP - Delta) scale with P = exp(scale S - lse) on visible pairs, else 0.
// lse2 holds lse in log2 units. PZ and dS have pitch ld_t.
template <typename T, int D>
__device__ void score_grads(const Params<T>& p, const Seq& q, int qt, int kt, const T* Qs,
                            const T* dOs, const T* K, const T* V, const float* lse2,
                            const float* delta, const uint32_t* rowkey, float* Sf, float* dPf,
                            T* PZ, T* dS) {
  using M = Mma<T>;
  constexpr int LD = Smem<T, D>::ld, LT = Smem<T, D>::ld_t;
  const int lane = threadIdx.x & 31;
  typename M::Acc s_acc, dp_acc;
  M::zero(s_acc);
  M::zero(dp_acc);
#pragma unroll
  for (int c = 0; c < D / 16; ++c) {
    M::template mma<false, true>(s_acc, Qs + c * 16, LD, K + static_cast<size_t>(kt) * 16 * LD + c * 16, LD);
    M::template mma<false, true>(dp_acc, dOs + c * 16, LD, V + static_cast<size_t>(kt) * 16 * LD + c * 16, LD);
  }
  M::store(Sf, 16, s_acc);
  M::store(dPf, 16, dp_acc);
  __syncwarp();
  const float c2 = p.scale * kLog2e;
  // Lane (r, half) takes row i = 16 qt + r, keys 16 kt + 8 half ... + 7: the row's lse, Delta and
  // dropout key are read once, and the scores and the results move 16 bytes at a time.
  const int r = lane >> 1, half = lane & 1, i = qt * 16 + r, j0 = kt * 16 + half * 8;
  const bool row_ok = i < q.L;  // i < Lp: the row arrays hold it either way
  const float l2 = lse2[i], di = delta[i];
  const uint32_t key = rowkey[i];
  float sv[8], dpv[8], pz[8], ds[8];
  load8(Sf + r * 16 + half * 8, sv);
  load8(dPf + r * 16 + half * 8, dpv);
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    const int j = j0 + e;
    pz[e] = ds[e] = 0.f;
    if (row_ok && j <= i) {
      const float prob = exp2f(sv[e] * c2 - l2);
      const float z = !p.dropout ? 1.f : (dropout_keep(key, q.s + j, p.threshold) ? p.keep_scale : 0.f);
      pz[e] = prob * z;
      ds[e] = prob * (z * dpv[e] - di) * p.scale;
    }
  }
  if (PZ != nullptr) store8(PZ + r * LT + half * 8, pz, 1.f);
  store8(dS + r * LT + half * 8, ds, 1.f);
  __syncwarp();
}


// The backward's attention products on registers (16-bit types; see attend_registers): the
// probabilities and score gradients of a 16 x 16 pair are formed on mma.sync accumulators and used
// there as operands, never stored.

// c[2][4] = X Y^T for the 16-row tiles X (A operand, rows 16 x D at x) and Y (16 rows at y): two
// 8-column blocks of C. Both row-major with pitch ld. One warp.
template <typename T, int D>
__device__ __forceinline__ void tile_xyt(float (&c)[2][4], const T* x, const T* y, int ld) {
#pragma unroll
  for (int nb = 0; nb < 2; ++nb) c[nb][0] = c[nb][1] = c[nb][2] = c[nb][3] = 0.f;
#pragma unroll
  for (int k = 0; k < D / 16; ++k) {
    uint32_t a[4], b[4];
    load_x4<false, false>(a, x + k * 16, ld);
    load_x4<false, true>(b, y + k * 16, ld);
    const uint32_t b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
    mma16816<T>(c[0], a, b0);
    mma16816<T>(c[1], a, b1);
  }
}

// acc (16 x D) += P Z for the 16 x 16 operand held as C blocks c[2][4] (packed to T) and Z, the
// 16 rows x D at z (pitch ld). One warp.
template <typename T, int D>
__device__ __forceinline__ void acc_pz(float (&acc)[D / 8][4], const float (&c)[2][4], const T* z, int ld) {
  const uint32_t a[4] = {pack2<T>(c[0][0], c[0][1]), pack2<T>(c[0][2], c[0][3]),
                         pack2<T>(c[1][0], c[1][1]), pack2<T>(c[1][2], c[1][3])};
#pragma unroll
  for (int n = 0; n < D / 16; ++n) {
    uint32_t b[4];
    load_x4<true, false>(b, z + n * 16, ld);
    const uint32_t b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
    mma16816<T>(acc[2 * n], a, b0);
    mma16816<T>(acc[2 * n + 1], a, b1);
  }
}

// P Z and dS of one element: query i (row arrays lse2, delta, rowkey), key j, score s, dP = dp.
template <typename T>
__device__ __forceinline__ void grad_elem(const Params<T>& p, const Seq& q, int i, int j, float s,
                                          float dp, float l2, float di, uint32_t key, float& pz,
                                          float& ds) {
  pz = ds = 0.f;
  if (i < q.L && j <= i) {
    const float prob = exp2f(s * (p.scale * kLog2e) - l2);  // as score_grads
    const float z = !p.dropout ? 1.f : (dropout_keep(key, q.s + j, p.threshold) ? p.keep_scale : 0.f);
    pz = prob * z;
    ds = prob * (z * dp - di) * p.scale;
  }
}

// Pass 1 for key tile kt: dK_mixed and dV_mixed rows of the tile, summed over the query tiles
// that see it, with S^T = K Q^T and dP^T = V dO^T so that P Z and dS come out with the keys as
// rows: the A operands of dV += (P Z)^T dO and dK += dS^T Q. Query and dout tiles are staged in
// Qs and dOs. One warp.
template <typename T, int D>
__device__ void key_tile_grads(const Params<T>& p, const Seq& q, int kt, const T* K, const T* V,
                               const T* dout, size_t base, const float* lse2, const float* delta,
                               const uint32_t* rowkey, T* Qs, T* dOs, T* dK, T* dV) {
  constexpr int LD = Smem<T, D>::ld;
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  float gk[D / 8][4], gv[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) gk[n][e] = gv[n][e] = 0.f;
  const T* Kt = K + static_cast<size_t>(kt) * 16 * LD;
  const T* Vt = V + static_cast<size_t>(kt) * 16 * LD;
  PairTiles<T, D> tiles{p.q + base, dout};
  tiles.first(q, kt);
  for (int qt = kt; qt < q.nt; ++qt) {
    tiles.stage(q, qt, Qs, dOs);
    __syncwarp();
    float st[2][4], dpt[2][4];  // rows: keys 16 kt + g (+ 8); columns: queries 16 qt + 8 nb + 2t (+ 1)
    tile_xyt<T, D>(st, Kt, Qs, LD);
    tile_xyt<T, D>(dpt, Vt, dOs, LD);
#pragma unroll
    for (int nb = 0; nb < 2; ++nb)
#pragma unroll
      for (int u = 0; u < 2; ++u) {
        const int i = qt * 16 + nb * 8 + 2 * t + u;  // i < Lp: the row arrays hold it
        const float l2 = lse2[i], di = delta[i];
        const uint32_t key = rowkey[i];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int e = 2 * h + u, j = kt * 16 + g + 8 * h;
          grad_elem(p, q, i, j, st[nb][e], dpt[nb][e], l2, di, key, st[nb][e], dpt[nb][e]);
        }
      }
    acc_pz<T, D>(gv, st, dOs, LD);   // st now holds (P Z)^T
    acc_pz<T, D>(gk, dpt, Qs, LD);   // dpt now holds dS^T
    __syncwarp();  // the next pair's tiles overwrite Qs and dOs
  }
  put_acc<T, D>(gk, dK + static_cast<size_t>(kt) * 16 * LD, LD);
  put_acc<T, D>(gv, dV + static_cast<size_t>(kt) * 16 * LD, LD);
}

// Pass 2 for query tile qt (staged in Qs, dout tile in dOs): dq rows = sum over the visible key
// tiles of dS K, written to dq through Qs in 16-byte stores. One warp.
template <typename T, int D>
__device__ void query_tile_grads(const Params<T>& p, const Seq& q, int qt, const T* K, const T* V,
                                 const float* lse2, const float* delta, const uint32_t* rowkey,
                                 T* Qs, const T* dOs, T* dq) {
  constexpr int LD = Smem<T, D>::ld;
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  float gq[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n) gq[n][0] = gq[n][1] = gq[n][2] = gq[n][3] = 0.f;
  const int i[2] = {qt * 16 + g, qt * 16 + g + 8};
  const float l2[2] = {lse2[i[0]], lse2[i[1]]}, di[2] = {delta[i[0]], delta[i[1]]};
  const uint32_t key[2] = {rowkey[i[0]], rowkey[i[1]]};
  for (int kt = 0; kt <= qt; ++kt) {
    float s[2][4], dp[2][4];  // rows: queries i[0], i[1]; columns: keys 16 kt + 8 nb + 2t (+ 1)
    tile_xyt<T, D>(s, Qs, K + static_cast<size_t>(kt) * 16 * LD, LD);
    tile_xyt<T, D>(dp, dOs, V + static_cast<size_t>(kt) * 16 * LD, LD);
#pragma unroll
    for (int nb = 0; nb < 2; ++nb)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int h = e >> 1, j = kt * 16 + nb * 8 + 2 * t + (e & 1);
        float pz;
        grad_elem(p, q, i[h], j, s[nb][e], dp[nb][e], l2[h], di[h], key[h], pz, dp[nb][e]);
      }
    acc_pz<T, D>(gq, dp, K + static_cast<size_t>(kt) * 16 * LD, LD);  // dp now holds dS
  }
  const float one[2] = {1.f, 1.f};
  write_acc_rows<T, D>(gq, one, Qs, q, qt, dq);
}

template <typename T, int D, int W>
__global__ void __launch_bounds__(32 * W) pka_bwd_kernel(const Params<T> p) {
#if !PKA_FUSED_ARCH_OK
  __trap();
#else
  PKA_DYNAMIC_SMEM(smem);
  using M = Mma<T>;
  using SM = Smem<T, D>;
  constexpr int LD = SM::ld, LT = SM::ld_t;
  const Seq q = seq_of(p);
  const int warp = threadIdx.x >> 5;
  const size_t base = static_cast<size_t>(q.bh) * p.T * D;
  zero_rows<T, D>(p.dq + base, q.s, 32 * W);
  zero_rows<T, D>(p.dk + base, q.s, 32 * W);
  zero_rows<T, D>(p.dv + base, q.s, 32 * W);
  if (q.L == 0) return;

  const size_t buf = SM::buf_elems(p.Tp);
  T* K = block_buffer(p, q, smem, kBwdBuffers, buf, 0);
  T* V = block_buffer(p, q, smem, kBwdBuffers, buf, 1);
  T* X = block_buffer(p, q, smem, kBwdBuffers, buf, 2);   // staged raw rows, then dK_mixed
  T* dV = block_buffer(p, q, smem, kBwdBuffers, buf, 3);  // dV_mixed
  unsigned char* warps = smem + p.smem_bufs * SM::buf(p.Tp);
  unsigned char* mixs = warps + W * SM::bwd_warp + warp * SM::mix;
  T* stage = reinterpret_cast<T*>(mixs);
  float* tile = reinterpret_cast<float*>(mixs + 16 * LT * sizeof(T));
  float* lse2 = reinterpret_cast<float*>(warps + W * (SM::bwd_warp + SM::mix));
  float* delta = lse2 + p.Tp;
  uint32_t* rowkey = reinterpret_cast<uint32_t*>(delta + p.Tp);

  const T* dout = p.dout + base;
  for (int i = threadIdx.x; i < q.Lp; i += 32 * W) {
    float d = 0.f, l = 0.f;
    uint32_t key = 0u;
    if (i < q.L) {
      constexpr int V = 16 / static_cast<int>(sizeof(T));
      const size_t row = static_cast<size_t>(q.s + i) * D;
#pragma unroll 4
      for (int c = 0; c < D; c += V) {
        Chunk x, y;
        ld16(dout + row + c, x);
        ld16(p.o + base + row + c, y);
        const T* xs = reinterpret_cast<const T*>(&x);
        const T* ys = reinterpret_cast<const T*>(&y);
#pragma unroll
        for (int e = 0; e < V; ++e) d += to_f(xs[e]) * to_f(ys[e]);
      }
      l = p.lse[static_cast<size_t>(q.bh) * p.T + q.s + i] * kLog2e;
      if (p.dropout) key = dropout_row_key(p.seed, q.b, q.h, q.s + i);
    }
    delta[i] = d;
    lse2[i] = l;
    rowkey[i] = key;
  }
  mix_keys_values<T, D, W>(p, q, base, X, K, V, stage, tile);
  T* dK = X;

  unsigned char* mine = warps + warp * SM::bwd_warp;
  T* Qs = reinterpret_cast<T*>(mine);   // [16, ld]
  T* dOs = Qs + 16 * LD;                // [16, ld]
  float* Sf = reinterpret_cast<float*>(dOs + 16 * LD);
  float* dPf = Sf + 256;
  T* PZ = reinterpret_cast<T*>(dPf + 256);  // [16, ld_t]
  T* dS = PZ + 16 * LT;                     // [16, ld_t]

  // Pass 1: each warp owns key tiles and sums over every query tile that sees them, in registers.
  for (int k = 0; k * W < q.nt; ++k) {
    const int kt = dealt<W>(k, warp, q.nt, false);
    if (kt < 0) continue;
    if constexpr (M::kHoldsA) {
      if (!p.smem_scores) {
        key_tile_grads<T, D>(p, q, kt, K, V, dout, base, lse2, delta, rowkey, Qs, dOs, dK, dV);
        continue;
      }
    }
    typename M::Acc gk[D / 16], gv[D / 16];
#pragma unroll
    for (int c = 0; c < D / 16; ++c) {
      M::zero(gk[c]);
      M::zero(gv[c]);
    }
    PairTiles<T, D> tiles{p.q + base, dout};
    tiles.first(q, kt);
    for (int qt = kt; qt < q.nt; ++qt) {
      tiles.stage(q, qt, Qs, dOs);
      __syncwarp();
      score_grads<T, D>(p, q, qt, kt, Qs, dOs, K, V, lse2, delta, rowkey, Sf, dPf, PZ, dS);
      mma_row<true, T, D>(gv, PZ, LT, dOs, LD);
      mma_row<true, T, D>(gk, dS, LT, Qs, LD);
      __syncwarp();
    }
    put_tile<T, D>(gk, kt, dK, LD, q.Lp, Sf);
    put_tile<T, D>(gv, kt, dV, LD, q.Lp, Sf);
  }
  // Pass 2: each warp owns query tiles: dq = dS K over the visible key tiles.
  for (int k = 0; k * W < q.nt; ++k) {
    const int qt = dealt<W>(k, warp, q.nt, true);
    if (qt < 0) continue;
    typename M::Acc gq[D / 16];
#pragma unroll
    for (int c = 0; c < D / 16; ++c) M::zero(gq[c]);
    stage_tile<T, D>(p.q + base, q, qt, Qs);
    stage_tile<T, D>(dout, q, qt, dOs);
    __syncwarp();
    if constexpr (M::kHoldsA) {
      if (!p.smem_scores) {
        query_tile_grads<T, D>(p, q, qt, K, V, lse2, delta, rowkey, Qs, dOs, p.dq + base);
        continue;
      }
    }
    for (int kt = 0; kt <= qt; ++kt) {
      score_grads<T, D>(p, q, qt, kt, Qs, dOs, K, V, lse2, delta, rowkey, Sf, dPf, nullptr, dS);
      mma_row<false, T, D>(gq, dS, LT, K + static_cast<size_t>(kt) * 16 * LD, LD);
      __syncwarp();
    }
#pragma unroll
    for (int c = 0; c < D / 16; ++c) write_tile<T, D>(gq[c], 1.f, q, qt, c * 16, Sf, p.dq + base);
  }
  __syncthreads();
  // K and V are no longer needed: the raw rows go there for the kernel gradients.
  stage_rows<T, D, W>(p.k + base, q.s, q.L, q.Lp, K);
  stage_rows<T, D, W>(p.v + base, q.s, q.L, q.Lp, V);
  __syncthreads();
  const size_t first = base + static_cast<size_t>(q.s) * D;
  mix_rows<T, D, true, W>(head_kernel(p.ak, p.Hk, q.h, p.T), p.T, q.s, q.L, q.nt, dK, p.dk + first,
                       D, q.L, stage, tile);
  mix_rows<T, D, true, W>(head_kernel(p.av, p.Hv, q.h, p.T), p.T, q.s, q.L, q.nt, dV, p.dv + first,
                       D, q.L, stage, tile);
  kernel_grad<T, D, W>(dK, K, p.dak + static_cast<size_t>(p.Hk == 1 ? 0 : q.h) * p.T * p.T, p.T, q.s,
                    q.L, q.nt, tile);
  kernel_grad<T, D, W>(dV, V, p.dav + static_cast<size_t>(p.Hv == 1 ? 0 : q.h) * p.T * p.T, p.T, q.s,
                    q.L, q.nt, tile);
#endif
}

}  // namespace fused
}  // namespace pka
