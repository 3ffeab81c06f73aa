"""A small forward + backward of every fused-kernel variant, for compute-sanitizer.

    compute-sanitizer --tool memcheck  python benchmarks/sanitize_case.py [--short | --long]
    compute-sanitizer --tool racecheck python benchmarks/sanitize_case.py --small

Covers float32 / bfloat16 / float16, head dims 16 and 64 (128 without --small), shared and
per-head kernels, dropout, empty and full sequences, and the placements of the block buffers that
long sequences get (all or the least used of them in the global workspace: forced with
PKA_FUSED_WORKSPACE=1 / split on short sequences; without --small also long sequences whose
buffers do not all fit in shared memory), and both places of the 16-bit scores (mma.sync
registers, the default; shared memory with PKA_SMEM_SCORES=1). --short leaves out the long
sequences and --long runs only them, so that a check can sanitize them in two steps.
"""

from __future__ import annotations

import argparse
import os

import torch

import pka_ext


def case(B, H, T, d, dtype, per_head, lengths, dropout_p):
    g = torch.Generator().manual_seed(T + d)
    q, k, v = (torch.randn(B, H, T, d, generator=g).to("cuda", dtype).requires_grad_() for _ in range(3))
    shape = (H, T, T) if per_head else (T, T)
    a_k, a_v = (torch.randn(*shape, generator=g).div(T**0.5).to("cuda", dtype).requires_grad_()
                for _ in range(2))
    lens = torch.tensor(lengths, device="cuda")
    out = pka_ext.pka_attention(q, k, v, a_k, a_v, lens, dropout_p=dropout_p,
                                seed=3 if dropout_p else None)
    out.backward(torch.randn_like(out))
    torch.cuda.synchronize()
    assert torch.isfinite(out).all() and all(torch.isfinite(t.grad).all() for t in (q, k, v, a_k, a_v))


def main():
    ap = argparse.ArgumentParser()
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--small", action="store_true",
                       help="fewer, smaller cases (racecheck is slow)")
    which.add_argument("--short", action="store_true", help="every case but the long sequences")
    which.add_argument("--long", action="store_true", help="only the long sequences")
    args = ap.parse_args()
    if args.long:
        long_cases()
        print("sanitize cases ran")
        return
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    dims = (16, 64) if args.small else (16, 64, 128)
    for dtype in dtypes:
        for d in dims:
            case(3, 2, 37, d, dtype, per_head=d == 16, lengths=[37, 0, 20], dropout_p=0.2)
    # Block buffers in the global workspace: forced on short sequences, and (without --small)
    # chosen by the launch plan for long ones (T=400: the backward's gradient buffers; T=900: the
    # forward's V and all but K in the backward; float32 d=128: none in shared memory).
    for placement in ("1", "split"):
        os.environ["PKA_FUSED_WORKSPACE"] = placement
        case(2, 2, 40, 64, torch.bfloat16, False, [40, 17], 0.1)
        case(2, 1, 37, 16, torch.float32, True, [30, 37], 0.0)
    del os.environ["PKA_FUSED_WORKSPACE"]
    # The 16-bit scores through shared memory (WMMA), the path PKA_SMEM_SCORES=1 selects.
    os.environ["PKA_SMEM_SCORES"] = "1"
    case(3, 2, 37, 64, torch.bfloat16, False, [37, 0, 20], 0.2)
    case(2, 2, 40, 16, torch.float16, True, [40, 17], 0.0)
    del os.environ["PKA_SMEM_SCORES"]
    if not (args.small or args.short):
        long_cases()
    print("sanitize cases ran")


def long_cases():
    case(1, 1, 400, 64, torch.bfloat16, False, [390], 0.1)
    case(1, 1, 900, 64, torch.bfloat16, False, [850], 0.1)
    case(1, 1, 900, 128, torch.float32, True, [900], 0.0)


if __name__ == "__main__":
    main()
