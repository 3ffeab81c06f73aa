from __future__ import annotations

import os
import sys

import pytest
import torch

# The tests import python_ref and pka_ext from the repository (pka_ext installed editable).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(REPO), "shared", "data")


def make_inputs(B, H, T, d, *, per_head=False, dtype=torch.float64, device="cpu", seed=0,
                lengths="random", requires_grad=True):
    """Random op inputs; kernels have random upper triangles, which the op must ignore."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, d, generator=g, dtype=dtype) for _ in range(3))
    shape = (H, T, T) if per_head else (T, T)
    a_k = torch.randn(*shape, generator=g, dtype=dtype) / T**0.5
    a_v = torch.randn(*shape, generator=g, dtype=dtype) / T**0.5
    if lengths == "random":
        lens = torch.randint(0, T + 1, (B,), generator=g)
        lens[0] = T
        if B > 1:
            lens[1] = 0
    elif lengths is None:
        lens = None
    else:
        lens = torch.as_tensor(lengths, dtype=torch.int64)
    tensors = [t.to(device).requires_grad_(requires_grad) for t in (q, k, v, a_k, a_v)]
    return (*tensors, None if lens is None else lens.to(device))


def max_rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x - ref| / max(|ref|, tiny)."""
    denom = ref.abs().max().clamp_min(1e-30)
    return ((x.double() - ref.double()).abs().max() / denom).item()


@pytest.fixture
def inputs_factory():
    return make_inputs


@pytest.fixture
def no_tf32():
    """Full-precision fp32 GEMMs on the device and for the references (TF32 would cost ~1e-3)."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old
