"""Bad arguments raise errors that name the argument; nothing crashes or is silently wrong."""

from __future__ import annotations

import warnings

import pytest
import torch

import pka_ext
import python_ref
from conftest import make_inputs

OPS = [pka_ext.pka_attention, python_ref.pka_attention]


def good():
    return list(make_inputs(2, 2, 6, 4, dtype=torch.float32, requires_grad=False, lengths=[6, 3]))


def replaced(i, value):
    args = good()
    args[i] = value
    return args


CASES = [
    ("q rank", replaced(0, torch.randn(2, 6, 4)), ValueError, r"q must be \[B, H, T, d\]"),
    ("k shape", replaced(1, torch.randn(2, 2, 5, 4)), ValueError, r"k shape \(2, 2, 5, 4\)"),
    ("v dtype", replaced(2, torch.randn(2, 2, 6, 4, dtype=torch.float64)), TypeError, "v dtype"),
    ("a_k shape", replaced(3, torch.randn(5, 5)), ValueError, r"a_k must be \[T, T\]"),
    ("a_v heads", replaced(4, torch.randn(3, 6, 6)), ValueError, "a_v must be"),
    ("a_k dtype", replaced(3, torch.randn(6, 6, dtype=torch.float64)), TypeError, "a_k dtype"),
    ("a_v device", replaced(4, torch.randn(6, 6, device="meta")), ValueError, "a_v is on meta"),
    ("lengths shape", replaced(5, torch.tensor([1, 2, 3])), ValueError, r"lengths must be \[B\] = \[2\]"),
    ("lengths dtype", replaced(5, torch.tensor([1, 2], dtype=torch.int32)), TypeError, "lengths must be int64"),
    ("lengths type", replaced(5, [1, 2]), TypeError, "lengths must be an int64 tensor"),
    ("q type", replaced(0, [[1.0]]), TypeError, "q must be a torch.Tensor"),
]


@pytest.mark.parametrize("op", OPS, ids=["compiled", "reference"])
@pytest.mark.parametrize("name,args,exc,match", CASES, ids=[c[0] for c in CASES])
def test_bad_arguments(op, name, args, exc, match):
    with pytest.raises(exc, match=match):
        op(*args)


@pytest.mark.parametrize("op", OPS, ids=["compiled", "reference"])
@pytest.mark.parametrize("bad", [[-1, 3], [7, 3]])
def test_lengths_out_of_range(op, bad):
    args = replaced(5, torch.tensor(bad))
    # python_ref checks in Python (ValueError); the compiled op checks in C++ (RuntimeError).
    with pytest.raises((ValueError, RuntimeError), match=r"lengths.*(outside|lie in) \[0, T=6\]"):
        op(*args)


@pytest.mark.parametrize("op", OPS, ids=["compiled", "reference"])
@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5])
def test_dropout_p_out_of_range(op, p):
    with pytest.raises(ValueError, match="dropout_p must be"):
        op(*good(), dropout_p=p, seed=1)


@pytest.mark.parametrize("seed", [1.5, "7", True, -(2**63) - 1, 2**64])
def test_bad_seed(seed):
    with pytest.raises(ValueError, match="seed must be"):
        pka_ext.pka_attention(*good(), dropout_p=0.1, seed=seed)


@pytest.mark.parametrize("op", OPS, ids=["compiled", "reference"])
@pytest.mark.parametrize("scale,exc", [(True, TypeError), ("0.5", TypeError),
                                       (float("inf"), ValueError), (float("nan"), ValueError)])
def test_scale_must_be_a_finite_number(op, scale, exc):
    with pytest.raises(exc, match="scale must be"):
        op(*good(), scale=scale)


def test_numpy_integers_are_seeds():
    np = pytest.importorskip("numpy")
    args = good()
    assert torch.equal(pka_ext.pka_attention(*args, dropout_p=0.3, seed=np.int64(7)),
                       pka_ext.pka_attention(*args, dropout_p=0.3, seed=7))


def test_unsupported_cpu_dtype_names_dtype():
    args = [t.to(torch.float8_e4m3fn) if t is not None and t.is_floating_point() else t for t in good()]
    with pytest.raises(RuntimeError, match="bfloat16 and float16, got q of dtype Float8_e4m3fn"):
        pka_ext.pka_attention(*args)


def test_raw_op_checks_in_cpp():
    # The C++ checks stand even when the Python layer is bypassed.
    q, k, v, a_k, a_v, lens = good()
    with pytest.raises(RuntimeError, match="a_k must be"):
        torch.ops.pka_ext.pka_fwd(q, k, v, a_k[:5, :5], a_v, lens, 1.0, 0.0, None)
    with pytest.raises(RuntimeError, match="seed is required"):
        torch.ops.pka_ext.pka_fwd(q, k, v, a_k, a_v, lens, 1.0, 0.5, None)
    with pytest.raises(RuntimeError, match="lse must be"):
        torch.ops.pka_ext.pka_bwd(q, q, k, v, a_k, a_v, lens, q, q, 1.0, 0.0, None)
    for scale in (float("inf"), float("nan")):
        with pytest.raises(RuntimeError, match="scale must be finite"):
            torch.ops.pka_ext.pka_fwd(q, k, v, a_k, a_v, lens, scale, 0.0, None)
        out, lse = torch.ops.pka_ext.pka_fwd(q, k, v, a_k, a_v, lens, 1.0, 0.0, None)
        with pytest.raises(RuntimeError, match="scale must be finite"):
            torch.ops.pka_ext.pka_bwd(out, q, k, v, a_k, a_v, lens, out, lse, scale, 0.0, None)


def test_lse_output_is_not_differentiable():
    """The backward op takes no lse gradient, so lse must not pretend to carry one."""
    q, k, v, a_k, a_v, lens = good()
    out, lse = torch.ops.pka_ext.pka_fwd(*(t.requires_grad_() for t in (q, k, v, a_k, a_v)), lens,
                                         1.0, 0.0, None)
    assert out.requires_grad and not lse.requires_grad
    with pytest.raises(RuntimeError, match="does not require grad"):
        lse.sum().backward()


def test_reference_needs_seed_for_dropout():
    with pytest.raises(ValueError, match="explicit seed"):
        python_ref.pka_attention(*good(), dropout_p=0.2)


def test_cuda_tensors_without_the_cuda_kernels_say_the_build_is_why(monkeypatch):
    import types

    from pka_ext import ops

    monkeypatch.setattr(ops, "_CUDA_KERNELS", False)
    with pytest.raises(RuntimeError, match="built without CUDA kernels.*PKA_REQUIRE_CUDA=1"):
        ops.require_cuda_kernels(types.SimpleNamespace(device=torch.device("cuda")))
    ops.require_cuda_kernels(torch.zeros(1))  # CPU tensors need no CUDA kernels


def test_a_cpu_only_build_warns_on_a_machine_with_a_gpu(monkeypatch):
    import importlib

    import pka_ext._library as library

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.ops.pka_ext, "built_with_cuda", lambda: False)
    with pytest.warns(UserWarning, match="built without its CUDA kernels"):
        importlib.reload(library)
    monkeypatch.setattr(torch.ops.pka_ext, "built_with_cuda", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        importlib.reload(library)
