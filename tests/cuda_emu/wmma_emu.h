// A CPU model of the slice of nvcuda::wmma the fused kernels use (16x16x16 tiles, fp32
// accumulator), so that the Mma<T> tile product of csrc/pka_fused_kernels.cuh, not a stand-in, runs
// in the emulation for 16-bit types.
//
// What it models and checks:
// - the operand layouts: a row_major A fragment reads element (m, k) at p[m * ldm + k], a col_major
//   one at p[k * ldm + m] (B likewise with (k, n)); accumulators load and store row-major;
// - WMMA's documented preconditions, which are undefined behaviour on the device when broken:
//   32-byte aligned pointers, ldm a multiple of 16 bytes' worth of elements (abort otherwise);
// - that accumulator elements are private to lanes: lane l holds elements l, l + 32, ... of the
//   tile, a mapping the kernels must not rely on (they only load, store, fill and mma);
// - no implicit synchronisation: like the device, nothing here orders one lane's shared-memory
//   writes before another lane's fragment loads; the kernels' own __syncwarp calls must.
// Products are exact in fp32 and summed in fp32, as tensor cores do up to summation order.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstdio>
#include <cstring>
#include <type_traits>

#define PKA_EMU_WMMA 1

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

namespace detail {

inline void require(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "wmma emulation: %s\n", what);
    std::abort();
  }
}

template <typename E>
void check_operand(const E* p, unsigned ldm) {
  require(reinterpret_cast<std::uintptr_t>(p) % 32 == 0, "pointer not 32-byte aligned");
  require((ldm * sizeof(E)) % 16 == 0, "ldm not a multiple of 16 bytes");
}

inline unsigned lane() { return threadIdx.x % 32; }

}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment;

// Operand fragments (A: [m][k], B: [k][n]): every lane keeps the whole tile. Elements convert to
// float through the kernels' to_f, found by argument-dependent lookup for the emulation's 16-bit type.
template <typename Use, typename T, typename Layout>
struct operand {
  T x[16][16];
};
template <typename T, typename Layout>
struct fragment<matrix_a, 16, 16, 16, T, Layout> : operand<matrix_a, T, Layout> {};
template <typename T, typename Layout>
struct fragment<matrix_b, 16, 16, 16, T, Layout> : operand<matrix_b, T, Layout> {};
template <>
struct fragment<accumulator, 16, 16, 16, float, void> {
  float x[8];  // tile elements lane(), lane() + 32, ... in row-major order
};

// Element (r, c) of the tile at p[r * ldm + c] (row_major) or p[c * ldm + r] (col_major).
template <typename Use, typename T, typename Layout>
void load_matrix_sync(operand<Use, T, Layout>& f, const T* p, unsigned ldm) {
  detail::check_operand(p, ldm);
  constexpr bool col = std::is_same_v<Layout, col_major>;
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) f.x[r][c] = col ? p[c * ldm + r] : p[r * ldm + c];
}

using Acc = fragment<accumulator, 16, 16, 16, float, void>;

inline void fill_fragment(Acc& c, float v) {
  for (float& e : c.x) e = v;
}

inline void load_matrix_sync(Acc& c, const float* p, unsigned ldm, layout_t layout) {
  detail::check_operand(p, ldm);
  detail::require(layout == mem_row_major, "only row-major accumulators are modelled");
  for (int i = 0; i < 8; ++i) {
    const unsigned e = detail::lane() + 32 * i;
    c.x[i] = p[(e / 16) * ldm + e % 16];
  }
}

inline void store_matrix_sync(float* p, const Acc& c, unsigned ldm, layout_t layout) {
  detail::check_operand(p, ldm);
  detail::require(layout == mem_row_major, "only row-major accumulators are modelled");
  for (int i = 0; i < 8; ++i) {
    const unsigned e = detail::lane() + 32 * i;
    p[(e / 16) * ldm + e % 16] = c.x[i];
  }
}

template <typename T, typename LA, typename LB>
void mma_sync(Acc& d, const fragment<matrix_a, 16, 16, 16, T, LA>& a,
              const fragment<matrix_b, 16, 16, 16, T, LB>& b, const Acc& c) {
  for (int i = 0; i < 8; ++i) {
    const unsigned e = detail::lane() + 32 * i, m = e / 16, n = e % 16;
    float s = c.x[i];
    for (int k = 0; k < 16; ++k) s += to_f(a.x[m][k]) * to_f(b.x[k][n]);
    d.x[i] = s;
  }
}

}  // namespace wmma
}  // namespace nvcuda

// The register-level instructions the forward's attention uses, with the fragment layouts of the
// PTX ISA (lane l: group g = l / 4, thread t = l % 4; a register holds two 16-bit elements, the
// first in its low half). Both are warp-collective: every lane posts its operands to the warp's
// slots, then reads the others' (the device's register exchange), between two warp barriers.
namespace pka_emu {

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lane 8 m + k passes the address of row k of
// 8 x 8 matrix m (16-byte aligned, in shared memory); r[m] receives that matrix's row g, elements
// 2t and 2t + 1 (TRANS: column g, rows 2t and 2t + 1).
template <bool TRANS>
void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  nvcuda::wmma::detail::require(reinterpret_cast<std::uintptr_t>(row) % 16 == 0,
                                "ldmatrix row address not 16-byte aligned");
  nvcuda::wmma::detail::require(__isShared(row), "ldmatrix address not in shared memory");
  const Collective no_memory_order;
  uint64_t* slots = warp_slots();
  const unsigned lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  put_slot(&slots[lane * kSlots], reinterpret_cast<std::uintptr_t>(row));
  exchange_barrier();
  auto at = [&](unsigned m, unsigned k, unsigned e) {
    return reinterpret_cast<const uint16_t*>(get_slot(&slots[(8 * m + k) * kSlots]))[e];
  };
  for (unsigned m = 0; m < 4; ++m) {
    const uint32_t lo = TRANS ? at(m, 2 * t, g) : at(m, g, 2 * t);
    const uint32_t hi = TRANS ? at(m, 2 * t + 1, g) : at(m, g, 2 * t + 1);
    r[m] = lo | hi << 16;
  }
  exchange_barrier();
}

// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}: c += A B with A 16 x 16 (registers
// {(g, 2t..), (g + 8, 2t..), (g, 2t + 8..), (g + 8, 2t + 8..)}), B 16 x 8 ({(k = 2t.., n = g),
// (k = 2t + 8.., n = g)}), c {(g, 2t), (g, 2t + 1), (g + 8, 2t), (g + 8, 2t + 1)}; exact products
// summed in fp32.
template <typename T>
void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  const Collective no_memory_order;
  uint64_t* slots = warp_slots();
  const unsigned lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  for (int i = 0; i < 4; ++i) put_slot(&slots[lane * kSlots + i], a[i]);
  for (int i = 0; i < 2; ++i) put_slot(&slots[lane * kSlots + 4 + i], b[i]);
  exchange_barrier();
  auto elem = [&](unsigned owner, unsigned reg, unsigned half) {
    const uint16_t bits = static_cast<uint16_t>(get_slot(&slots[owner * kSlots + reg]) >> (16 * half));
    T x;
    std::memcpy(&x, &bits, 2);
    return to_f(x);
  };
  auto A = [&](unsigned m, unsigned k) {
    return elem(4 * (m % 8) + (k % 8) / 2, (m >= 8 ? 1u : 0u) + (k >= 8 ? 2u : 0u), k % 2);
  };
  auto B = [&](unsigned k, unsigned n) { return elem(4 * n + (k % 8) / 2, 4 + (k >= 8 ? 1u : 0u), k % 2); };
  for (unsigned e = 0; e < 4; ++e) {
    const unsigned m = g + 8 * (e / 2), n = 2 * t + e % 2;
    float s = c[e];
    for (unsigned k = 0; k < 16; ++k) s += A(m, k) * B(k, n);
    c[e] = s;
  }
  exchange_barrier();
}

}  // namespace pka_emu
