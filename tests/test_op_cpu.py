"""The compiled CPU op against python_ref, plus the contract's special cases."""

from __future__ import annotations

import itertools

import pytest
import torch

import pka_ext
import python_ref
from conftest import make_inputs, max_rel_err

GRAD_NAMES = ("q", "k", "v", "a_k", "a_v")
# one T on each side of the CPU op's switch: whole-batch products up to T=24, length groups above
BOTH_CPU_PATHS = pytest.mark.parametrize("T", [9, 70])


def run_both(args, *, dropout_p=0.0, seed=None, grad_seed=1):
    """Output and the five input gradients from the compiled op and from python_ref."""
    q, k, v, a_k, a_v, lengths = args
    out = pka_ext.pka_attention(q, k, v, a_k, a_v, lengths, dropout_p=dropout_p, seed=seed)
    ref = python_ref.pka_attention(q, k, v, a_k, a_v, lengths, dropout_p=dropout_p, seed=seed)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=out.dtype)
    grads = torch.autograd.grad(out, (q, k, v, a_k, a_v), g)
    ref_grads = torch.autograd.grad(ref, (q, k, v, a_k, a_v), g)
    return out, ref, grads, ref_grads


def assert_close_to_ref(args, atol, **kw):
    out, ref, grads, ref_grads = run_both(args, **kw)
    torch.testing.assert_close(out, ref, atol=atol, rtol=0)
    for name, g, r in zip(GRAD_NAMES, grads, ref_grads):
        torch.testing.assert_close(g, r, atol=atol, rtol=0, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize(
    "T,d,H,per_head,lengths,dropout_p",
    list(itertools.product([1, 2, 17, 64, 129], [1, 8, 40, 64], [1, 3], [False, True],
                           ["random", None], [0.0, 0.25])),
)
def test_matches_reference_float64(T, d, H, per_head, lengths, dropout_p):
    args = make_inputs(3, H, T, d, per_head=per_head, lengths=lengths, seed=T * 1000 + d)
    assert_close_to_ref(args, atol=1e-10, dropout_p=dropout_p, seed=1234 + T)


@BOTH_CPU_PATHS
def test_float32_close_to_float64_reference(T):
    args64 = make_inputs(4, 2, T, 32, per_head=True)
    args32 = [None if t is None else (t.detach().float().requires_grad_() if t.is_floating_point() else t)
              for t in args64]
    out32 = pka_ext.pka_attention(*args32)
    ref64 = python_ref.pka_attention(*args64)
    assert out32.dtype == torch.float32
    assert max_rel_err(out32, ref64) < 1e-5
    g = torch.randn(out32.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    grads = torch.autograd.grad(out32, args32[:5], g.float())
    ref_grads = torch.autograd.grad(ref64, args64[:5], g)
    for name, x, r in zip(GRAD_NAMES, grads, ref_grads):
        assert x.dtype == torch.float32, name
        assert max_rel_err(x, r) < 1e-5, name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@BOTH_CPU_PATHS
@pytest.mark.parametrize("per_head,dropout_p", [(False, 0.0), (True, 0.25)])
def test_16bit_inputs_computed_in_float32(dtype, T, per_head, dropout_p):
    """bfloat16 / float16 on the CPU: computed in float32 and rounded once, each result is about
    as close to the float64 reference (run on the same rounded inputs) as that reference rounded
    to the dtype (relative L2 error, at most 1.9x here); python_ref run in the 16-bit dtype is
    3.9-5.4x as far off in its worst result of every case here, so it would fail."""

    def within_one_rounding(x, exact):
        def rel_l2(y):
            return ((y.double() - exact).norm() / exact.norm().clamp_min(1e-30)).item()
        return rel_l2(x) <= 2.5 * rel_l2(exact.to(dtype)) + 1e-7

    args = make_inputs(3, 2, T, 16, per_head=per_head, lengths=[T, 0, T // 2])
    low = [t.detach().to(dtype).requires_grad_() for t in args[:5]]
    exact = [t.detach().double().requires_grad_() for t in low]
    lens = args[5]
    out = pka_ext.pka_attention(*low, lens, dropout_p=dropout_p, seed=7)
    ref = python_ref.pka_attention(*exact, lens, dropout_p=dropout_p, seed=7)
    assert out.dtype == dtype
    assert within_one_rounding(out, ref)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    grads = torch.autograd.grad(out, low, g)
    ref_grads = torch.autograd.grad(ref, exact, g.double())
    for name, gr, r in zip(GRAD_NAMES, grads, ref_grads):
        assert gr.dtype == dtype, name
        assert within_one_rounding(gr, r), name
    _, lse = torch.ops.pka_ext.pka_fwd(*(t.detach() for t in low), lens, 0.25, 0.0, None)
    assert lse.dtype == torch.float32


@BOTH_CPU_PATHS
def test_autocast_does_not_recast_inside_the_op(T):
    """float32 inputs under CPU autocast: the op's own products stay float32."""
    args = [t.detach().float() if t is not None and t.is_floating_point() else t
            for t in make_inputs(2, 2, T, 8, lengths=[T, 3])]
    plain = pka_ext.pka_attention(*args)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = pka_ext.pka_attention(*args)
    assert under.dtype == torch.float32 and torch.equal(under, plain)


# Seeds use all 64 bits: those past 2**32 and 2**63 must not alias smaller ones.
@pytest.mark.parametrize("seed", [987654321, 2**32 + 5, 2**63 + 12345, 2**64 - 1])
def test_dropout_mask_bit_identical_to_reference(seed):
    # With q = 0 every visible key gets the same probability, and with v = I, a_v = I the output
    # row is that probability row, so the output's zero pattern is the dropout mask.
    B, H, T, p = 2, 3, 40, 0.3
    q = torch.zeros(B, H, T, T, dtype=torch.float64)
    v = torch.eye(T, dtype=torch.float64).expand(B, H, T, T)
    eye = torch.eye(T, dtype=torch.float64)
    out = pka_ext.pka_attention(q, torch.randn(B, H, T, T, dtype=torch.float64), v, eye, eye,
                                dropout_p=p, seed=seed)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    keep = python_ref.dropout_keep_mask(seed, B, H, T) >= python_ref.dropout_threshold(p)
    assert torch.equal(out != 0, keep & causal)
    n = causal.sum(-1, dtype=torch.float64)[:, None]  # visible keys per row
    expected = keep * causal / n / (1 - p)
    torch.testing.assert_close(out, expected.double(), atol=1e-12, rtol=0)
    low = python_ref.dropout_keep_mask(seed % 2**32, B, H, T) >= python_ref.dropout_threshold(p)
    assert seed < 2**32 or not torch.equal(keep, low)  # the reference's mask uses the high bits


def test_dropout_keep_rate_and_seed_dependence():
    B, H, T, p = 4, 4, 256, 0.3
    bits = python_ref.dropout_keep_mask(7, B, H, T)
    keep = bits >= python_ref.dropout_threshold(p)
    assert abs(keep.double().mean().item() - (1 - p)) < 0.003
    other = python_ref.dropout_keep_mask(8, B, H, T) >= python_ref.dropout_threshold(p)
    assert (keep != other).double().mean().item() > 0.3  # independent masks disagree on ~2p(1-p)
    # neighbouring elements are uncorrelated
    x = keep.double()
    corr = torch.corrcoef(torch.stack([x[..., :-1].flatten(), x[..., 1:].flatten()]))[0, 1]
    assert abs(corr.item()) < 0.01


def test_seed_none_uses_torch_default_generator():
    q, k, v, a_k, a_v, lengths = make_inputs(2, 2, 16, 8, requires_grad=False)
    torch.manual_seed(5)
    o1 = pka_ext.pka_attention(q, k, v, a_k, a_v, lengths, dropout_p=0.5)
    torch.manual_seed(5)
    o2 = pka_ext.pka_attention(q, k, v, a_k, a_v, lengths, dropout_p=0.5)
    o3 = pka_ext.pka_attention(q, k, v, a_k, a_v, lengths, dropout_p=0.5)
    assert torch.equal(o1, o2)
    assert not torch.equal(o2, o3)


def test_upper_triangle_ignored_and_gets_zero_gradient():
    q, k, v, a_k, a_v, lengths = make_inputs(3, 2, 12, 4, per_head=True)
    out = pka_ext.pka_attention(q, k, v, a_k, a_v, lengths)
    out_tril = pka_ext.pka_attention(q, k, v, a_k.tril(), a_v.tril(), lengths)
    assert torch.equal(out, out_tril)
    out.sum().backward()
    upper = torch.ones(12, 12, dtype=torch.bool).triu(1)
    assert torch.all(a_k.grad[:, upper] == 0) and torch.all(a_v.grad[:, upper] == 0)
    assert a_k.grad[:, ~upper].abs().sum() > 0 and a_v.grad[:, ~upper].abs().sum() > 0


def test_padded_positions_exactly_zero():
    lengths = [0, 3, 10, 7]
    q, k, v, a_k, a_v, lens = make_inputs(4, 2, 10, 5, lengths=lengths)
    out = pka_ext.pka_attention(q, k, v, a_k, a_v, lens)
    out.backward(torch.randn_like(out))
    for b, L in enumerate(lengths):
        s = 10 - L
        for t in (out, q.grad, k.grad, v.grad):
            assert torch.all(t[b, :, :s] == 0)
        if L > 0:
            assert out[b, :, s:].abs().min() > 0


@BOTH_CPU_PATHS
@pytest.mark.parametrize("short", ["alone", "grouped"])
@pytest.mark.parametrize("garbage", [1e6, float("nan"), float("inf")])
@pytest.mark.parametrize("op", [pka_ext.pka_attention, python_ref.pka_attention],
                         ids=["compiled", "reference"])
def test_padded_inputs_do_not_leak(T, short, garbage, op):
    """Whatever padded rows of q, k, v and dout hold, no output or gradient changes. On the
    grouped path the short sequence is either in a group of its own or padded inside the long
    one's group. python_ref keeps the same promise: its masks select, they do not multiply."""
    lengths = [4 if short == "alone" else T - T // 8, T]
    q, k, v, a_k, a_v, lens = make_inputs(2, 2, T, 4, lengths=lengths)
    dout = torch.randn(2, 2, T, 4, dtype=q.dtype)
    out = op(q, k, v, a_k, a_v, lens)
    grads = torch.autograd.grad(out, (q, k, v, a_k, a_v), dout)
    dirty = [t.detach().clone() for t in (q, k, v, dout)]
    for t in dirty:
        t[0, :, : T - lengths[0]] = garbage
    q2, k2, v2 = (t.requires_grad_() for t in dirty[:3])
    a_k2, a_v2 = (t.detach().clone().requires_grad_() for t in (a_k, a_v))
    out2 = op(q2, k2, v2, a_k2, a_v2, lens)
    grads2 = torch.autograd.grad(out2, (q2, k2, v2, a_k2, a_v2), dirty[3])
    assert torch.equal(out, out2)
    for name, g, g2 in zip(("q", "k", "v", "a_k", "a_v"), grads, grads2):
        assert torch.equal(g, g2), name


@pytest.mark.parametrize(
    "T,lengths",
    [
        # groups shared by similar lengths, one group for everything up to length 16, an empty one
        (40, [40, 39, 38, 30, 28, 16, 15, 3, 1, 0, 40, 33]),
        # equal lengths split by the group memory cap (6 pairs of H=2 fit), the rest shared
        (200, [200] * 8 + [190, 0]),
        # one pair alone is over the cap: groups of one
        (600, [600, 600, 598, 250]),
    ],
    ids=["T40", "T200", "T600"],
)
@pytest.mark.parametrize("per_head,dropout_p", [(False, 0.0), (True, 0.2)])
def test_length_groups_match_reference(T, lengths, per_head, dropout_p):
    args = make_inputs(len(lengths), 2, T, 8, per_head=per_head, lengths=lengths, seed=T)
    assert_close_to_ref(args, atol=1e-10, dropout_p=dropout_p, seed=5)


@BOTH_CPU_PATHS
def test_bitwise_reproducible(T):
    """Same inputs and seed, same thread count: output and every gradient bit for bit."""
    args = [t.detach().float() if t is not None and t.is_floating_point() else t
            for t in make_inputs(16, 2, T, 8, per_head=True, seed=11)]

    def run():
        xs = [t.clone().requires_grad_() for t in args[:5]]
        out = pka_ext.pka_attention(*xs, args[5], dropout_p=0.2, seed=3)
        return (out, *torch.autograd.grad(out, xs, torch.ones_like(out)))

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("impl", [pka_ext.pka_attention, python_ref.pka_attention], ids=["op", "ref"])
@pytest.mark.parametrize("B,T", [(0, 5), (0, 70), (2, 0)])
def test_empty_batch_or_sequence(B, T, impl):
    q, k, v, a_k, a_v, lens = make_inputs(B, 2, T, 4, lengths=[T] * B)
    out = impl(q, k, v, a_k, a_v, lens)
    assert out.shape == (B, 2, T, 4)
    grads = torch.autograd.grad(out.sum(), (q, k, v, a_k, a_v))
    for g, t in zip(grads, (q, k, v, a_k, a_v)):
        assert g.shape == t.shape and not g.any()


def test_no_nan_or_inf_with_extreme_scores():
    q, k, v, a_k, a_v, lens = make_inputs(3, 1, 20, 8, lengths=[0, 1, 20])
    with torch.no_grad():
        q.mul_(300.0)
        k.mul_(300.0)
    out = pka_ext.pka_attention(q, k, v, a_k, a_v, lens)
    out.sum().backward()
    for t in (out, q.grad, k.grad, v.grad, a_k.grad, a_v.grad):
        assert torch.isfinite(t).all()


# Numerical robustness of the CPU backward. Its softmax-backward rows take D_i = sum_j P_ij Z_ij dP_ij
# from the row's own P and dP (not dout_i . out_i from the saved, rounded out) and P normalised by
# its row sum (not exp(S - lse) alone, which lse's rounding scales by up to |lse| * 2^-24).
ALL_DTYPES = pytest.mark.parametrize(
    "dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
    ids=["float64", "float32", "bfloat16", "float16"])


def _rel_l2(x, exact):
    return ((x.double() - exact).norm() / exact.norm().clamp_min(1e-30)).item()


@ALL_DTYPES
@pytest.mark.parametrize("T,lengths", [(1, [1, 0, 1]), (6, [1, 0, 1]), (9, None), (40, [40, 0, 33])])
def test_rows_with_one_effective_key_give_zero_score_gradients(dtype, T, lengths):
    """With a single visible key (T = 1, sequences of length 1) out is that key's value whatever q,
    k and a_k are; with saturated scores (T = 9, 40 here: key j scores 181 * j, so each row's weight
    sits on its latest key) out does not move with them either. The gradients of q, k and a_k are
    then 0 (the float64 reference's are, up to 1e-12). The backward once formed D_i from the saved
    out, whose rounding error (one 16-bit rounding for bfloat16 / float16) times |K| left gradients
    of up to 1e-3 (single key) and 0.3 (saturated) here."""
    g = torch.Generator().manual_seed(T)
    B, H, d = 3, 2, 8
    q, k, v = (torch.randn(B, H, T, d, generator=g, dtype=torch.float64) for _ in range(3))
    a_k, a_v = (torch.randn(T, T, generator=g, dtype=torch.float64) / T**0.5 for _ in range(2))
    if T > 6:  # saturated: q . k_j = 512 j (+ 0.1 noise), scale 1/sqrt(8); K = k
        q = q * 0.1 / 512
        q[..., 0] = 512.0
        k[..., 0] = torch.arange(T, dtype=torch.float64)
        a_k = torch.eye(T, dtype=torch.float64)
    lens = None if lengths is None else torch.tensor(lengths)
    low = [t.to(dtype).requires_grad_() for t in (q, k, v, a_k, a_v)]
    exact = [t.detach().double().requires_grad_() for t in low]
    dout = torch.randn(B, H, T, d, generator=g, dtype=torch.float64)
    out = pka_ext.pka_attention(*low, lens)
    ref = python_ref.pka_attention(*exact, lens)
    grads = torch.autograd.grad(out, low, dout.to(dtype))
    ref_grads = torch.autograd.grad(ref, exact, dout)
    for name, gr, r in zip(GRAD_NAMES, grads, ref_grads):
        assert torch.isfinite(gr).all(), name
        if name in ("q", "k", "a_k"):
            assert r.abs().max() < 1e-12, name  # the case is what it claims to be
            err = gr.double().abs().max().item()
            assert err < 1e-12, f"grad {name}: {err:.3g}, expected 0"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@BOTH_CPU_PATHS
@pytest.mark.parametrize("scale", [None, -30.0], ids=["default_scale", "peaked"])
def test_16bit_gradients_within_one_rounding_with_peaked_attention(dtype, T, scale):
    """As test_16bit_inputs_computed_in_float32, with scale = -30 making most rows put nearly all
    their weight on one key: each gradient stays about as close to the float64 reference as that
    reference rounded to the dtype. With D_i formed from the 16-bit out, dq, dk and da_k were
    15-2000x as far off as that rounding here."""
    args = make_inputs(3, 2, T, 16, lengths=[T, 0, T // 2], seed=T)
    low = [t.detach().to(dtype).requires_grad_() for t in args[:5]]
    exact = [t.detach().double().requires_grad_() for t in low]
    out = pka_ext.pka_attention(*low, args[5], scale=scale)
    ref = python_ref.pka_attention(*exact, args[5], scale=scale)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    assert _rel_l2(out, ref) <= 2.5 * _rel_l2(ref.to(dtype), ref) + 1e-7
    for name, gr, r in zip(GRAD_NAMES, torch.autograd.grad(out, low, g),
                           torch.autograd.grad(ref, exact, g.double())):
        assert _rel_l2(gr, r) <= 2.5 * _rel_l2(r.to(dtype), r) + 1e-7, name


@BOTH_CPU_PATHS
def test_float16_output_overflow_leaves_gradients_finite(T):
    """Outputs above float16's 65504 round to Inf, as any float16 result does (torch's float16
    composition overflows already in V = A_v v); the gradients, all well inside float16's range,
    stay finite and close to the float64 reference, since the backward does not read out."""
    g = torch.Generator().manual_seed(T)
    B, H, d = 2, 1, 8
    q, k = (torch.randn(B, H, T, d, generator=g, dtype=torch.float64) for _ in range(2))
    v = 4e4 * torch.randn(B, H, T, d, generator=g, dtype=torch.float64).sign()  # exact in float16
    a_k = torch.randn(T, T, generator=g, dtype=torch.float64) / T**0.5
    a_v = 2 * torch.eye(T, dtype=torch.float64)  # V = 2 v: |out| up to 8e4
    lens = torch.tensor([T, 4])
    dout = 1e-2 * torch.randn(B, H, T, d, generator=g, dtype=torch.float64)
    low = [t.to(torch.float16).requires_grad_() for t in (q, k, v, a_k, a_v)]
    exact = [t.detach().double().requires_grad_() for t in low]
    out = pka_ext.pka_attention(*low, lens)
    ref = python_ref.pka_attention(*exact, lens)
    over = ref.abs() > 65520  # beyond the midpoint of 65504 and the next binade: rounds to Inf
    assert over.any() and torch.equal(out.isinf(), over)
    torch.testing.assert_close(out[~over].double(), ref[~over], rtol=1e-3, atol=0.1)
    for name, gr, r in zip(GRAD_NAMES, torch.autograd.grad(out, low, dout.half()),
                           torch.autograd.grad(ref, exact, dout)):
        assert torch.isfinite(r).all() and torch.isfinite(gr).all(), name
        assert _rel_l2(gr, r) <= 2.5 * _rel_l2(r.half(), r) + 1e-7, name


@BOTH_CPU_PATHS
def test_backward_probabilities_sum_to_one_at_large_score_magnitude(T):
    """float32 rows whose scores are all equal to ~2.8e5 (exactly, so the forward's P is exact):
    lse = m + log(L) is rounded to 2^-5 there, which scaled exp(S - lse), the backward's P, by up
    to 1.5 %; normalised by its row sum, P again matches the forward's, and the gradients that
    depend on it (dv, da_v, dk) are as accurate as the forward."""
    B, H, d = 3, 2, 8
    g = torch.Generator().manual_seed(T)
    q = torch.full((B, H, T, d), 1e5, dtype=torch.float64)
    k = torch.ones(B, H, T, d, dtype=torch.float64)
    v = torch.randn(B, H, T, d, generator=g, dtype=torch.float64)
    a_k = torch.eye(T, dtype=torch.float64)
    a_v = torch.randn(T, T, generator=g, dtype=torch.float64) / T**0.5
    lens = torch.tensor([T, 0, T // 2])
    low = [t.float().requires_grad_() for t in (q, k, v, a_k, a_v)]
    exact = [t.detach().double().requires_grad_() for t in low]
    dout = torch.randn(B, H, T, d, generator=g, dtype=torch.float64)
    out = pka_ext.pka_attention(*low, lens)
    ref = python_ref.pka_attention(*exact, lens)
    assert max_rel_err(out, ref) < 1e-6
    grads = torch.autograd.grad(out, low, dout.float())
    ref_grads = torch.autograd.grad(ref, exact, dout)
    for name, gr, r in zip(GRAD_NAMES, grads, ref_grads):
        if name != "q":  # exactly 0: every key is the same, so dq sums dS = 0 over a row
            assert max_rel_err(gr, r) < 1e-5, name


@pytest.mark.parametrize("T", [14, 40])  # whole-batch path (T <= 24) and grouped path
def test_strided_inputs_match_contiguous(T):
    """Non-contiguous q, k, v, kernels and dout give the contiguous results, gradients included."""
    B, H, d = 3, 2, 6
    g = torch.Generator().manual_seed(3)
    base = torch.randn(B, T, 3, H, d + 2, generator=g, dtype=torch.float64)
    qkv = [base[:, :, i, :, 1:d + 1].transpose(1, 2) for i in range(3)]  # [B, H, T, d], strided
    assert not qkv[0].is_contiguous()
    a = torch.randn(2 * T, 2 * T, generator=g, dtype=torch.float64)[::2, ::2]
    dout = torch.randn(B, H, d, T, generator=g, dtype=torch.float64).transpose(-1, -2)
    lens = torch.tensor([T, 5, 0])
    strided = [t.detach().requires_grad_() for t in (*qkv, a, a.t())]
    dense = [t.detach().contiguous().requires_grad_() for t in (*qkv, a, a.t())]
    out = pka_ext.pka_attention(*strided, lens)
    ref = pka_ext.pka_attention(*dense, lens)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    grads = torch.autograd.grad(out, strided, dout)
    ref_grads = torch.autograd.grad(ref, dense, dout.contiguous())
    for name, gr, r in zip(GRAD_NAMES, grads, ref_grads):
        torch.testing.assert_close(gr, r, atol=1e-12, rtol=0, msg=lambda m: f"grad {name}: {m}")


def test_explicit_scale():
    args = make_inputs(2, 2, 8, 4)
    out = pka_ext.pka_attention(*args, scale=0.37)
    ref = python_ref.pka_attention(*args, scale=0.37)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)


@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("dropout_p", [0.0, 0.4])
def test_gradcheck(per_head, dropout_p):
    args = make_inputs(2, 2, 5, 3, per_head=per_head, lengths=[5, 3])

    def fn(q, k, v, a_k, a_v):
        return pka_ext.pka_attention(q, k, v, a_k, a_v, args[5], dropout_p=dropout_p, seed=11)

    assert torch.autograd.gradcheck(fn, args[:5])


def test_opcheck_forward_and_backward():
    for per_head, dropout_p, lengths in [(False, 0.0, None), (True, 0.3, "random"), (False, 0.1, "random")]:
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            q, k, v, a_k, a_v, lens = make_inputs(3, 2, 7, 4, per_head=per_head, dtype=dtype, lengths=lengths)
            seed = torch.tensor(42) if dropout_p > 0 else None
            fwd_args = (q, k, v, a_k, a_v, lens, 0.5, dropout_p, seed)
            torch.library.opcheck(torch.ops.pka_ext.pka_fwd, fwd_args)
            out, lse = torch.ops.pka_ext.pka_fwd(*fwd_args)
            dout = torch.randn_like(out)
            bwd_args = (dout, q.detach(), k.detach(), v.detach(), a_k.detach(), a_v.detach(), lens,
                        out.detach(), lse.detach(), 0.5, dropout_p, seed)
            torch.library.opcheck(torch.ops.pka_ext.pka_bwd, bwd_args)


@BOTH_CPU_PATHS
def test_create_graph_gives_first_order_grads_and_refuses_double_backward(T):
    q, k, v, a_k, a_v, lens = make_inputs(2, 2, T, 4, lengths=[4, T])
    inputs = (q, k, v, a_k, a_v)
    dout = torch.randn(2, 2, T, 4, dtype=q.dtype)
    out = pka_ext.pka_attention(*inputs, lens)
    plain = torch.autograd.grad(out, inputs, dout, retain_graph=True)
    graph = torch.autograd.grad(out, inputs, dout, create_graph=True)
    for g, h in zip(plain, graph):
        assert torch.equal(g, h) and h.requires_grad
    with pytest.raises(RuntimeError, match="double backward.*python_ref"):
        graph[0].sum().backward()


def test_forward_mode_ad_is_refused_not_silently_zero():
    # torch runs a custom op without a forward-AD formula as a constant there: zero tangents.
    q, k, v, a_k, a_v, lens = (t.detach() for t in make_inputs(1, 1, 5, 2, lengths=[5]))

    def f(x):
        return pka_ext.pka_attention(x, k, v, a_k, a_v, lens)

    for transform in (lambda: torch.func.jvp(f, (q,), (torch.ones_like(q),)),
                      lambda: torch.func.jacfwd(f)(q)):
        with pytest.raises(RuntimeError, match="forward-mode AD .* not implemented by the compiled "
                                               "op; python_ref.pka_attention"):
            transform()
    tangent = torch.func.jvp(lambda x: python_ref.pka_attention(x, k, v, a_k, a_v, lens), (q,),
                             (torch.ones_like(q),))[1]
    assert tangent.abs().max() > 0  # the reference, which the message points to, does it


def test_torch_compile_fullgraph():
    q, k, v, a_k, a_v, lens = make_inputs(2, 2, 8, 4, dtype=torch.float32)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(q, k, v, a_k, a_v, lens):
        return pka_ext.pka_attention(q, k, v, a_k.tril() * 2, a_v, lens, dropout_p=0.2, seed=3).sum()

    inputs = (q, k, v, a_k, a_v)
    loss = f(q, k, v, a_k, a_v, lens)
    grads = torch.autograd.grad(loss, inputs)
    ref = pka_ext.pka_attention(q, k, v, a_k.tril() * 2, a_v, lens, dropout_p=0.2, seed=3).sum()
    torch.testing.assert_close(loss, ref)
    for name, g, r in zip(GRAD_NAMES, grads, torch.autograd.grad(ref, inputs)):
        torch.testing.assert_close(g, r, msg=name)


def test_torch_compile_inductor_matches_eager():
    q, k, v, a_k, a_v, lens = make_inputs(2, 2, 8, 4, dtype=torch.float32, requires_grad=False)
    torch._dynamo.reset()
    f = torch.compile(lambda *a: pka_ext.pka_attention(*a) * 2 + 1, fullgraph=True)
    torch.testing.assert_close(f(q, k, v, a_k, a_v, lens),
                               pka_ext.pka_attention(q, k, v, a_k, a_v, lens) * 2 + 1)


def _random_case(rng: torch.Generator):
    def pick(choices):
        return choices[torch.randint(len(choices), (1,), generator=rng).item()]

    B = pick([1, 2, 3, 5, 8])
    H = pick([1, 2, 3])
    T = pick([1, 2, 3, 7, 16, 24, 25, 31, 33, 65])  # both sides of the whole-batch / grouped switch
    d = pick([1, 2, 5, 16])
    per_head = pick([False, True])
    lengths = pick(["random", None])
    dropout_p = pick([0.0, 0.0, 0.1, 0.5, 0.9])
    scale = pick([None, 0.1, 2.0])
    return B, H, T, d, per_head, lengths, dropout_p, scale


def _sweep(n_cases: int, seed: int):
    rng = torch.Generator().manual_seed(seed)
    for case in range(n_cases):
        B, H, T, d, per_head, lengths, dropout_p, scale = _random_case(rng)
        args = make_inputs(B, H, T, d, per_head=per_head, lengths=lengths, seed=seed + case)
        try:
            assert_close_to_ref(args, atol=1e-10, dropout_p=dropout_p, seed=case, grad_seed=case)
        except AssertionError as err:
            raise AssertionError(f"case {case}: B={B} H={H} T={T} d={d} per_head={per_head} "
                                 f"lengths={args[5]} dropout_p={dropout_p}: {err}") from err


def test_randomized_sweep_quick():
    _sweep(200, seed=2024)


@pytest.mark.slow
def test_randomized_sweep_full():
    _sweep(2000, seed=77)


@pytest.mark.parametrize("per_head", [False, True], ids=["shared", "per_head"])
def test_benchmark_composition_is_exact_in_float64(per_head):
    """The 16-bit tests (tests/test_fused_emulated.py, tests/test_cuda_fused.py) bound the kernels'
    error by that of the PyTorch composition in the same dtype: the bound means something only
    if the composition computes the op, which it must do to float64 rounding."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                    "benchmarks"))
    from attention_impls import composition

    q, k, v, a_k, a_v, lens = make_inputs(4, 2, 23, 8, per_head=per_head)  # lengths T, 0 and random
    g = torch.randn(q.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    out = composition(q, k, v, a_k, a_v, lens)
    ref = python_ref.pka_attention(q, k, v, a_k, a_v, lens)
    assert max_rel_err(out, ref) < 1e-12
    for name, x, r in zip(GRAD_NAMES, torch.autograd.grad(out, (q, k, v, a_k, a_v), g),
                          torch.autograd.grad(ref, (q, k, v, a_k, a_v), g)):
        assert max_rel_err(x, r) < 1e-12, name
