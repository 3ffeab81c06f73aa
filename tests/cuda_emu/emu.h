// A CPU model of the CUDA execution the fused kernels rely on, so that their device code
// (csrc/pka_fused_kernels.cuh; WMMA through wmma_emu.h) can run and be tested without a GPU.
//
// Each block runs as one std::thread per CUDA thread (128 or 256), sharing one "shared memory"
// buffer (filled with NaN bytes first, so reading anything not written shows up); __syncthreads is
// a barrier over the block, __syncwarp a barrier over the 32 threads of a warp, __shfl_xor_sync an
// exchange through per-lane slots between two warp barriers (so are wmma_emu.h's mma.sync and
// ldmatrix; these order no memory, see Collective), atomicAdd an atomic_ref add. All blocks
// of a grid run at once. A divergent barrier deadlocks here, as it is undefined on the device.
#pragma once

#include <atomic>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

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

// The emulation's barriers: a phase counter, waited on with the futex system call. Not
// std::barrier: its waiting goes through libstdc++'s process-wide table of waiters, whose seq_cst
// atomics ThreadSanitizer takes as synchronisation between any two threads that wait, so that
// warps of a block, and blocks, would seem ordered where nothing orders them on the device. Here
// the only synchronisation is through the barrier's own atomics (every arrival before every
// departure).
class Barrier {
 public:
  explicit Barrier(unsigned n) : n_(n) {}
  void arrive_and_wait() {
    const unsigned ph = phase_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) == n_ - 1) {
      arrived_.store(0, std::memory_order_relaxed);
      phase_.store(ph + 1, std::memory_order_release);
      syscall(SYS_futex, &phase_, FUTEX_WAKE_PRIVATE, INT_MAX, nullptr, nullptr, 0);
      return;
    }
    while (phase_.load(std::memory_order_acquire) == ph)
      syscall(SYS_futex, &phase_, FUTEX_WAIT_PRIVATE, ph, nullptr, nullptr, 0);
  }

 private:
  const unsigned n_;
  std::atomic<unsigned> arrived_{0}, phase_{0};
  static_assert(sizeof(std::atomic<unsigned>) == 4, "futex word");
};

struct BlockState {
  explicit BlockState(unsigned threads, size_t smem_bytes)
      : block(threads), xchg(threads * kSlots), smem_size(smem_bytes) {
    for (unsigned w = 0; w < threads / 32; ++w) {
      warps.emplace_back(std::make_unique<Barrier>(32));
      exchanges.emplace_back(std::make_unique<Barrier>(32));
    }
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
  Barrier block;
  std::vector<std::unique_ptr<Barrier>> warps;
  std::vector<std::unique_ptr<Barrier>> exchanges;  // see Collective
  std::vector<uint64_t> xchg;  // per-lane slots of the warp-collective operations
  size_t smem_size;
  std::unique_ptr<unsigned char, Free> storage;
};

inline thread_local BlockState* current = nullptr;
inline thread_local dim3 thread_idx, block_idx;

// All blocks of the grid run at once, as on the device (where they share global memory with no
// ordering between them): an access pair of two blocks that only atomics may make is a race here
// too, in the results and for ThreadSanitizer, rather than ordered by running blocks in turn.
template <typename Kernel, typename Params>
void launch(Kernel kernel, unsigned grid, unsigned threads, size_t smem_bytes, const Params& p) {
  std::vector<std::unique_ptr<BlockState>> states;
  for (unsigned b = 0; b < grid; ++b) states.emplace_back(std::make_unique<BlockState>(threads, smem_bytes));
  std::vector<std::thread> pool;
  pool.reserve(size_t(grid) * threads);
  for (unsigned b = 0; b < grid; ++b)
    for (unsigned t = 0; t < threads; ++t)
      pool.emplace_back([&, b, t] {
        current = states[b].get();
        thread_idx.x = t;
        block_idx.x = b;
        kernel(p);
      });
  for (auto& th : pool) th.join();
  for (unsigned b = 0; b < grid; ++b)
    if (!states[b]->guard_intact()) {
      std::fprintf(stderr, "emulated CUDA: block %u wrote past its %zu bytes of dynamic shared memory\n",
                   b, smem_bytes);
      std::abort();
    }
}

// The warp-collective models (shuffles here, mma.sync and ldmatrix in wmma_emu.h) meet at a warp
// barrier to exchange registers, but on the device they order no memory: only __syncwarp (and
// __syncthreads) make one lane's shared-memory writes visible to another (CUDA C++ Programming
// Guide, __syncwarp; the PTX ISA gives shfl.sync, ldmatrix and mma.sync no memory ordering). Under
// ThreadSanitizer their barriers are therefore hidden from it as synchronisation (the exchange
// slots are relaxed atomics), so that a missing __syncwarp is reported even where a collective
// happens to sit between the write and the read.
#if defined(__SANITIZE_THREAD__)
}  // namespace pka_emu
extern "C" void AnnotateIgnoreSyncBegin(const char* file, int line);
extern "C" void AnnotateIgnoreSyncEnd(const char* file, int line);
namespace pka_emu {
struct Collective {
  Collective() { AnnotateIgnoreSyncBegin(__FILE__, __LINE__); }
  ~Collective() { AnnotateIgnoreSyncEnd(__FILE__, __LINE__); }
};
#else
struct Collective {};
#endif
inline void put_slot(uint64_t* s, uint64_t v) { std::atomic_ref<uint64_t>(*s).store(v, std::memory_order_relaxed); }
inline uint64_t get_slot(uint64_t* s) { return std::atomic_ref<uint64_t>(*s).load(std::memory_order_relaxed); }
}  // namespace pka_emu

#define threadIdx (::pka_emu::thread_idx)
#define blockIdx (::pka_emu::block_idx)
#define PKA_DYNAMIC_SMEM(name) unsigned char* name = ::pka_emu::current->storage.get()

inline void __syncthreads() { ::pka_emu::current->block.arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) {
  ::pka_emu::current->warps[threadIdx.x / 32]->arrive_and_wait();
}
namespace pka_emu {
// The barrier of a warp-collective exchange: the warp's barrier, but see Collective.
inline void exchange_barrier() { current->exchanges[threadIdx.x / 32]->arrive_and_wait(); }
}  // namespace pka_emu
namespace pka_emu {
// The calling warp's exchange slots: lane l's are [l * kSlots, (l + 1) * kSlots).
inline uint64_t* warp_slots() { return current->xchg.data() + (threadIdx.x / 32) * 32 * kSlots; }
}  // namespace pka_emu
inline float __shfl_xor_sync(unsigned, float v, int lane_mask) {
  const ::pka_emu::Collective no_memory_order;
  uint64_t* slots = ::pka_emu::warp_slots();
  const unsigned lane = threadIdx.x % 32;
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  ::pka_emu::put_slot(&slots[lane * ::pka_emu::kSlots], bits);
  ::pka_emu::exchange_barrier();
  bits = static_cast<uint32_t>(::pka_emu::get_slot(&slots[(lane ^ static_cast<unsigned>(lane_mask)) * ::pka_emu::kSlots]));
  ::pka_emu::exchange_barrier();
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
