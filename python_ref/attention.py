"""Positional-kernel attention, written out in full."""

from __future__ import annotations

import torch

from python_ref.checks import check_attention_args
from python_ref.dropout import dropout_keep_mask, dropout_threshold


def pka_attention(q, k, v, a_k, a_v, lengths=None, *, scale=None, dropout_p=0.0, seed=None):
    """Reference positional-kernel attention; same signature and contract as ``pka_ext.pka_attention``.

    q, k, v: [B, H, T, d]. a_k, a_v: [T, T] or [H, T, T], lower triangle read. lengths: int64 [B],
    left padding. With ``dropout_p > 0`` a ``seed`` is required here (the compiled layer draws one).
    """
    check_attention_args(q, k, v, a_k, a_v, lengths, scale, dropout_p, seed)
    B, H, T, d = q.shape
    if T == 0:
        # The row maxima below need a key. Every input stays in the graph, so that the gradients
        # are zeros of the inputs' shapes, as the op's are.
        return (q + k + v) * 0 + (a_k.sum() + a_v.sum()) * 0
    if scale is None:
        scale = d**-0.5
    if lengths is None:
        lengths = torch.full((B,), T, dtype=torch.int64)
    lengths = lengths.to(q.device)

    position = torch.arange(T, device=q.device)
    valid = position[None, :] >= (T - lengths)[:, None]  # [B, T]: row is a real item
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()  # [T, T]: j <= i

    # Mixing along time; padded rows of q, k and v count as zero. Selected, not multiplied by the
    # mask, so that whatever they hold (NaN, Inf) reaches neither the outputs nor the gradients.
    row = valid[:, None, :, None]  # [B, 1, T, 1]
    q0, k0, v0 = (torch.where(row, t, torch.zeros_like(t)) for t in (q, k, v))
    A_k = a_k.tril()  # [T, T] or [H, T, T]
    A_v = a_v.tril()
    K = A_k @ k0  # [B, H, T, d]
    V = A_v @ v0

    S = scale * (q0 @ K.transpose(-1, -2))  # [B, H, T, T]
    visible = causal & valid[:, None, None, :] & valid[:, None, :, None]  # [B, 1, T, T]

    # Softmax over visible keys; a row with no visible key gets P = 0 (never NaN).
    row_max = S.masked_fill(~visible, float("-inf")).amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    e = torch.where(visible, torch.exp(torch.where(visible, S - row_max, torch.zeros_like(S))), 0.0)
    denom = e.sum(dim=-1, keepdim=True)
    P = e / torch.where(denom > 0, denom, torch.ones_like(denom))

    if dropout_p > 0:
        if seed is None:
            raise ValueError("python_ref.pka_attention needs an explicit seed when dropout_p > 0")
        keep = dropout_keep_mask(seed, B, H, T, device=q.device) >= dropout_threshold(dropout_p)
        P = P * keep / (1.0 - dropout_p)

    # Rows of padded queries are 0 (their P rows are); selected so that an incoming gradient's
    # padded rows, whatever they hold, are never multiplied in.
    return torch.where(row, P @ V, torch.zeros_like(q))  # [B, H, T, d]
