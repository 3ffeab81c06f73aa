"""The attention implementations the benchmarks compare, all with autograd.

- ``pka``: the compiled op (``pka_ext.pka_attention``).
- ``reference``: ``python_ref.pka_attention`` (materialises [B, H, T, T]).
- ``composition``: what a user would write without us: mixing by ``torch.matmul``, then
  ``F.scaled_dot_product_attention`` with a boolean mask. Padded queries attend to themselves so
  SDPA never sees an empty row, and their outputs are zeroed afterwards.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import python_ref


def composition(q, k, v, a_k, a_v, lengths):
    B, H, T, d = q.shape
    pos = torch.arange(T, device=q.device)
    valid = pos[None, :] >= (T - lengths)[:, None]  # [B, T]
    K = a_k.tril() @ (k * valid[:, None, :, None])
    V = a_v.tril() @ (v * valid[:, None, :, None])
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    eye = torch.eye(T, dtype=torch.bool, device=q.device)
    mask = (causal & valid[:, None, None, :]) | eye  # [B, 1, T, T]
    out = F.scaled_dot_product_attention(q, K, V, attn_mask=mask)
    return out * valid[:, None, :, None]


def pka(q, k, v, a_k, a_v, lengths):
    import pka_ext

    return pka_ext.pka_attention(q, k, v, a_k, a_v, lengths)


def reference(q, k, v, a_k, a_v, lengths):
    return python_ref.pka_attention(q, k, v, a_k, a_v, lengths)


IMPLS = {"pka": pka, "reference": reference, "composition": composition}


def make_inputs(B, H, T, d, *, dtype=torch.float32, device="cpu", seed=0, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, d, generator=g, dtype=dtype).to(device) for _ in range(3))
    a_k = (torch.eye(T) + 0.05 * torch.rand(T, T, generator=g)).to(dtype).to(device)
    a_v = (torch.eye(T) + 0.05 * torch.rand(T, T, generator=g)).to(dtype).to(device)
    lengths = torch.randint(1, T + 1, (B,), generator=g).to(device)
    tensors = [q, k, v, a_k, a_v]
    for t in tensors:
        t.requires_grad_(requires_grad)
    return (*tensors, lengths)
