// A CPU model of the CUDA execution the fused kernels rely on, so that their device code
// (csrc/pka_fused_kernels.cuh; WMMA through wmma_emu.h) can run and be tested without a GPU.
//
// Each block runs as one std::thread per CUDA thread (128 or 256), sharing one "shared memory"
// buffer (filled with NaN bytes first, so reading anything not written shows up); __syncthreads is
// a barrier over the block, __syncwarp a barrier over the 32 threads of a warp, __shfl_xor_sync an
// exchange through per-lane slots between two warp barriers (so are wmma_emu.h's mma.sync and
// ldmatrix), atomicAdd an atomic_ref add. Blocks run one after another. A divergent barrier
// deadlocks here, as it is undefined on the device.
#pragma once

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __trap() std::abort()

struct dim3 {
  unsigned x = 0, y = 0, z = 0;
};

namespace pka_emu {

// 64-bit exchange slots per lane: the most a warp-collective model posts (mma.sync: four A and two
// B registers).
constexpr unsigned kSlots = 6;

// Bytes past the block's dynamic shared memory. They hold NaN bytes like the rest, so a read past
// the end shows up in the results, and launch() aborts when a block has written to them: an
// overrun that compute-sanitizer would report on the device.
constexpr size_t kGuard = 256;

struct BlockState {
  explicit BlockState(unsigned threads, size_t smem_bytes)
      : block(threads), xchg(threads * kSlots), smem_size(smem_bytes) {
    for (unsigned w = 0; w < threads / 32; ++w) warps.emplace_back(std::make_unique<std::barrier<>>(32));
    const size_t bytes = (smem_size + kGuard + 127) / 128 * 128;
    storage.reset(static_cast<unsigned char*>(std::aligned_alloc(128, bytes)));
    std::memset(storage.get(), 0xff, bytes);  // NaN in every float and half lane
  }
  bool guard_intact() const {
    const unsigned char* g = storage.get() + smem_size;
    for (size_t i = 0; i < kGuard; ++i)
      if (g[i] != 0xff) return false;
    return true;
  }
  struct Free {
    void operator()(unsigned char* p) const { std::free(p); }
  };
  std::barrier<> block;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<uint64_t> xchg;  // per-lane slots of the warp-collective operations
  size_t smem_size;
  std::unique_ptr<unsigned char, Free> storage;
};

inline thread_local BlockState* current = nullptr;
inline thread_local dim3 thread_idx, block_idx;

template <typename Kernel, typename Params>
void launch(Kernel kernel, unsigned grid, unsigned threads, size_t smem_bytes, const Params& p) {
  for (unsigned b = 0; b < grid; ++b) {
    BlockState state(threads, smem_bytes);
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (unsigned t = 0; t < threads; ++t)
      pool.emplace_back([&, t] {
        current = &state;
        thread_idx.x = t;
        block_idx.x = b;
        kernel(p);
      });
    for (auto& th : pool) th.join();
    if (!state.guard_intact()) {
      std::fprintf(stderr, "emulated CUDA: block %u wrote past its %zu bytes of dynamic shared memory\n",
                   b, smem_bytes);
      std::abort();
    }
  }
}

}  // namespace pka_emu

#define threadIdx (::pka_emu::thread_idx)
#define blockIdx (::pka_emu::block_idx)
#define PKA_DYNAMIC_SMEM(name) unsigned char* name = ::pka_emu::current->storage.get()

inline void __syncthreads() { ::pka_emu::current->block.arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) {
  ::pka_emu::current->warps[threadIdx.x / 32]->arrive_and_wait();
}
namespace pka_emu {
// The calling warp's exchange slots: lane l's are [l * kSlots, (l + 1) * kSlots).
inline uint64_t* warp_slots() { return current->xchg.data() + (threadIdx.x / 32) * 32 * kSlots; }
}  // namespace pka_emu
inline float __shfl_xor_sync(unsigned, float v, int lane_mask) {
  uint64_t* slots = ::pka_emu::warp_slots();
  const unsigned lane = threadIdx.x % 32;
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  slots[lane * ::pka_emu::kSlots] = bits;
  __syncwarp();
  bits = static_cast<uint32_t>(slots[(lane ^ static_cast<unsigned>(lane_mask)) * ::pka_emu::kSlots]);
  __syncwarp();
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}
// Whether p points into the block's shared memory (the device's __isShared).
inline bool __isShared(const void* p) {
  const auto* c = static_cast<const unsigned char*>(p);
  const unsigned char* base = ::pka_emu::current->storage.get();
  return c >= base && c < base + ::pka_emu::current->smem_size;
}
inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }
inline int min(int a, int b) { return a < b ? a : b; }
// The kernels' vector accesses (16-byte copies, 8- and 4-byte pairs): misaligned on the device is
// a fault, so here an abort.
#define PKA_EMU_REQUIRE_ALIGNED(p, bytes)                                                   \
  do {                                                                                      \
    if (reinterpret_cast<std::uintptr_t>(p) % (bytes) != 0) {                              \
      std::fprintf(stderr, "emulated CUDA: %zu-byte access not aligned\n", size_t(bytes)); \
      std::abort();                                                                         \
    }                                                                                       \
  } while (0)
