"""The fused CUDA kernels' device code, run on the CPU through a model of CUDA execution.

``tests/cuda_emu`` compiles ``csrc/pka_fused_kernels.cuh`` as plain C++: every block runs as 128
threads with real barriers for __syncthreads / __syncwarp, shuffles through shared slots, NaN-filled
shared memory and NaN-poisoned outputs. float32 runs its CUDA-core tile products as on the device;
bfloat16 and float16 stand-ins run the kernels' WMMA and mma.sync / ldmatrix code against models of
the fragments (their per-lane layouts, alignment and leading-dimension rules). This checks the
kernels on machines without a GPU; the real tensor-core instructions and performance need the
device (tests/test_cuda_fused.py).
Built with ThreadSanitizer, the same emulation checks for races (test_emulated_kernels_are_race_free).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

import pka_ext  # noqa: F401  (registers torch.ops.pka_ext, the CPU op used for lse)
import python_ref

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ("q", "k", "v", "a_k", "a_v")


@pytest.fixture(scope="module")
def emu():
    return build_emu()


def build_emu(thread_sanitizer=False):
    """The emulator extension; with `thread_sanitizer`, a separate build instrumented by
    ThreadSanitizer (loadable only in a process that has the TSAN runtime preloaded)."""
    from torch.utils.cpp_extension import load

    suffix = "_tsan" if thread_sanitizer else ""
    build = os.path.join(REPO, "build", "cuda_emu" + suffix)
    os.makedirs(build, exist_ok=True)
    # -std=c++20: std::barrier, std::atomic_ref (torch 2.11 builds C++17).
    cflags = ["-O1", "-g", "-fsanitize=thread"] if thread_sanitizer else ["-O2"]
    return load(
        name="pka_fused_emu" + suffix,
        sources=[os.path.join(REPO, "tests", "cuda_emu", "emu_ext.cpp")],
        extra_include_paths=[os.path.join(REPO, "csrc"), os.path.join(REPO, "tests", "cuda_emu")],
        extra_cflags=[*cflags, "-std=c++20"],
        extra_ldflags=["-fsanitize=thread"] if thread_sanitizer else [],
        build_directory=build,
        verbose=False,
    )


def make_case(B, H, T, d, per_head, lengths, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, d, generator=g, dtype=torch.float64) for _ in range(3))
    shape = (H, T, T) if per_head else (T, T)
    a_k, a_v = (torch.randn(*shape, generator=g, dtype=torch.float64) / math.sqrt(T) for _ in range(2))
    dout = torch.randn(B, H, T, d, generator=g, dtype=torch.float64)
    return [q, k, v, a_k, a_v], torch.tensor(lengths, dtype=torch.int64), dout


def rel(x, ref):
    return ((x.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


CASES = [
    # B, H, T, d, per_head, lengths, dropout_p, placement of the block buffers, warps per block
    (3, 2, 1, 16, False, [1, 0, 1], 0.0, "smem", 4),
    (3, 2, 5, 16, True, [5, 0, 3], 0.3, "split", 8),
    (3, 1, 17, 16, False, [17, 16, 1], 0.0, "workspace", 8),
    (2, 2, 40, 32, True, [40, 23], 0.25, "smem", 4),
    (2, 2, 40, 32, False, [33, 0], 0.0, "split", 8),
    (2, 1, 70, 16, False, [70, 65], 0.5, "smem", 8),
    (2, 1, 70, 16, True, [70, 49], 0.1, "workspace", 4),
    (1, 1, 24, 64, False, [21], 0.2, "split", 4),
    (1, 1, 20, 128, True, [20], 0.0, "smem", 8),
    (2, 1, 200, 32, False, [200, 141], 0.1, "smem", 4),  # 13 tiles: 7 rounds of in-place mixing
]
# Forward block buffers (K, V) in shared memory per placement.
FWD_SMEM_BUFS = {"smem": 2, "split": 1, "workspace": 0}


@pytest.mark.parametrize("B,H,T,d,per_head,lengths,dropout_p,placement,warps", CASES)
def test_emulated_kernels_match_reference(emu, B, H, T, d, per_head, lengths, dropout_p, placement,
                                          warps):
    x64, lens, dout64 = make_case(B, H, T, d, per_head, lengths, seed=T * 7 + d)
    seed = 1234 if dropout_p > 0 else 0
    scale = d**-0.5
    x32 = [t.float().contiguous() for t in x64]
    out, lse, smem_bufs = emu.fwd(*x32, lens, scale, dropout_p, seed, placement, warps)
    assert smem_bufs == FWD_SMEM_BUFS[placement]

    leaves = [t.clone().requires_grad_(True) for t in x64]
    out_r = python_ref.pka_attention(*leaves, lens, scale=scale, dropout_p=dropout_p,
                                     seed=seed if dropout_p > 0 else None)
    grads_r = torch.autograd.grad(out_r, leaves, dout64)
    _, lse_r = torch.ops.pka_ext.pka_fwd(*x64, lens, scale, dropout_p,
                                         torch.tensor([seed]) if dropout_p > 0 else None)

    assert not torch.isnan(out).any() and not torch.isnan(lse).any(), "an output was never written"
    assert rel(out, out_r.detach()) <= 1e-4, f"out: {rel(out, out_r.detach()):.2e}"
    assert (lse.double() - lse_r).abs().max().item() <= 1e-4
    pad = torch.arange(T)[None, :] < (T - lens)[:, None]
    assert (out.transpose(1, 2)[pad] == 0).all() and (lse[pad[:, None, :].expand_as(lse)] == 0).all()

    grads = emu.bwd(dout64.float(), *x32, lens, out, lse, scale, dropout_p, seed, placement, warps)
    for name, g, gr in zip(NAMES, grads, grads_r):
        assert not torch.isnan(g).any(), f"d{name}: an element was never written"
        assert rel(g, gr) <= 1e-4, f"d{name}: {rel(g, gr):.2e}"
    for name, g in zip(NAMES[:3], grads[:3]):
        assert (g.transpose(1, 2)[pad] == 0).all(), f"d{name}: padded rows must be 0"
    for name, g in zip(NAMES[3:], grads[3:]):
        assert (g.triu(1) == 0).all(), f"d{name}: upper triangle must be 0"


def test_launch_choices_agree_bitwise(emu):
    """4 or 8 warps per block, block buffers in shared memory, split or in the workspace: every tile
    is computed by one warp in the same order, so out, lse, dq, dk, dv are bitwise the same; the
    kernel gradients differ only by the order of their atomic additions."""
    x64, lens, dout64 = make_case(2, 2, 70, 32, False, [70, 45], seed=3)
    x32 = [t.float().contiguous() for t in x64]
    results = []
    for placement, warps in (("smem", 4), ("smem", 8), ("split", 4), ("workspace", 8)):
        out, lse, _ = emu.fwd(*x32, lens, 32**-0.5, 0.2, 99, placement, warps)
        grads = emu.bwd(dout64.float(), *x32, lens, out, lse, 32**-0.5, 0.2, 99, placement, warps)
        results.append((out, lse, *grads))
    first = results[0]
    for other in results[1:]:
        for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), first[:5], other[:5]):
            assert torch.equal(a, b), name
        for name, a, b in zip(("da_k", "da_v"), first[5:], other[5:]):
            assert rel(a, b.double()) <= 1e-6, name


def test_bfloat16_forward_paths(emu):
    """The 16-bit forward: launch choices (warps, placements: the workspace's fragments are loaded
    lane by lane, shared memory's through the ldmatrix model) agree bitwise; the online softmax in
    registers and the two-pass one through shared memory (smem_scores) agree up to the rounding of
    the probabilities to bfloat16, lse to fp32 rounding."""
    x64, lens, _ = make_case(3, 2, 70, 32, True, [70, 45, 0], seed=4)
    x = [t.to(torch.bfloat16).contiguous() for t in x64]
    runs = [emu.fwd(*x, lens, 32**-0.5, 0.2, 99, placement, warps)[:2]
            for placement, warps in (("smem", 4), ("smem", 8), ("split", 4), ("workspace", 8))]
    for out, lse in runs[1:]:
        assert torch.equal(out, runs[0][0]) and torch.equal(lse, runs[0][1])
    out_s, lse_s, _ = emu.fwd(*x, lens, 32**-0.5, 0.2, 99, "smem", 4, smem_scores=True)
    assert rel_l2(runs[0][0], out_s.double()) <= 1e-2
    assert (runs[0][1] - lse_s).abs().max().item() <= 1e-5 * lse_s.abs().max().item()


@pytest.mark.parametrize("dtype,placement,warps,smem_scores", [
    (torch.float32, "smem", 4, True),
    (torch.float32, "workspace", 8, True),
    (torch.bfloat16, "split", 4, False),
    (torch.bfloat16, "smem", 8, True),
    (torch.float16, "workspace", 4, False),
])
def test_poisoned_padding_changes_nothing(emu, dtype, placement, warps, smem_scores):
    """README: whatever the padded rows of q, k, v and of the incoming gradient hold (NaN, Inf),
    no output or gradient changes. The fused kernels against themselves on clean inputs: bitwise
    the same out, lse, dq, dk, dv and (up to the order of the atomics) da_k, da_v."""
    T, d = 37, 32
    x64, lens, dout64 = make_case(4, 2, T, d, True, [T, 0, 20, 1], seed=8)
    x = [t.to(dtype).contiguous() for t in x64]
    dout = dout64.to(dtype).contiguous()
    pad = torch.arange(T)[None, :] < (T - lens)[:, None]  # [B, T]
    poisoned = []
    for i, t in enumerate((*x[:3], dout)):
        t = t.clone()
        t.transpose(1, 2)[pad] = float("nan") if i % 2 else float("inf")
        poisoned.append(t)
    scale = d**-0.5
    runs = []
    for q, k, v, g in (x[:3] + [dout], poisoned):
        out, lse, _ = emu.fwd(q, k, v, *x[3:], lens, scale, 0.2, 9, placement, warps, smem_scores)
        grads = emu.bwd(g, q, k, v, *x[3:], lens, out, lse, scale, 0.2, 9, placement, warps,
                        smem_scores)
        runs.append((out, lse, *grads))
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), runs[0][:5], runs[1][:5]):
        assert torch.equal(a, b), name
    for name, a, b in zip(("da_k", "da_v"), runs[0][5:], runs[1][5:]):
        assert torch.isfinite(b).all() and rel(b, a.double()) <= 1e-6, name
    assert torch.all(runs[1][0].transpose(1, 2)[pad] == 0)


@pytest.mark.parametrize("bad", [-1, 5])
def test_out_of_range_device_lengths_assert_in_the_kernel(emu, bad):
    """The kernels check lengths as they read them (the host does not, to avoid a sync); the
    failed assertion ends the process, so it runs in a child."""
    script = (
        "import sys, torch\n"
        f"sys.path.insert(0, {os.path.join(REPO, 'tests')!r})\n"
        "from test_fused_emulated import build_emu\n"
        "q, a = torch.randn(2, 1, 4, 16), torch.eye(4)\n"
        f"build_emu().fwd(q, q, q, a, a, torch.tensor([{bad}, 1]), 0.25, 0.0, 0, \"smem\", 4)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          cwd=REPO)
    assert proc.returncode != 0
    assert "lengths[b] must lie in [0, T]" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("d,T,elem,fits_fwd,fits_bwd", [
    (64, 200, 2, True, True),     # the headline shape keeps everything in shared memory
    (64, 512, 2, True, False),    # the backward of long sequences moves buffers to the workspace
    (128, 1024, 4, False, False),
    (16, 50, 4, True, True),
])
def test_launch_plan(emu, d, T, elem, fits_fwd, fits_bwd):
    limit = 227 * 1024
    fwd_smem, bwd_smem = emu.smem_bytes(d, T, True, elem)
    assert (fwd_smem <= limit) == fits_fwd and (bwd_smem <= limit) == fits_bwd
    fwd_ws, bwd_ws = emu.smem_bytes(d, T, False, elem)
    assert fwd_ws <= limit and bwd_ws <= limit  # the workspace path always launches


@pytest.mark.parametrize("d,T,blocks", [(64, 200, 3), (64, 128, 4), (32, 200, 4), (64, 50, 6)])
def test_forward_blocks_per_sm(emu, d, T, blocks):
    """16-bit forward blocks that share an H100/H200 SM by shared memory (228 KB, 1 KB reserved
    per block): the in-place mixing and the query tile held in registers are there for the third
    block at the headline shape."""
    fwd_smem, _ = emu.smem_bytes(d, T, True, 2)
    assert (228 * 1024) // (fwd_smem + 1024) == blocks


@pytest.mark.parametrize("d,T,elem,forced,placement,plan", [
    # plan: (warps, block buffers in shared memory)
    (64, 200, 2, 0, "smem", (4, 2)),    # headline: three 4-warp blocks per SM
    (64, 512, 2, 0, "smem", (8, 2)),    # one 4-warp block would have the SM to itself: 8 warps
    (128, 200, 2, 0, "smem", (8, 2)),
    (64, 1024, 2, 0, "smem", (8, 1)),   # V goes to the workspace, K stays
    (64, 512, 2, 4, "smem", (4, 2)),    # PKA_FWD_WARPS=4
    (64, 200, 2, 8, "smem", (8, 2)),    # PKA_FWD_WARPS=8
    (64, 200, 2, 0, "split", (4, 1)),   # PKA_FUSED_WORKSPACE=split
    (64, 200, 2, 0, "workspace", (4, 0)),  # PKA_FUSED_WORKSPACE=1: registers bound the blocks
    (64, 200, 4, 0, "smem", (8, 2)),    # float32 needs twice the space
])
def test_forward_launch_plan(emu, d, T, elem, forced, placement, plan):
    assert emu.fwd_plan(d, T, elem, 227 * 1024, 228 * 1024, 1024, forced, placement) == plan


@pytest.mark.parametrize("d,T,forced,placement,plan", [
    (64, 200, 0, "smem", (8, 4)),    # headline: 8 warps still fit beside the four buffers
    (64, 300, 0, "smem", (4, 4)),    # 8 warps would not: 4 warps with every buffer in shared memory
    (64, 400, 0, "smem", (8, 2)),    # K and V stay, the gradients' buffers go to the workspace
    (64, 512, 0, "smem", (4, 2)),    # ... with 4 warps
    (64, 1024, 0, "smem", (4, 1)),   # only K fits
    (64, 200, 4, "smem", (4, 4)),    # PKA_BWD_WARPS=4
    (64, 400, 4, "smem", (4, 2)),
    (64, 200, 0, "split", (8, 2)),   # PKA_FUSED_WORKSPACE=split
    (64, 200, 0, "workspace", (8, 0)),  # PKA_FUSED_WORKSPACE=1
    (128, 12000, 8, "smem", (4, 0)),  # with 8 warps the row arrays no longer fit: 4
])
def test_backward_launch_plan(emu, d, T, forced, placement, plan):
    assert emu.bwd_plan(d, T, 2, 227 * 1024, forced, placement) == plan


def rel_l2(x, ref):
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


BF16, F16 = torch.bfloat16, torch.float16


@pytest.mark.parametrize("T,d,per_head,lengths,dropout_p,placement,warps,smem_scores,dtype", [
    (40, 32, False, [40, 17], 0.0, "smem", 8, False, BF16),
    (70, 16, True, [70, 0], 0.2, "split", 4, False, BF16),
    (70, 16, True, [70, 0], 0.2, "split", 4, True, BF16),
    (33, 64, False, [33, 30], 0.0, "workspace", 8, False, BF16),
    (20, 128, True, [20, 9], 0.1, "smem", 4, False, BF16),
    (20, 128, True, [20, 9], 0.1, "workspace", 4, True, BF16),
    (200, 64, False, [200, 137, 61], 0.0, "smem", 8, False, BF16),  # the benchmarks' headline T, d
    (40, 32, True, [40, 17], 0.1, "smem", 4, False, F16),
    (33, 64, False, [33, 30], 0.0, "workspace", 8, False, F16),
    (70, 16, False, [70, 0], 0.2, "split", 8, True, F16),
])
def test_emulated_16bit_path(emu, T, d, per_head, lengths, dropout_p, placement, warps,
                             smem_scores, dtype):
    """The 16-bit paths (shared-memory layout, roundings, WMMA and mma.sync tile products on the
    fragment models), bfloat16 and float16: error vs float64 at most 2x that of the same-dtype
    baseline (matmul + SDPA, or python_ref with dropout)."""
    import sys

    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    from attention_impls import composition

    B, H = len(lengths), 2
    x64, lens, dout64 = make_case(B, H, T, d, per_head, lengths, seed=T + d)
    seed = 77 if dropout_p > 0 else 0
    x16 = [t.to(dtype).contiguous() for t in x64]
    exact_in = [t.double() for t in x16]
    dout16 = dout64.to(dtype)
    kw = dict(dropout_p=dropout_p, seed=seed if dropout_p > 0 else None)

    def fwd_bwd(fn, xs, dout):
        leaves = [t.clone().requires_grad_(True) for t in xs]
        out = fn(*leaves, lens, **kw)
        return out.detach(), torch.autograd.grad(out, leaves, dout)

    out_e, grads_e = fwd_bwd(python_ref.pka_attention, exact_in, dout16.double())
    base = python_ref.pka_attention if dropout_p > 0 else (
        lambda q, k, v, a_k, a_v, lengths, **_: composition(q, k, v, a_k, a_v, lengths))
    out_b, grads_b = fwd_bwd(base, x16, dout16)

    out, lse, _ = emu.fwd(*x16, lens, d**-0.5, dropout_p, seed, placement, warps, smem_scores)
    grads = emu.bwd(dout16.contiguous(), *x16, lens, out, lse, d**-0.5, dropout_p, seed, placement,
                    warps, smem_scores)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    e, eb = rel_l2(out, out_e), rel_l2(out_b, out_e)
    assert e <= 2 * eb + 1e-6, f"out: emulated {e:.3e} vs baseline {eb:.3e}"
    for name, g, gb, ge in zip(NAMES, grads, grads_b, grads_e):
        assert not torch.isnan(g).any(), f"d{name}: an element was never written"
        e, eb = rel_l2(g, ge), rel_l2(gb, ge)
        assert e <= 2 * eb + 1e-6, f"d{name}: emulated {e:.3e} vs baseline {eb:.3e}"


# Every CASES launch plus the headline T and d at both block sizes, in float32 (CUDA-core products),
# bfloat16 and float16 (tensor-core paths).
RACE_CASES = CASES + [(1, 2, 200, 64, False, [200], 0.1, "smem", 8),
                      (2, 1, 200, 64, True, [200, 90], 0.0, "smem", 4)]


def thread_sanitizer_runtime():
    """Path of the compiler's ThreadSanitizer runtime, or None."""
    try:
        path = subprocess.run(["c++", "-print-file-name=libtsan.so"], capture_output=True, text=True,
                              timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return os.path.realpath(path) if os.path.isabs(path) and os.path.exists(path) else None


def race_check_main():
    """Child of test_emulated_kernels_are_race_free, started with the TSAN runtime preloaded."""
    os.environ.pop("LD_PRELOAD")  # the compiler the build starts must not run under TSAN
    emu = build_emu(thread_sanitizer=True)
    for B, H, T, d, per_head, lengths, dropout_p, placement, warps in RACE_CASES:
        x64, lens, dout64 = make_case(B, H, T, d, per_head, lengths, seed=T + d + B)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            x = [t.to(dtype).contiguous() for t in x64]
            # bfloat16 runs both score paths, float32 has only the shared-memory one, and float16
            # the register one (its shared-memory path is bfloat16's with another element type).
            paths = {torch.float32: (True,), torch.bfloat16: (True, False), torch.float16: (False,)}
            for smem_scores in paths[dtype]:
                out, lse, _ = emu.fwd(*x, lens, d**-0.5, dropout_p, 5, placement, warps, smem_scores)
                grads = emu.bwd(dout64.to(dtype).contiguous(), *x, lens, out, lse, d**-0.5, dropout_p,
                                5, placement, warps, smem_scores)
                assert not any(torch.isnan(t).any() for t in (out, lse, *grads))
            print("case ok", flush=True)


def test_emulated_kernels_are_race_free():
    """ThreadSanitizer over the emulated kernels, the CPU counterpart of compute-sanitizer's
    racecheck. Every emulated CUDA thread is an OS thread whose only synchronisation with the others
    is the emulated __syncthreads / __syncwarp / shuffle, so a race TSAN reports is a pair of
    accesses (shared memory, workspace or outputs) that no barrier orders on the device either,
    whether or not the timing of this run exposed it in the results. Deleting the first barrier of
    the in-place mixing, or the __syncwarp between put_tile's fragment store and its lanes' reads,
    makes this fail."""
    runtime = thread_sanitizer_runtime()
    if runtime is None:
        pytest.skip("the compiler has no ThreadSanitizer runtime (c++ -print-file-name=libtsan.so)")
    env = dict(os.environ, LD_PRELOAD=runtime, OMP_NUM_THREADS="1",
               TSAN_OPTIONS="halt_on_error=0 report_signal_unsafe=0 ignore_noninstrumented_modules=1 "
                            "exitcode=66")
    script = (f"import sys; sys.path.insert(0, {os.path.join(REPO, 'tests')!r}); "
              "import test_fused_emulated as t; t.race_check_main()")
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         timeout=1200)
    report = run.stderr.find("WARNING: ThreadSanitizer")
    assert report < 0, run.stderr[report:report + 3000]
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("case ok") == 3 * len(RACE_CASES)
