"""to_left_padding / to_right_padding: right-padded batches in and out of the op's layout."""

from __future__ import annotations

import pytest
import torch

from pka_ext import PKATransformer, to_left_padding, to_right_padding

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def by_rows(x, lengths, pad_value, to_left):
    """The conversion written out row by row."""
    out = torch.full_like(x, pad_value)
    T = x.shape[1]
    for b, n in enumerate(lengths.tolist()):
        if n:
            if to_left:
                out[b, T - n:] = x[b, :n]
            else:
                out[b, :n] = x[b, T - n:]
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,dtype", [((5, 7), torch.int64), ((5, 7, 3), torch.float32),
                                         ((4, 6, 2, 3), torch.bfloat16), ((3, 1, 2), torch.float64)])
@pytest.mark.parametrize("pad_value", [0, -1])
def test_matches_row_by_row_and_round_trips(device, shape, dtype, pad_value):
    g = torch.Generator().manual_seed(0)
    x = (torch.randint(1, 100, shape, generator=g) if dtype == torch.int64
         else torch.randn(shape, generator=g)).to(dtype).to(device)
    B, T = shape[:2]
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    lengths[0], lengths[-1] = T, 0
    left = to_left_padding(x, lengths.to(device), pad_value=pad_value)
    assert left.dtype == x.dtype and left.device == x.device
    assert torch.equal(left, by_rows(x, lengths, pad_value, to_left=True))
    right = to_right_padding(left, lengths, pad_value=pad_value)
    assert torch.equal(right, by_rows(left, lengths, pad_value, to_left=False))
    # Back where it started, except what was padding on the right is now pad_value.
    keep = (torch.arange(T) < lengths[:, None]).view(B, T, *(1,) * (x.dim() - 2)).to(device)
    assert torch.equal(right, torch.where(keep, x, torch.full_like(x, pad_value)))


def test_gradients_reach_valid_positions_only():
    x = torch.randn(3, 5, 2, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([5, 2, 0])
    torch.autograd.gradcheck(lambda t: to_left_padding(t, lengths), (x,))
    w = torch.randn(3, 5, 2, dtype=torch.float64)
    (to_left_padding(x, lengths) * w).sum().backward()
    assert torch.equal(x.grad, to_right_padding(w, lengths))  # each valid row gets its weight
    assert torch.all(x.grad[1, 2:] == 0) and torch.all(x.grad[2] == 0)


def test_transformer_on_a_right_padded_batch_equals_each_sequence_alone():
    """Converted in and out, a right-padded batch gives each sequence what it gets unpadded."""
    torch.manual_seed(0)
    model = PKATransformer(num_layers=2, embed_dim=8, num_heads=2, max_len=6).double().eval()
    x = torch.randn(3, 6, 8, dtype=torch.float64)
    lengths = torch.tensor([6, 3, 1])
    y = to_right_padding(model(to_left_padding(x, lengths), lengths), lengths)  # [B, T, D]
    for b, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(y[b, :n], model(x[b:b + 1, :n])[0], rtol=1e-12, atol=1e-12)
        assert torch.all(y[b, n:] == 0)


@pytest.mark.parametrize("call,match", [
    (lambda: to_left_padding([[1, 2]], [2]), "x must be a torch.Tensor"),
    (lambda: to_left_padding(torch.zeros(4), [2]), r"x must be \[B, T, \.\.\.\]"),
    (lambda: to_left_padding(torch.zeros(2, 4), [1, 2, 3]), r"lengths must be \[B\] = \[2\]"),
    (lambda: to_left_padding(torch.zeros(2, 4), [1.0, 2.0]), "lengths must hold integers"),
    (lambda: to_right_padding(torch.zeros(2, 4), [1, 5]),
     r"lengths\[1\] = 5 is outside \[0, T\] = \[0, 4\]"),
    (lambda: to_left_padding(torch.zeros(2, 4), [-1, 2]), r"lengths\[0\] = -1 is outside"),
    (lambda: to_left_padding(torch.zeros(2, 4, dtype=torch.long), [1, 2], pad_value=0.5),
     "pad_value=0.5 is not representable in x's dtype torch.int64"),
    (lambda: to_left_padding(torch.zeros(2, 4, dtype=torch.int8), [1, 2], pad_value=300),
     "pad_value=300 does not fit x's dtype torch.int8"),
    (lambda: to_left_padding(torch.zeros(2, 4), [1, 2], pad_value=torch.tensor(0.0)),
     "pad_value must be a Python number"),
])
def test_bad_arguments_are_named(call, match):
    with pytest.raises((TypeError, ValueError), match=match):
        call()


def test_lengths_of_an_empty_batch_and_unsigned_lengths():
    # [] for an empty batch comes out as float32 (torch's default for no data) and was refused as
    # non-integer; uint64 lengths (numpy's unsigned counts), which the modules take, failed with
    # torch's "lt_cpu not implemented for 'UInt64'".
    np = pytest.importorskip("numpy")
    for lengths in ([], np.array([])):
        assert to_left_padding(torch.zeros(0, 4, 2), lengths).shape == (0, 4, 2)
        assert to_right_padding(torch.zeros(0, 4, 2), lengths).shape == (0, 4, 2)
    x = torch.arange(1, 9).view(2, 4)
    expected = to_left_padding(x, [1, 3])
    for lengths in (np.array([1, 3], dtype=np.uint64), torch.tensor([1, 3], dtype=torch.uint64)):
        assert torch.equal(to_left_padding(x, lengths), expected)
        assert torch.equal(to_right_padding(expected, lengths), to_right_padding(expected, [1, 3]))
    # Past 2**63 a uint64 length is still refused, and named as the caller wrote it.
    with pytest.raises(ValueError, match=r"lengths\[0\] = 9223372036854775809 is outside"):
        to_left_padding(x, torch.tensor([2**63 + 1, 3], dtype=torch.uint64))
    with pytest.raises(TypeError, match="lengths must hold integers"):
        to_left_padding(x, np.array([1.0, 3.0]))


def test_numpy_scalar_pad_value():
    # A pad id read from numpy (a vocabulary array) is a number; it was refused as not "a Python
    # number", while a value its dtype cannot hold is still refused.
    np = pytest.importorskip("numpy")
    x = torch.arange(1, 9).view(2, 4)
    assert torch.equal(to_left_padding(x, [1, 3], pad_value=np.int64(-1)),
                       to_left_padding(x, [1, 3], pad_value=-1))
    assert torch.equal(to_left_padding(x.float(), [1, 3], pad_value=np.float32(0.5)),
                       to_left_padding(x.float(), [1, 3], pad_value=0.5))
    with pytest.raises(ValueError, match="pad_value=0.5 is not representable"):
        to_left_padding(x, [1, 3], pad_value=np.float64(0.5))
