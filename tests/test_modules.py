"""PositionalKernel, PKAttention and PKATransformer."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

import python_ref
from pka_ext import PKAttention, PKATransformer, PositionalKernel


def test_toeplitz_kernel_structure_and_normalisation():
    torch.manual_seed(0)
    pk = PositionalKernel(10, "toeplitz")
    A = pk(10)
    g = pk.taps()
    assert g.shape == (10,)
    torch.testing.assert_close(g.norm(), torch.tensor(1.0))
    raw = torch.cat([torch.ones(1), pk.weight.detach()])
    torch.testing.assert_close(g, raw / raw.norm())
    for i in range(10):
        for j in range(10):
            assert A[i, j] == (g[i - j] if j <= i else 0)
    assert (pk.weight >= 0).all() and pk.weight.shape == (9,)  # g[0] is fixed, not a parameter


def test_toeplitz_without_fix_first_or_normalisation():
    pk = PositionalKernel(6, "toeplitz", normalize=False, fix_first=False)
    assert pk.weight.shape == (6,) and pk.weight[0] == 1.0
    torch.testing.assert_close(pk(6).diagonal(), torch.ones(6))


def test_full_kernel_init_and_normalisation():
    torch.manual_seed(0)
    pk = PositionalKernel(8, "full")
    A = pk(8)
    assert torch.all(A.triu(1) == 0)
    torch.testing.assert_close(A.norm(), torch.tensor(1.0))
    raw = pk.weight.detach()
    torch.testing.assert_close(raw.diagonal(), torch.ones(8))
    off = raw.tril(-1)
    assert (off >= 0).all() and 0 < off.abs().max() < 0.2
    un = PositionalKernel(8, "full", normalize=False)
    torch.testing.assert_close(un(8), un.weight.detach().tril())


@pytest.mark.parametrize("kind", ["toeplitz", "full"])
@pytest.mark.parametrize("heads", [None, 3])
def test_trailing_block_alignment(kind, heads):
    pk = PositionalKernel(12, kind, num_heads=heads)
    full = pk(12)
    for T in (1, 5, 11):
        torch.testing.assert_close(pk(T), full[..., -T:, -T:])
    assert full.shape == ((12, 12) if heads is None else (3, 12, 12))
    with pytest.raises(ValueError, match="max_len=12"):
        pk(13)


def attention_by_hand(att, query, key_value, lengths, a_k, a_v):
    """PKAttention written out from its weights, attention by python_ref: queries projected from
    ``query``, keys and values (the first and second half of kv_proj) from ``key_value``, mixed by
    A_k and A_v, heads merged, out_proj."""
    B, T, D = query.shape
    H = att.num_heads

    def heads(t):
        return t.view(B, T, H, D // H).transpose(1, 2)

    w_k, w_v = att.kv_proj.weight.split(D)
    b_k, b_v = att.kv_proj.bias.split(D)
    q = heads(F.linear(query, att.q_proj.weight, att.q_proj.bias))
    k, v = heads(F.linear(key_value, w_k, b_k)), heads(F.linear(key_value, w_v, b_v))
    o = python_ref.pka_attention(q, k, v, a_k, a_v, lengths)
    return F.linear(o.transpose(1, 2).reshape(B, T, D), att.out_proj.weight, att.out_proj.bias)


def test_attention_module_shapes_and_backends_agree():
    """Both backends compute queries from ``query``, keys and values from ``key_value``, each
    mixed by its own kernel: against the module written out by hand with python_ref."""
    torch.manual_seed(0)
    m = PKAttention(16, 4, max_len=10).double()
    ref = PKAttention(16, 4, max_len=10, backend="reference").double()
    ref.load_state_dict(m.state_dict())
    x, y = torch.randn(3, 10, 16, dtype=torch.float64), torch.randn(3, 10, 16, dtype=torch.float64)
    lens = torch.tensor([10, 4, 0])
    # Two unrelated lower-triangular kernels far from the identity (random upper triangles, which
    # must be ignored), so that swapping or dropping one shows.
    A_k, A_v = (torch.randn(10, 10, dtype=torch.float64) / 10**0.5 for _ in range(2))
    out = m(x, y, lens, key_kernel=A_k, value_kernel=A_v)
    out_ref = ref(x, y, lens, key_kernel=A_k, value_kernel=A_v)
    expected = attention_by_hand(m, x, y, lens, A_k, A_v)
    assert out.shape == (3, 10, 16)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(out_ref, expected, atol=1e-12, rtol=0)
    assert torch.all(out[2] == m.out_proj.bias)  # an empty sequence attends to nothing: o = 0


def transformer_by_hand(m, x, lengths):
    """PKATransformer's forward written out from its parts (README: pre_ln
    ``h = X + Attn(LN1(X), X)``, ``out = h + FFN(LN2(h))``; authors
    ``h = LN2(LN1(X) + Attn(LN1(X), X))``, ``out = h + FFN(h)``), attention by python_ref with each
    layer's own key kernel and the shared value kernel, padded rows 0 after every block and the
    final LayerNorm."""
    T = x.shape[1]
    keep = (torch.arange(T)[None, :] >= T - lengths[:, None])[..., None]
    x = torch.where(keep, x, 0.0)
    for i, blk in enumerate(m.blocks):
        a_k = m.key_kernels[i if len(m.key_kernels) > 1 else 0](T)
        a_v = m.value_kernels[i if len(m.value_kernels) > 1 else 0](T)
        xn = blk.ln1(x)
        a = attention_by_hand(blk.attn, xn, x, lengths, a_k, a_v)
        if blk.block == "pre_ln":
            h = x + a
            y = h + blk.ffn(blk.ln2(h))
        else:
            h = blk.ln2(xn + a)
            y = h + blk.ffn(h)
        x = torch.where(keep, y, 0.0)
    return torch.where(keep, m.final_ln(x), 0.0)


@pytest.mark.parametrize("block", ["pre_ln", "authors"])
@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_transformer_matches_its_blocks_written_out(block, per_head, backend):
    torch.manual_seed(0)
    m = PKATransformer(2, 16, 2, max_len=12, block=block, per_head_kernels=per_head,
                       backend=backend).double()
    with torch.no_grad():  # kernels well away from their near-identity start
        for kernel in (*m.key_kernels, *m.value_kernels):
            kernel.weight.add_(torch.rand_like(kernel.weight))
    x = torch.randn(4, 9, 16, dtype=torch.float64)
    lens = torch.tensor([9, 1, 0, 5])
    torch.testing.assert_close(m(x, lens), transformer_by_hand(m, x, lens), atol=1e-10, rtol=0)


def _transformer_pair(**kw):
    torch.manual_seed(0)
    m = PKATransformer(2, 16, 2, max_len=12, dropout=0.0, **kw).double()
    ref = PKATransformer(2, 16, 2, max_len=12, dropout=0.0, backend="reference", **kw).double()
    ref.load_state_dict(m.state_dict())
    return m, ref


@pytest.mark.parametrize("block", ["pre_ln", "authors"])
@pytest.mark.parametrize("per_head", [False, True])
def test_transformer_compiled_and_reference_agree(block, per_head):
    m, ref = _transformer_pair(block=block, per_head_kernels=per_head)
    x = torch.randn(4, 9, 16, dtype=torch.float64)
    lens = torch.tensor([9, 1, 0, 5])
    out, out_ref = m(x, lens), ref(x, lens)
    torch.testing.assert_close(out, out_ref, atol=1e-10, rtol=0)
    out.square().sum().backward()
    out_ref.square().sum().backward()
    for (name, p), p_ref in zip(m.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, atol=1e-9, rtol=0, msg=lambda s: f"{name}: {s}")


def _float32_transformer_and_batch():
    """A seeded float32 PKATransformer and a padded batch (a full, a short and an empty sequence)."""
    torch.manual_seed(0)
    return PKATransformer(2, 16, 2, max_len=12), torch.randn(4, 12, 16), torch.tensor([12, 1, 0, 5])


def assert_grads_finite(m, *, nonzero=False):
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert not nonzero or p.grad.abs().sum() > 0, name


def test_transformer_under_cpu_bfloat16_autocast():
    """CPU autocast hands the op bfloat16 q, k, v and kernels: it runs, close to float32."""
    m, x, lens = _float32_transformer_and_batch()
    out32 = m(x, lens)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out16 = m(x, lens)
    err = ((out16.float() - out32).abs().max() / out32.abs().max()).item()
    assert err < 5e-2, err
    out16.float().square().sum().backward()
    assert_grads_finite(m, nonzero=True)


def test_transformer_rounds_kernels_once_to_the_projections_dtype(monkeypatch):
    """The kernels reach the op cast straight to q's dtype, not through the input's dtype first
    (float32 -> float16 -> bfloat16 rounds some entries differently from float32 -> bfloat16)."""
    import pka_ext.modules

    seen = []
    op = pka_ext.modules.pka_attention

    def spy(q, k, v, a_k, a_v, *args, **kw):
        seen.append((q.dtype, a_k, a_v))
        return op(q, k, v, a_k, a_v, *args, **kw)

    monkeypatch.setattr(pka_ext.modules, "pka_attention", spy)
    torch.manual_seed(0)
    T = 50
    m = PKATransformer(1, 16, 2, max_len=T)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m(torch.randn(2, T, 16, dtype=torch.float16), torch.tensor([T, 3]))
    (dtype, a_k, a_v), = seen
    k_kernel, v_kernel = m.kernel_matrices(T)[0]
    assert dtype == torch.bfloat16
    assert torch.equal(a_k, k_kernel.to(dtype)) and torch.equal(a_v, v_kernel.to(dtype))


def test_transformer_compiles_without_graph_breaks():
    m, x, lens = _float32_transformer_and_batch()
    eager = m(x, lens)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")(x, lens)
    torch.testing.assert_close(compiled, eager)
    params = [p for p in m.parameters() if p.requires_grad]
    grads = torch.autograd.grad(compiled.square().sum(), params)
    for g, r in zip(grads, torch.autograd.grad(eager.square().sum(), params)):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("kw", [{}, dict(key_kernel="full", value_kernel="toeplitz",
                                         per_head_kernels=True)], ids=["paper", "per_head"])
def test_transformer_exports_dynamic_in_batch_and_length(kw):
    """torch.export keeps B and T symbolic; the saved program reloads and matches eager."""
    torch.manual_seed(0)
    m = PKATransformer(2, 16, 2, max_len=12, dropout=0.1, **kw).eval()
    B, T = torch.export.Dim("B"), torch.export.Dim("T", min=1, max=12)
    ep = torch.export.export(m, (torch.randn(3, 8, 16), torch.tensor([8, 3, 0])),
                             dynamic_shapes=({0: B, 1: T}, {0: B}))
    assert "torch.ops.pka_ext.pka_fwd" in ep.graph_module.code
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    buf.seek(0)
    loaded = torch.export.load(buf).module()
    for b, t in ((5, 12), (2, 1), (4, 7)):
        x, lens = torch.randn(b, t, 16), torch.randint(0, t + 1, (b,))
        torch.testing.assert_close(loaded(x, lens), m(x, lens), rtol=0, atol=0)


def test_exported_training_graph_draws_the_dropout_seed_like_eager():
    torch.manual_seed(0)
    m = PKATransformer(2, 16, 2, max_len=12, dropout=0.3)
    x, lens = torch.randn(3, 12, 16), torch.tensor([12, 5, 0])
    ep = torch.export.export(m, (x, lens))
    torch.manual_seed(7)
    exported = ep.module()(x, lens)
    torch.manual_seed(7)
    torch.testing.assert_close(exported, m(x, lens), rtol=0, atol=0)
    torch.manual_seed(8)
    assert not torch.equal(ep.module()(x, lens), exported)


def test_transformer_default_kernel_sharing_and_gradients():
    m = PKATransformer(3, 16, 2, max_len=12)
    assert len(m.key_kernels) == 3 and len(m.value_kernels) == 1
    assert all(k.kind == "toeplitz" for k in m.key_kernels) and m.value_kernels[0].kind == "full"
    pairs = m.kernel_matrices(12)
    assert all(v is pairs[0][1] for _, v in pairs)  # one A_v object used by every layer
    x = torch.randn(2, 12, 16)
    m(x, torch.tensor([12, 6])).square().sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_transformer_sharing_switches():
    m = PKATransformer(2, 8, 1, max_len=5, share_key_kernel=True, share_value_kernel=False,
                       key_kernel="full", value_kernel="toeplitz")
    assert len(m.key_kernels) == 1 and len(m.value_kernels) == 2
    assert m.key_kernels[0].kind == "full" and m.value_kernels[1].kind == "toeplitz"


def test_transformer_padding_rows_zero_and_independent_of_pad_amount():
    # Left padding plus trailing-block kernels: the real rows' outputs do not depend on how much
    # padding precedes them.
    m = PKATransformer(2, 8, 2, max_len=16).double().eval()
    seq = torch.randn(1, 5, 8, dtype=torch.float64)
    short = m(seq, torch.tensor([5]))
    padded_in = torch.cat([torch.randn(1, 7, 8, dtype=torch.float64), seq], dim=1)
    padded = m(padded_in, torch.tensor([5]))
    assert torch.all(padded[:, :7] == 0)
    torch.testing.assert_close(padded[:, 7:], short, atol=1e-12, rtol=0)


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("garbage", [float("nan"), float("inf")])
def test_transformer_padded_input_rows_reach_neither_outputs_nor_gradients(backend, garbage):
    m = PKATransformer(2, 8, 2, max_len=6, backend=backend).double()
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    lens = torch.tensor([4, 6])
    clean = m(x, lens)
    clean.square().sum().backward()
    grads = {name: p.grad.clone() for name, p in m.named_parameters()}
    m.zero_grad()
    dirty = x.clone()
    dirty[0, :2] = garbage
    out = m(dirty, lens)
    out.square().sum().backward()
    assert torch.equal(out, clean) and torch.all(out[0, :2] == 0)
    for name, p in m.named_parameters():
        assert torch.equal(p.grad, grads[name]), name


def test_reference_backend_runs_under_autocast():
    """Under CPU bfloat16 autocast the reference backend runs and stays close to float32."""
    torch.manual_seed(0)
    m = PKATransformer(1, 8, 2, max_len=4, backend="reference")
    x = torch.randn(2, 4, 8)
    lens = torch.tensor([4, 2])
    out32 = m(x, lens)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x, lens)
    assert torch.isfinite(out).all() and torch.all(out[1, :2] == 0)
    err = ((out.float() - out32).abs().max() / out32.abs().max()).item()
    assert err < 5e-2, err


@pytest.mark.parametrize("heads", [None, 2])
def test_kernels_of_length_one(heads):
    for kind in ("toeplitz", "full"):
        a = PositionalKernel(1, kind, num_heads=heads)(1)
        assert a.shape == ((1, 1) if heads is None else (2, 1, 1)) and torch.all(a == 1), kind


def test_transformer_rejects_long_sequences_and_bad_options():
    m = PKATransformer(1, 8, 1, max_len=4)
    with pytest.raises(ValueError, match="max_len=4"):
        m(torch.randn(1, 5, 8))
    with pytest.raises(ValueError, match="backend"):
        PKATransformer(1, 8, 1, max_len=4, backend="tpu")
    with pytest.raises(ValueError, match="block"):
        PKATransformer(1, 8, 1, max_len=4, block="post_ln")
    with pytest.raises(ValueError, match="kind"):
        PositionalKernel(4, "circulant")
    with pytest.raises(ValueError, match="divisible"):
        PKAttention(10, 3, max_len=4)


@pytest.mark.parametrize("make,match", [
    (lambda: PKATransformer(0, 8, 1, max_len=4), "num_layers must be a positive integer, got 0"),
    (lambda: PKATransformer(1, 0, 1, max_len=4), "embed_dim must be a positive integer, got 0"),
    (lambda: PKATransformer(1, 8, 0, max_len=4), "num_heads must be a positive integer, got 0"),
    (lambda: PKATransformer(1, 8, 1, max_len=4.0), "max_len must be a positive integer, got 4.0"),
    (lambda: PKATransformer(1, 8, 1, max_len=4, ffn_dim=0), "ffn_dim must be a positive integer"),
    (lambda: PKATransformer(1, 8, 1, max_len=4, value_kernel="band"),
     "value_kernel must be 'toeplitz' or 'full', got 'band'"),
    (lambda: PKAttention(8, 1, max_len=4, dropout=1.0), r"dropout must be in \[0, 1\), got 1.0"),
    (lambda: PositionalKernel(4, num_heads=0), "num_heads must be a positive integer, got 0"),
])
def test_bad_sizes_are_named_at_construction(make, match):
    # Before, a zero width or head count failed later with a LayerNorm or ZeroDivisionError, a zero
    # FFN width silently became embed_dim, and dropout 1.0 was refused only at the first forward.
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_modules_take_lengths_of_any_integer_dtype(backend):
    # The op itself takes int64 only; the modules widen narrower integers (exact) for the caller.
    m = PKATransformer(1, 8, 2, max_len=5, backend=backend).double()
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    ref = m(x, torch.tensor([5, 2, 0]))
    for dtype in (torch.int32, torch.int16, torch.int8, torch.uint8, torch.uint16, torch.uint32,
                  torch.uint64):
        assert torch.equal(m(x, torch.tensor([5, 2, 0], dtype=dtype)), ref), dtype
    assert torch.equal(m(x, [5, 2, 0]), ref)
    with pytest.raises(TypeError, match="lengths must hold integers, got torch.float32"):
        m(x, torch.tensor([5.0, 2.0, 0.0]))


def test_transformer_names_wrong_width_and_lengths_shape():
    m = PKATransformer(1, 8, 2, max_len=5)
    with pytest.raises(ValueError, match=r"x must be \[B, T, embed_dim=8\], got shape \(2, 5, 7\)"):
        m(torch.randn(2, 5, 7), torch.tensor([5, 3]))
    with pytest.raises(ValueError, match=r"lengths must be \[B\] = \[2\], got shape \(3,\)"):
        m(torch.randn(2, 5, 8), torch.tensor([5, 3, 1]))


def test_cuda_backend_on_cpu_tensors_is_a_clear_error():
    m = PKAttention(8, 2, max_len=4, backend="cuda")
    A = torch.eye(4)
    with pytest.raises(RuntimeError, match="backend='cuda' cannot run inputs on cpu"):
        m(torch.randn(1, 4, 8), key_kernel=A, value_kernel=A)


def test_dropout_only_in_training():
    torch.manual_seed(0)
    m = PKATransformer(1, 8, 2, max_len=6, dropout=0.5)
    x = torch.randn(2, 6, 8)
    m.eval()
    assert torch.equal(m(x), m(x))
    m.train()
    assert not torch.equal(m(x), m(x))


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_empty_batch_takes_lengths_as_an_empty_list(backend):
    # [] (a collator's lengths for an empty batch) becomes a float32 tensor, torch's default dtype
    # for no data; it was refused as "lengths must hold integers, got torch.float32".
    np = pytest.importorskip("numpy")
    m = PKATransformer(1, 8, 2, max_len=5, backend=backend)
    x = torch.randn(0, 5, 8, requires_grad=True)
    for lengths in ([], torch.tensor([]), np.array([])):
        out = m(x, lengths)
        assert out.shape == (0, 5, 8)
        out.sum().backward()
    att = PKAttention(8, 2, max_len=5, backend=backend)
    A = torch.eye(5)
    assert att(x, None, [], key_kernel=A, value_kernel=A).shape == (0, 5, 8)
    with pytest.raises(TypeError, match="lengths must hold integers, got torch.float32"):
        m(torch.randn(1, 5, 8), [5.0])
