"""The op layer: fake implementations, autograd, and the public ``pka_attention``."""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD

from pka_ext._library import built_with_cuda  # importing it loads the compiled ops
from python_ref.checks import check_attention_args

_fwd = torch.ops.pka_ext.pka_fwd
_bwd = torch.ops.pka_ext.pka_bwd


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp32 log-sum-exp for float32 and half types; float64 inputs keep float64 so that gradients
    # stay exact to ~1e-12 (gradcheck).
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("pka_ext::pka_fwd")
def _pka_fwd_fake(q, k, v, a_k, a_v, lengths, scale, dropout_p, seed):
    B, H, T, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((B, H, T), dtype=_lse_dtype(q.dtype))


@torch.library.register_fake("pka_ext::pka_bwd")
def _pka_bwd_fake(dout, q, k, v, a_k, a_v, lengths, out, lse, scale, dropout_p, seed):
    return (q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape),
            a_k.new_empty(a_k.shape), a_v.new_empty(a_v.shape))


def _setup_context(ctx, inputs, output):
    q, k, v, a_k, a_v, lengths, scale, dropout_p, seed = inputs
    out, lse = output
    # The backward op takes no lse gradient: a loss through lse would get zero gradients silently.
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, a_k, a_v, lengths, out, lse, seed)
    ctx.scale = scale
    ctx.dropout_p = dropout_p


def _backward(ctx, dout, _dlse):
    q, k, v, a_k, a_v, lengths, out, lse, seed = ctx.saved_tensors
    dq, dk, dv, da_k, da_v = _bwd(dout, q, k, v, a_k, a_v, lengths, out, lse, ctx.scale,
                                  ctx.dropout_p, seed)
    return dq, dk, dv, da_k, da_v, None, None, None, None


torch.library.register_autograd("pka_ext::pka_fwd", _backward, setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "pka_attention: gradients of its gradients (double backward, e.g. after "
        "torch.autograd.grad(..., create_graph=True)) are not implemented by the compiled op; "
        "python_ref.pka_attention (backend='reference' in the modules) supports them")


# With create_graph=True the backward runs in grad mode: this registration runs pka_bwd below
# autograd there, so first-order gradients work, and only differentiating them again raises.
torch.library.register_autograd("pka_ext::pka_bwd", _no_double_backward)


def seed_tensor(dropout_p: float, seed: int | None) -> torch.Tensor | None:
    """The op's seed argument: None without dropout, else a one-element int64 CPU tensor.

    With ``seed=None`` the seed is drawn from torch's default CPU generator, so
    ``torch.manual_seed`` makes dropout reproducible.
    """
    if dropout_p == 0.0:
        return None
    if seed is None:
        return torch.randint(0, 2**62, (), dtype=torch.int64)
    seed = int(seed)  # numpy integers too
    return torch.tensor(seed - 2**64 if seed >= 2**63 else seed, dtype=torch.int64)


def _reject_forward_ad(*tensors) -> None:
    """Forward-mode AD through the op would silently give zero tangents: torch runs custom ops
    that have no forward-AD formula as constants in that mode."""
    if torch.compiler.is_compiling():  # compiled graphs do not carry forward-AD tangents
        return
    if any(t is not None and fwAD.unpack_dual(t).tangent is not None for t in tensors):
        raise RuntimeError(
            "pka_attention: forward-mode AD (torch.func.jvp, torch.func.jacfwd, "
            "torch.autograd.forward_ad) is not implemented by the compiled op; "
            "python_ref.pka_attention (backend='reference' in the modules) supports it")


# Read once: a constant is free under torch.compile, where calling the op would be traced.
_CUDA_KERNELS = built_with_cuda()


def require_cuda_kernels(q) -> None:
    """CUDA inputs need a build with the CUDA kernels; the dispatcher's own error for a missing
    CUDA kernel does not say that the build is the cause."""
    if q.device.type == "cuda" and not _CUDA_KERNELS:
        raise RuntimeError(
            "pka_ext was built without CUDA kernels, so it cannot run on CUDA tensors. Rebuild with "
            "a CUDA toolkit (PKA_REQUIRE_CUDA=1 CUDA_HOME=/usr/local/cuda pip install "
            "--no-build-isolation -e .), or use python_ref (backend='reference' in the modules).")


def pka_attention(q, k, v, a_k, a_v, lengths=None, *, scale=None, dropout_p=0.0, seed=None):
    """Positional-kernel attention: ``softmax_causal(scale * Q (A_k k)^T) (A_v v)``.

    Parameters
    ----------
    q, k, v : Tensor
        ``[B, H, T, d]``, any strides, one dtype and device: float32, float64,
        bfloat16 or float16 (on the CPU computed in float32).
    a_k, a_v : Tensor
        ``[T, T]`` shared by all heads or ``[H, T, T]`` per head; only the lower triangle (with the
        diagonal) is read, and the upper triangle gets zero gradient.
    lengths : Tensor, optional
        int64 ``[B]`` in ``[0, T]``; sequences are left-padded, sequence b occupying positions
        ``T - lengths[b] ... T - 1``. ``None`` means no padding.
    scale : float, optional
        Score scale, ``1 / sqrt(d)`` by default.
    dropout_p : float
        Dropout on attention probabilities, in ``[0, 1)``.
    seed : int, optional
        Seed of the counter-based dropout generator (``csrc/pka_dropout.h``); drawn from torch's
        default generator when ``None``.

    Returns
    -------
    Tensor
        ``[B, H, T, d]``; rows at padded positions are exactly 0.
    """
    check_attention_args(q, k, v, a_k, a_v, lengths, scale, dropout_p, seed, check_values=False)
    _reject_forward_ad(q, k, v, a_k, a_v)
    require_cuda_kernels(q)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    out, _ = _fwd(q, k, v, a_k, a_v, lengths, float(scale), float(dropout_p),
                  seed_tensor(dropout_p, seed))
    return out
