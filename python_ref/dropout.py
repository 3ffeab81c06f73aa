"""The counter-based dropout generator, in integer tensor arithmetic.

Bit-identical to ``csrc/pka_dropout.h`` (which documents the construction): the decision for
P[b, h, i, j] is a hash of (seed, b, h, i, j). uint32 arithmetic is emulated in int64 tensors; the
32x32-bit multiply is split into 16-bit halves so no intermediate exceeds 2**48.
"""

from __future__ import annotations

import math

import torch

_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    lo = (x & 0xFFFF) * c
    hi = (((x >> 16) * c) & 0xFFFF) << 16
    return (lo + hi) & _MASK32


def _fmix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def dropout_threshold(p: float) -> int:
    """floor(p * 2**24): a 24-bit draw below it drops the element."""
    return math.floor(p * 16777216.0)


def dropout_keep_mask(seed: int, B: int, H: int, T: int, device=None) -> torch.Tensor:
    """Keep-mask bits for every (b, h, i, j) as a [B, H, T, T] tensor of 24-bit ints (int64).

    Compare with ``dropout_threshold(p)``: an element is kept iff its value is >= the threshold.
    """
    seed_u = seed % 2**64
    b = torch.arange(B, device=device).view(B, 1, 1, 1)
    h = torch.arange(H, device=device).view(1, H, 1, 1)
    i = torch.arange(T, device=device).view(1, 1, T, 1)
    j = torch.arange(T, device=device).view(1, 1, 1, T)
    x = _fmix32(torch.tensor((seed_u & _MASK32) ^ 0x9E3779B9, device=device))
    x = _fmix32(x ^ (seed_u >> 32))
    x = _fmix32(x ^ b)
    x = _fmix32(x ^ h)
    row_key = _fmix32(x ^ i)
    return _fmix32(row_key ^ j) >> 8
