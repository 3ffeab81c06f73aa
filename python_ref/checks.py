"""Argument checks of the op's contract, shared by python_ref and the compiled op layer.

Every message names the argument and the shapes involved.
"""

from __future__ import annotations

import math
import numbers

import torch


def _check_kernel(a, name: str, q: torch.Tensor) -> None:
    B, H, T, _ = q.shape
    if not isinstance(a, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(a).__name__}")
    if a.dim() not in (2, 3) or a.shape[-2:] != (T, T) or (a.dim() == 3 and a.shape[0] != H):
        raise ValueError(
            f"{name} must be [T, T] = [{T}, {T}] or [H, T, T] = [{H}, {T}, {T}] to match q of "
            f"shape {tuple(q.shape)}, got {tuple(a.shape)}"
        )
    if a.dtype != q.dtype:
        raise TypeError(f"{name} dtype {a.dtype} does not match q dtype {q.dtype}")
    if a.device != q.device:
        raise ValueError(f"{name} is on {a.device} but q is on {q.device}")


def check_attention_args(q, k, v, a_k, a_v, lengths, scale, dropout_p, seed, *, check_values=True):
    """Validate the op's arguments; raises TypeError / ValueError naming the bad argument.

    ``check_values`` also reads ``lengths`` to check its range; the compiled op does that check in
    C++ instead, so that this function stays free of data-dependent control flow under torch.compile.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dim() != 4:
        raise ValueError(f"q must be [B, H, T, d], got shape {tuple(q.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} must equal q shape {tuple(q.shape)}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} dtype {t.dtype} does not match q dtype {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if not q.dtype.is_floating_point:
        raise TypeError(f"q must be a floating-point tensor, got {q.dtype}")
    B, H, T, d = q.shape
    if H < 1 or d < 1:
        raise ValueError(f"q must have H >= 1 and d >= 1, got shape {tuple(q.shape)}")
    _check_kernel(a_k, "a_k", q)
    _check_kernel(a_v, "a_v", q)
    if lengths is not None:
        if not isinstance(lengths, torch.Tensor):
            raise TypeError(f"lengths must be an int64 tensor of shape [B] or None, got {type(lengths).__name__}")
        if lengths.shape != (B,):
            raise ValueError(f"lengths must be [B] = [{B}], got shape {tuple(lengths.shape)}")
        if lengths.dtype != torch.int64:
            raise TypeError(f"lengths must be int64, got {lengths.dtype}")
        if lengths.device != q.device and lengths.device.type != "cpu":
            raise ValueError(f"lengths is on {lengths.device} but q is on {q.device}")
        if check_values and lengths.numel() > 0:
            lo, hi = int(lengths.min()), int(lengths.max())
            if lo < 0 or hi > T:
                raise ValueError(f"lengths must lie in [0, T={T}], got values in [{lo}, {hi}]")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if scale is not None and not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale!r}")
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
    if seed is not None and (
        isinstance(seed, bool) or not isinstance(seed, numbers.Integral)
        or not -(2**63) <= seed < 2**64
    ):
        raise ValueError(f"seed must be None or an int in [-2**63, 2**64), got {seed!r}")
