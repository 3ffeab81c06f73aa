"""The fused CUDA kernels (csrc/pka_fused.cu): float32 / float16 / bfloat16, head dims 16-128.

Skipped without a CUDA device. Oracles: python_ref in float64; the CPU op (same dropout mask);
the unfused CUDA path (PKA_CUDA_UNFUSED=1) in the same dtype; the PyTorch composition (mixing by
matmul + scaled_dot_product_attention) in the same dtype for the half types' error budget.
"""

from __future__ import annotations

import json
import math
import os
import sys

import pytest
import torch

import pka_ext
import python_ref

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))
from attention_impls import composition  # noqa: E402

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.usefixtures("no_tf32")]

DEVICE = "cuda"
NAMES = ("q", "k", "v", "a_k", "a_v")
OP_FWD = torch.ops.pka_ext.pka_fwd
OP_BWD = torch.ops.pka_ext.pka_bwd


class EnvSwitch:
    """Sets an environment switch of the CUDA code for a ``with`` block (read on every call)."""

    def __init__(self, monkeypatch, name):
        self.monkeypatch, self.name = monkeypatch, name

    def __enter__(self):
        self.monkeypatch.setenv(self.name, "1")

    def __exit__(self, *exc):
        self.monkeypatch.delenv(self.name)


@pytest.fixture
def unfused(monkeypatch):
    """Context for running the unfused CUDA path."""
    return EnvSwitch(monkeypatch, "PKA_CUDA_UNFUSED")


def inputs64(B, H, T, d, per_head, seed):
    """Fresh random float64 inputs on the device; kernels with random upper triangles."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, d, generator=g, dtype=torch.float64) for _ in range(3))
    shape = (H, T, T) if per_head else (T, T)
    a = [torch.randn(*shape, generator=g, dtype=torch.float64) / math.sqrt(T) for _ in range(2)]
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T
    if B > 2:
        lengths[1] = 0
    dout = torch.randn(B, H, T, d, generator=g, dtype=torch.float64)
    return [t.to(DEVICE) for t in (q, k, v, *a)], lengths.to(DEVICE), dout.to(DEVICE)


def poison(numel_dtypes):
    """Leave NaN-filled blocks in the caching allocator so unwritten outputs would show NaN."""
    blocks = [torch.full((n,), float("nan"), dtype=dt, device=DEVICE) for n, dt in numel_dtypes]
    del blocks


def fwd_bwd(fn, inputs, lengths, dout, **kw):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves, lengths, **kw)
    grads = torch.autograd.grad(out, leaves, dout)
    return out.detach(), grads


def rel(x, ref):
    """max |x - ref| / max(1, max |ref|): relative for O(1) and larger references, absolute for
    small ones (as test_cuda.assert_close). A reference that is exactly 0 in exact arithmetic (dq
    and da_k when every sequence has one item) leaves only the rounding noise of the cancelled
    terms, whose size is set by those terms (about 1e-6 in float32 at d=128), not by the result."""
    x, ref = x.detach().double(), ref.detach().double()
    return ((x - ref).abs().max() / ref.abs().max().clamp_min(1.0)).item()


def rel_l2(x, ref):
    x, ref = x.detach().double(), ref.detach().double()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def assert_same_results(a, b, dtype):
    """Two runs of the same arithmetic in another launch arrangement: out, dq, dk, dv bitwise equal,
    da_k and da_v up to the order of their atomics."""
    (out_a, g_a), (out_b, g_b) = a, b
    assert torch.equal(out_a, out_b)
    for name, x, y in zip(NAMES[:3], g_a[:3], g_b[:3]):
        assert torch.equal(x, y), f"d{name}: {rel(y, x):.2e}"
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for name, x, y in zip(NAMES[3:], g_a[3:], g_b[3:]):
        assert rel(y, x) <= tol, f"d{name}: {rel(y, x):.2e}"


def pad_mask(lengths, T):
    return torch.arange(T, device=lengths.device)[None, :] < (T - lengths)[:, None]  # [B, T]


def assert_padding_zero(x, pad, what):
    assert not torch.isnan(x).any(), f"{what} has NaN (an element was never written?)"
    assert (x.transpose(1, 2)[pad] == 0).all(), f"{what}: padded rows are not exactly 0"


def _compose(q, k, v, a_k, a_v, lengths, dropout_p=0.0, seed=None):
    return composition(q, k, v, a_k, a_v, lengths)


@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
@pytest.mark.parametrize("per_head", [False, True], ids=["shared", "per_head"])
@pytest.mark.parametrize("d", [16, 32, 64, 128])
@pytest.mark.parametrize("T", [1, 17, 64, 200, 333])
def test_float32_vs_reference(T, d, per_head, dropout_p):
    B, H = 4, 2
    x64, lengths, dout64 = inputs64(B, H, T, d, per_head, seed=T * 131 + d)
    seed = 99 if dropout_p > 0 else None
    x32 = [t.float() for t in x64]
    poison([(B * H * T * d, torch.float32)] * 4 + [(H * T * T, torch.float32)] * 2)
    out, grads = fwd_bwd(pka_ext.pka_attention, x32, lengths, dout64.float(), dropout_p=dropout_p,
                         seed=seed)
    out_r, grads_r = fwd_bwd(python_ref.pka_attention, x64, lengths, dout64, dropout_p=dropout_p,
                             seed=seed)
    assert rel(out, out_r) <= 1e-4, f"out rel err {rel(out, out_r):.2e}"
    for name, g, gr in zip(NAMES, grads, grads_r):
        assert g.dtype == torch.float32
        assert rel(g, gr) <= 1e-4, f"d{name} rel err {rel(g, gr):.2e}"
    pad = pad_mask(lengths, T)
    assert_padding_zero(out, pad, "out")
    for name, g in zip(NAMES[:3], grads[:3]):
        assert_padding_zero(g, pad, f"d{name}")
    for name, g in zip(NAMES[3:], grads[3:]):
        assert (g.triu(1) == 0).all(), f"d{name}: upper triangle must be 0"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
@pytest.mark.parametrize("d", [16, 64, 128])
@pytest.mark.parametrize("T", [50, 200, 512, 1024])
def test_half_types_within_twice_the_composition_error(T, d, dropout_p, dtype):
    """Error vs float64 (on the rounded inputs) at most 2x the error of the same-dtype baseline:
    the PyTorch composition without dropout, python_ref (materialised mask) with dropout."""
    B, H = 3, 2
    x64, lengths, dout64 = inputs64(B, H, T, d, per_head=False, seed=T + d)
    x_lp, dout_lp = [t.to(dtype) for t in x64], dout64.to(dtype)
    exact_in = [t.double() for t in x_lp]
    seed = 5 if dropout_p > 0 else None
    base = _compose if dropout_p == 0 else python_ref.pka_attention
    kw = dict(dropout_p=dropout_p, seed=seed)
    out_e, grads_e = fwd_bwd(python_ref.pka_attention, exact_in, lengths, dout_lp.double(), **kw)
    poison([(B * H * T * d, dtype)] * 4)
    out, grads = fwd_bwd(pka_ext.pka_attention, x_lp, lengths, dout_lp, **kw)
    out_b, grads_b = fwd_bwd(base, x_lp, lengths, dout_lp, **kw)
    floor = 1e-6
    e, eb = rel_l2(out, out_e), rel_l2(out_b, out_e)
    assert e <= 2 * eb + floor, f"out: fused {e:.3e} vs baseline {eb:.3e}"
    for name, g, gb, ge in zip(NAMES, grads, grads_b, grads_e):
        e, eb = rel_l2(g, ge), rel_l2(gb, ge)
        assert e <= 2 * eb + floor, f"d{name}: fused {e:.3e} vs baseline {eb:.3e}"
    pad = pad_mask(lengths, T)
    assert_padding_zero(out, pad, "out")
    for name, g in zip(NAMES[:3], grads[:3]):
        assert_padding_zero(g, pad, f"d{name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_matches_cpu_op(dtype):
    """Same seed, same mask as the CPU op (float32 there; the device dtype's tolerance)."""
    B, H, T, d = 3, 2, 90, 32
    x64, lengths, dout64 = inputs64(B, H, T, d, per_head=True, seed=3)
    x = [t.to(dtype) for t in x64]
    x_cpu = [t.cpu().float() for t in x]
    out, grads = fwd_bwd(pka_ext.pka_attention, x, lengths, dout64.to(dtype), dropout_p=0.4, seed=7)
    out_c, grads_c = fwd_bwd(pka_ext.pka_attention, x_cpu, lengths.cpu(), dout64.to(dtype).cpu().float(),
                             dropout_p=0.4, seed=7)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert rel(out.cpu(), out_c) <= tol
    for name, g, gc in zip(NAMES, grads, grads_c):
        assert rel(g.cpu(), gc) <= tol, f"d{name}: {rel(g.cpu(), gc):.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [40, 700])
def test_fused_matches_unfused_path(T, dtype, unfused):
    B, H, d = 3, 2, 64
    x64, lengths, dout64 = inputs64(B, H, T, d, per_head=True, seed=T)
    x, dout = [t.to(dtype) for t in x64], dout64.to(dtype)
    out, grads = fwd_bwd(pka_ext.pka_attention, x, lengths, dout, dropout_p=0.1, seed=1)
    with unfused:
        out_u, grads_u = fwd_bwd(pka_ext.pka_attention, x, lengths, dout, dropout_p=0.1, seed=1)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert rel(out, out_u) <= tol
    for name, g, gu in zip(NAMES, grads, grads_u):
        assert rel(g, gu) <= tol, f"d{name}: {rel(g, gu):.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [16, 64, 128])
@pytest.mark.parametrize("T", [23, 130])
@pytest.mark.parametrize("placement", ["1", "split"])
def test_workspace_placement_matches_shared_memory(placement, T, d, dtype, monkeypatch):
    """The placements of long sequences (every block buffer in the global workspace, or only the
    least used ones) on sequences short enough for shared memory: the same arithmetic, so the same
    results up to the order of the kernel-gradient atomics."""
    B, H = 3, 2
    x64, lengths, dout64 = inputs64(B, H, T, d, per_head=d == 16, seed=7 * T + d)
    x, dout = [t.to(dtype) for t in x64], dout64.to(dtype)
    in_smem = fwd_bwd(pka_ext.pka_attention, x, lengths, dout, dropout_p=0.1, seed=5)
    poison([(B * H * T * d, dtype)] * 8)
    monkeypatch.setenv("PKA_FUSED_WORKSPACE", placement)
    in_workspace = fwd_bwd(pka_ext.pka_attention, x, lengths, dout, dropout_p=0.1, seed=5)
    assert_same_results(in_smem, in_workspace, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [23, 200])
@pytest.mark.parametrize("variable,values", [("PKA_FWD_WARPS", ("4", "8")), ("PKA_BWD_WARPS", ("4", "8")),
                                             ("PKA_BLOCK_ORDER", ("0", "1"))])
def test_launch_choices_agree(variable, values, T, dtype, monkeypatch):
    """The forward or the backward at 4 or 8 warps per block, the blocks in batch order or longest
    sequence first: every tile of every sequence is computed by one warp in the same order either
    way."""
    B, H, d = 5, 2, 64
    x64, lengths, dout64 = inputs64(B, H, T, d, per_head=False, seed=5 * T)
    x, dout = [t.to(dtype) for t in x64], dout64.to(dtype)
    results = []
    for value in values:
        monkeypatch.setenv(variable, value)
        poison([(B * H * T * d, dtype)] * 8)
        results.append(fwd_bwd(pka_ext.pka_attention, x, lengths, dout, dropout_p=0.1, seed=3))
    assert_same_results(*results, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,d,placement", [(50, 16, "0"), (200, 64, "0"), (130, 32, "1"), (700, 128, "0")])
def test_score_paths_agree(T, d, placement, dtype, monkeypatch):
    """The 16-bit kernels' scores on mma.sync registers (default: the forward's online softmax, the
    backward's P Z and dS as operands) and through shared memory (PKA_SMEM_SCORES=1, WMMA): each
    within twice the composition's error against float64 for out and every gradient, every element
    written, and lse (fp32 either way) the same to 1e-5."""
    monkeypatch.setenv("PKA_FUSED_WORKSPACE", placement)
    B, H = 4, 2
    x64, lengths, dout64 = inputs64(B, H, T, d, per_head=True, seed=T * d)
    x, dout = [t.to(dtype) for t in x64], dout64.to(dtype)
    out_e, grads_e = fwd_bwd(python_ref.pka_attention, [t.double() for t in x], lengths, dout.double())
    out_b, grads_b = fwd_bwd(_compose, x, lengths, dout)
    lses = []
    for smem_scores in ("0", "1"):
        monkeypatch.setenv("PKA_SMEM_SCORES", smem_scores)
        poison([(B * H * T * d, dtype)] * 4)
        out, grads = fwd_bwd(pka_ext.pka_attention, x, lengths, dout)
        for name, y, yb, ye in zip(("out", *NAMES), (out, *grads), (out_b, *grads_b), (out_e, *grads_e)):
            assert not torch.isnan(y).any(), f"{name} ({smem_scores}): an element was never written"
            e, eb = rel_l2(y, ye), rel_l2(yb, ye)
            assert e <= 2 * eb + 1e-6, f"{name} ({smem_scores}): fused {e:.3e} vs baseline {eb:.3e}"
        lses.append(OP_FWD(*x, lengths, d**-0.5, 0.0, None)[1])
    assert (lses[0] - lses[1]).abs().max().item() <= 1e-5 * max(1.0, lses[1].abs().max().item())


@pytest.mark.parametrize("variable,message", [("PKA_FWD_WARPS", "must be 0, 4 or 8"),
                                              ("PKA_BWD_WARPS", "must be 0, 4 or 8"),
                                              ("PKA_FUSED_WORKSPACE", "must be 0, 1 or split"),
                                              ("PKA_SMEM_SCORES", "must be 0 or 1"),
                                              ("PKA_BLOCK_ORDER", "must be 0 or 1"),
                                              ("PKA_CUDA_UNFUSED", "must be 0 or 1")])
@pytest.mark.parametrize("value", ["6", "8x", "off"])
def test_bad_launch_setting_is_refused(variable, message, value, monkeypatch):
    """A mistyped switch is an error, not the default path (atoi read "8x" as 8 and "off" as 0)."""
    x64, lengths, dout64 = inputs64(2, 1, 16, 32, per_head=False, seed=2)
    x, dout = [t.float() for t in x64], dout64.float()
    monkeypatch.setenv(variable, value)
    with pytest.raises(RuntimeError, match=f"{variable} {message}, got '{value}'"):
        fwd_bwd(pka_ext.pka_attention, x, lengths, dout, dropout_p=0.0, seed=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_misaligned_views_give_the_same_results(dtype):
    """The kernels copy rows in 16-byte chunks; inputs whose data starts off a 16-byte boundary
    (a view one element into its storage) are copied by the entry point, not read misaligned."""
    B, H, T, d = 2, 2, 37, 64
    x64, lengths, dout64 = inputs64(B, H, T, d, per_head=False, seed=11)
    x, dout = [t.to(dtype) for t in x64], dout64.to(dtype)

    def shifted(t):  # same values, data pointer one element past an aligned allocation
        buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
        view = buf[1:].view(t.shape)
        view.copy_(t)
        assert view.data_ptr() % 16 != 0
        return view

    scale = d**-0.5
    out, lse = OP_FWD(*x, lengths, scale, 0.0, None)
    grads = OP_BWD(dout, *x, lengths, out, lse, scale, 0.0, None)
    xs = [shifted(t) if i < 3 else t for i, t in enumerate(x)]
    out_s, lse_s = OP_FWD(*xs, lengths, scale, 0.0, None)
    grads_s = OP_BWD(shifted(dout), *xs, lengths, shifted(out_s), lse_s, scale, 0.0, None)
    assert torch.equal(out, out_s) and torch.equal(lse, lse_s)
    for name, g, gs in zip(NAMES[:3], grads[:3], grads_s[:3]):
        assert torch.equal(g, gs), f"d{name}"


def test_deterministic_mode_uses_the_deterministic_backward(monkeypatch):
    """Under torch.use_deterministic_algorithms(True) the backward is the unfused one: bitwise
    reproducible, close to the fused one, and it never reads the fused backward's launch switch
    (a bad PKA_BWD_WARPS, which the fused backward refuses, goes unnoticed). Two equal runs alone
    would not show which backward ran: the fused one's atomics often add in the same order."""
    B, H, T, d = 4, 2, 64, 32
    x64, lengths, dout64 = inputs64(B, H, T, d, per_head=False, seed=1)
    x, dout = [t.float() for t in x64], dout64.float()
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = [fwd_bwd(pka_ext.pka_attention, x, lengths, dout)[1] for _ in range(2)]
        monkeypatch.setenv("PKA_BWD_WARPS", "6")
        runs.append(fwd_bwd(pka_ext.pka_attention, x, lengths, dout)[1])
    finally:
        torch.use_deterministic_algorithms(old)
    for run in runs[1:]:
        for name, a, b in zip(NAMES, runs[0], run):
            assert torch.equal(a, b), f"d{name}"
    with pytest.raises(RuntimeError, match="PKA_BWD_WARPS must be 0, 4 or 8, got '6'"):
        fwd_bwd(pka_ext.pka_attention, x, lengths, dout)  # the fused backward reads it
    monkeypatch.delenv("PKA_BWD_WARPS")
    fused = fwd_bwd(pka_ext.pka_attention, x, lengths, dout)[1]
    for name, a, f in zip(NAMES, runs[0], fused):
        assert rel(f, a) <= 1e-4, f"d{name}"


def test_lse_is_float32_and_matches_reference():
    B, H, T, d = 2, 3, 77, 64
    x64, lengths, _ = inputs64(B, H, T, d, per_head=False, seed=4)
    x = [t.bfloat16() for t in x64]
    out, lse = OP_FWD(*x, lengths, d**-0.5, 0.0, None)
    assert lse.dtype == torch.float32
    _, lse64 = OP_FWD(*[t.double().cpu() for t in x], lengths.cpu(), d**-0.5, 0.0, None)
    assert (lse.cpu().double() - lse64).abs().max().item() < 2e-2


@pytest.mark.parametrize("d", [8, 48, 256])
def test_other_head_dims_take_the_unfused_path(d):
    """Head dims without a fused kernel still work (unfused path), in float32 against float64."""
    B, H, T = 2, 1, 33
    x64, lengths, dout64 = inputs64(B, H, T, d, per_head=False, seed=d)
    x = [t.float() for t in x64]
    out, grads = fwd_bwd(pka_ext.pka_attention, x, lengths, dout64.float())
    out_r, grads_r = fwd_bwd(python_ref.pka_attention, x64, lengths, dout64)
    assert rel(out, out_r) <= 1e-4
    for g, gr in zip(grads, grads_r):
        assert rel(g, gr) <= 1e-4


def test_training_step_runs_on_cuda():
    """The recommender's PSA model trains on the device through the fused kernels."""
    from pka_ext.rec.config import ModelConfig
    from pka_ext.rec.models import SeqRecModel

    torch.manual_seed(0)
    model = SeqRecModel(ModelConfig(model="psa", num_items=50, hidden=64, max_len=20,
                                    dropout=0.1)).to(DEVICE)
    x = torch.randint(0, 51, (8, 20), device=DEVICE)
    x[:, :5] = 0
    with torch.autocast("cuda", dtype=torch.bfloat16):
        h = model(x)
    loss = h.float().pow(2).mean()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("amp", [False, True], ids=["float32", "bf16_autocast"])
def test_recommender_trains_on_cuda(tmp_path, amp):
    """pka-rec train on the device (float32, and bfloat16 autocast): the synthetic data is learned."""
    from pka_ext.rec.cli import main as cli_main

    out = str(tmp_path / "run")
    cli_main(["train", "--format", "synthetic", "--model", "psa", "--epochs", "3", "--max-len", "20",
              "--hidden", "64", "--device", DEVICE, "--out", out, "--no-progress", "--patience", "10",
              *(["--amp"] if amp else [])])
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)
    assert metrics["config"]["train"]["amp"] == amp
    assert metrics["test"]["hr@10"] > 0.1  # a random ranking scores about 10 / 500
