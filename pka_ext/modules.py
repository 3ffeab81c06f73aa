"""nn.Modules built on the op: learnable positional kernels, attention, and the PSA transformer."""

from __future__ import annotations

import numbers

import torch
from torch import nn

import python_ref
from pka_ext.ops import pka_attention, seed_tensor
from pka_ext.padding import integer_lengths

BACKENDS = ("auto", "cpu", "cuda", "reference")


def int_at_least(value, minimum: int = 1) -> bool:
    """Whether ``value`` is an integer, Python's or numpy's, of at least ``minimum``.

    The one rule for the sizes, counts and cutoffs the package takes (the modules' sizes, the run
    configs, the recommender's and evaluation's ``k`` and ``batch_size``), so that one value is
    not accepted by one of them and refused by another. bool is refused though Python counts it
    an int: ``True`` given as a size is a mistake, not 1. A tensor is refused, as it is no number.
    """
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= minimum


def check_sizes(**sizes) -> None:
    """Raises a ValueError naming the first of ``sizes`` that is not a positive integer."""
    for name, value in sizes.items():
        if not int_at_least(value):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def as_lengths(lengths, device=None) -> torch.Tensor | None:
    """The modules' ``lengths``: None, or a tensor or sequence of integers, as the op's int64."""
    if lengths is None:
        return None
    return integer_lengths(lengths, device).long()


def attention(q, k, v, a_k, a_v, lengths, *, dropout_p: float, backend: str):
    """Dispatches the op to a backend; ``auto`` runs the compiled op on the inputs' device."""
    _check_backend(backend)
    lengths = as_lengths(lengths)
    # Under autocast q, k, v come out of the projections in the low dtype while the kernels stay
    # float32 parameters; the op wants one dtype, and the kernels are small.
    a_k, a_v = a_k.to(q.dtype), a_v.to(q.dtype)
    if backend == "reference":
        # python_ref wants an explicit seed; drawing it here keeps torch.manual_seed reproducibility.
        seed = int(seed_tensor(dropout_p, None)) if dropout_p > 0 else None
        return python_ref.pka_attention(q, k, v, a_k, a_v, lengths, dropout_p=dropout_p, seed=seed)
    if backend != "auto" and q.device.type != backend:
        raise RuntimeError(
            f"backend={backend!r} cannot run inputs on {q.device}; move the module to {backend} "
            "or use backend='auto'"
        )
    return pka_attention(q, k, v, a_k, a_v, lengths, dropout_p=dropout_p)


def project_heads(attn: nn.Module, query: torch.Tensor, key_value: torch.Tensor):
    """``attn``'s queries from ``query`` and keys and values from ``key_value``, each
    ``[B, H, T, head_dim]``: PKAttention's ``q_proj`` and ``kv_proj`` (keys, then values), a layout
    the recommender's baseline attention shares. Its attention maps (``pka_ext.rec.plots``) are
    drawn from these, so they are the heads the forward computes."""
    B, T, _ = query.shape
    H, hd = attn.num_heads, attn.head_dim
    q = attn.q_proj(query).view(B, T, H, hd).transpose(1, 2)  # [B, H, T, hd]
    k, v = attn.kv_proj(key_value).view(B, T, 2, H, hd).permute(2, 0, 3, 1, 4)  # [B, H, T, hd]
    return q, k, v


class PositionalKernel(nn.Module):
    """A learnable lower-triangular mixing matrix over time positions.

    Parameters
    ----------
    max_len : int
        Longest sequence the kernel serves.
    kind : {"toeplitz", "full"}
        ``toeplitz``: ``A[i, j] = g[i - j]`` from a vector ``g`` of length ``max_len``; ``full``: a
        free lower-triangular ``max_len x max_len`` matrix.
    normalize : bool
        Toeplitz: divide ``g`` by its L2 norm. Full: divide by the Frobenius norm of the lower
        triangle.
    fix_first : bool
        Toeplitz only: keep ``g[0] = 1`` (not trained) before normalisation.
    num_heads : int, optional
        Give each head its own kernel (output ``[H, T, T]``); default one kernel for all heads.
    init_std : float
        Off-diagonal entries start as ``|N(0, init_std)|``.

    ``forward(T)`` returns the trailing ``T x T`` block of the ``max_len x max_len`` kernel, so that
    the most recent position (T-1, sequences are left-padded) always lines up with ``max_len - 1``.
    The upper triangle of the result is 0.
    """

    def __init__(self, max_len: int, kind: str = "toeplitz", normalize: bool = True,
                 fix_first: bool = True, num_heads: int | None = None, init_std: float = 0.02):
        super().__init__()
        if kind not in ("toeplitz", "full"):
            raise ValueError(f"kind must be 'toeplitz' or 'full', got {kind!r}")
        check_sizes(max_len=max_len)
        if num_heads is not None:
            check_sizes(num_heads=num_heads)
        self.max_len, self.kind, self.normalize = max_len, kind, normalize
        self.fix_first = fix_first and kind == "toeplitz"
        self.num_heads = num_heads
        lead = () if num_heads is None else (num_heads,)
        if kind == "toeplitz":
            n = max_len - 1 if self.fix_first else max_len
            g = torch.randn(*lead, n).abs_() * init_std
            if not self.fix_first:
                g[..., 0] = 1.0
            self.weight = nn.Parameter(g)
        else:
            w = torch.randn(*lead, max_len, max_len).abs_().mul_(init_std).tril_(-1)
            self.weight = nn.Parameter(w + torch.eye(max_len))
        self.register_buffer("_tril", torch.ones(max_len, max_len, dtype=torch.bool).tril(),
                             persistent=False)

    def taps(self) -> torch.Tensor:
        """Toeplitz: the (normalised) vector g, ``[max_len]`` or ``[H, max_len]``."""
        if self.kind != "toeplitz":
            raise AttributeError("taps() exists only for kind='toeplitz'")
        g = self.weight
        if self.fix_first:
            g = torch.cat([g.new_ones(*g.shape[:-1], 1), g], dim=-1)  # g may be empty: max_len 1
        if self.normalize:
            g = g / g.norm(dim=-1, keepdim=True)
        return g

    def forward(self, T: int) -> torch.Tensor:
        if not 1 <= T <= self.max_len:
            raise ValueError(f"T must be in [1, max_len={self.max_len}], got {T}")
        # The trailing block is gathered, not sliced: whether a T x T slice of a max_len x max_len
        # matrix is contiguous depends on T == max_len, so slicing made torch.export fix T.
        pos = torch.arange(self.max_len - T, self.max_len, device=self.weight.device)
        if self.kind == "toeplitz":
            lag = pos[:, None] - pos[None, :]  # [T, T]
            return self.taps()[..., lag.clamp(min=0)] * (lag >= 0)
        w = self.weight * self._tril
        if self.normalize:
            w = w / w.norm(dim=(-2, -1), keepdim=True)
        return w[..., pos[:, None], pos[None, :]]

    def extra_repr(self) -> str:
        return (f"max_len={self.max_len}, kind={self.kind!r}, normalize={self.normalize}, "
                f"fix_first={self.fix_first}, num_heads={self.num_heads}")


class PKAttention(nn.Module):
    """Multi-head positional-kernel attention.

    Queries come from ``query`` and keys/values from ``key_value`` (the paper feeds LayerNorm(X) as
    queries and raw X as keys and values). The mixing kernels are passed to ``forward`` so that they
    can be shared across layers.

    Parameters
    ----------
    embed_dim, num_heads : int
        ``embed_dim`` must be divisible by ``num_heads``.
    max_len : int
        Longest sequence accepted.
    dropout : float
        Dropout on attention probabilities (training only).
    bias : bool
        Bias in the projections. Keys and values are projected before they are mixed, so their
        bias is mixed too, ``A (X W + b)``, where the authors' code mixes first, ``A X W + b``: at
        position i the two differ by ``(sum_j A_ij - 1) b``, the sum over the sequence's real
        positions ``j <= i`` (padded rows are zero before mixing), which ``bias=False`` removes.
    backend : {"auto", "cpu", "cuda", "reference"}
    """

    def __init__(self, embed_dim: int, num_heads: int, max_len: int, dropout: float = 0.0,
                 bias: bool = True, backend: str = "auto"):
        super().__init__()
        check_sizes(embed_dim=embed_dim, num_heads=num_heads, max_len=max_len)
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        _check_backend(backend)
        self.embed_dim, self.num_heads, self.max_len = embed_dim, num_heads, max_len
        self.head_dim = embed_dim // num_heads
        self.dropout, self.backend = dropout, backend
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.kv_proj = nn.Linear(embed_dim, 2 * embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)

    def forward(self, query: torch.Tensor, key_value: torch.Tensor | None = None,
                lengths: torch.Tensor | None = None, *, key_kernel: torch.Tensor,
                value_kernel: torch.Tensor) -> torch.Tensor:
        """query, key_value: ``[B, T, D]``; kernels ``[T, T]`` or ``[H, T, T]``; returns ``[B, T, D]``."""
        key_value = query if key_value is None else key_value
        if query.dim() != 3 or query.shape[-1] != self.embed_dim:
            raise ValueError(f"query must be [B, T, {self.embed_dim}], got {tuple(query.shape)}")
        if key_value.shape != query.shape:
            raise ValueError(f"key_value shape {tuple(key_value.shape)} must equal query shape "
                             f"{tuple(query.shape)}")
        B, T, D = query.shape
        if T > self.max_len:
            raise ValueError(f"sequence length T={T} exceeds max_len={self.max_len}")
        q, k, v = project_heads(self, query, key_value)
        p = self.dropout if self.training else 0.0
        o = attention(q, k, v, key_kernel, value_kernel, lengths, dropout_p=p, backend=self.backend)
        return self.out_proj(o.transpose(1, 2).reshape(B, T, D))


class PKABlock(nn.Module):
    """One PSA block: attention (queries from LayerNorm(X), keys/values from X) then a FFN.

    ``block="pre_ln"``: ``h = X + Attn(LN1(X), X)``, ``out = h + FFN(LN2(h))``.
    ``block="authors"`` (the authors' SASRec-derived code): the attention residual is taken from
    the normalised input, ``h = LN1(X) + Attn(LN1(X), X)``, then ``h = LN2(h)``,
    ``out = h + FFN(h)``.
    """

    def __init__(self, embed_dim: int, num_heads: int, max_len: int, ffn_dim: int,
                 dropout: float, block: str, backend: str = "auto", attn: nn.Module | None = None):
        super().__init__()
        if block not in ("pre_ln", "authors"):
            raise ValueError(f"block must be 'pre_ln' or 'authors', got {block!r}")
        self.block = block
        self.ln1 = nn.LayerNorm(embed_dim)
        # Any module with PKAttention's forward signature fits, e.g. the recommender's baselines.
        self.attn = attn if attn is not None else PKAttention(
            embed_dim, num_heads, max_len, dropout=dropout, backend=backend)
        self.ln2 = nn.LayerNorm(embed_dim)
        self.ffn = nn.Sequential(nn.Linear(embed_dim, ffn_dim), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(ffn_dim, embed_dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x, lengths, key_kernel, value_kernel):
        xn = self.ln1(x)
        a = self.drop(self.attn(xn, x, lengths, key_kernel=key_kernel, value_kernel=value_kernel))
        if self.block == "pre_ln":
            h = x + a
            return h + self.drop(self.ffn(self.ln2(h)))
        h = self.ln2(xn + a)
        return h + self.drop(self.ffn(h))


def padding_mask(lengths: torch.Tensor | None, B: int, T: int, device) -> torch.Tensor | None:
    """``[B, T]`` bool, True at real (non-padded) positions of left-padded sequences."""
    if lengths is None:
        return None
    if lengths.shape != (B,):
        raise ValueError(f"lengths must be [B] = [{B}], got shape {tuple(lengths.shape)}")
    pos = torch.arange(T, device=device)
    return pos[None, :] >= (T - lengths.to(device))[:, None]


class PKATransformer(nn.Module):
    """A stack of PSA blocks with positional kernels instead of positional embeddings.

    Defaults are the paper's best setting: a Toeplitz key kernel per layer and one full value
    kernel shared by all layers, both normalised.

    Parameters
    ----------
    num_layers, embed_dim, num_heads, max_len : int
    ffn_dim : int, optional
        Hidden size of the position-wise FFN (default ``embed_dim``, as in SASRec).
    dropout : float
        Attention-probability, residual and FFN dropout.
    key_kernel, value_kernel : {"toeplitz", "full"}
    share_key_kernel, share_value_kernel : bool
        One kernel for all layers (True) or one per layer (False).
    normalize_kernels : bool
    per_head_kernels : bool
        ``[H, T, T]`` kernels instead of one ``[T, T]`` shared by the heads.
    block : {"pre_ln", "authors"}
        See :class:`PKABlock`.
    backend : {"auto", "cpu", "cuda", "reference"}

    Input ``[B, T, D]`` and optional ``lengths`` (left padding); output ``[B, T, D]`` after a final
    LayerNorm, with padded rows exactly 0.
    """

    def __init__(self, num_layers: int, embed_dim: int, num_heads: int, max_len: int,
                 ffn_dim: int | None = None, dropout: float = 0.0, key_kernel: str = "toeplitz",
                 value_kernel: str = "full", share_key_kernel: bool = False,
                 share_value_kernel: bool = True, normalize_kernels: bool = True,
                 per_head_kernels: bool = False, block: str = "pre_ln", backend: str = "auto"):
        super().__init__()
        check_sizes(num_layers=num_layers, embed_dim=embed_dim, num_heads=num_heads,
                    max_len=max_len, ffn_dim=embed_dim if ffn_dim is None else ffn_dim)
        for name, kind in (("key_kernel", key_kernel), ("value_kernel", value_kernel)):
            if kind not in ("toeplitz", "full"):
                raise ValueError(f"{name} must be 'toeplitz' or 'full', got {kind!r}")
        self.max_len, self.embed_dim = max_len, embed_dim
        heads = num_heads if per_head_kernels else None

        def kernels(kind: str, shared: bool) -> nn.ModuleList:
            make = lambda: PositionalKernel(max_len, kind, normalize=normalize_kernels,  # noqa: E731
                                            num_heads=heads)
            return nn.ModuleList([make()] if shared else [make() for _ in range(num_layers)])

        self.key_kernels = kernels(key_kernel, share_key_kernel)
        self.value_kernels = kernels(value_kernel, share_value_kernel)
        self.blocks = nn.ModuleList([
            PKABlock(embed_dim, num_heads, max_len, embed_dim if ffn_dim is None else ffn_dim,
                     dropout, block, backend)
            for _ in range(num_layers)
        ])
        self.final_ln = nn.LayerNorm(embed_dim)

    def kernel_matrices(self, T: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(A_k, A_v) used by each layer for sequences of length T."""
        ks = [m(T) for m in self.key_kernels]
        vs = [m(T) for m in self.value_kernels]
        return [(ks[0 if len(ks) == 1 else i], vs[0 if len(vs) == 1 else i])
                for i in range(len(self.blocks))]

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"x must be [B, T, embed_dim={self.embed_dim}], got shape "
                             f"{tuple(x.shape)}")
        B, T, _ = x.shape
        if T > self.max_len:
            raise ValueError(f"sequence length T={T} exceeds max_len={self.max_len}")
        # Not cast here: attention() rounds them once, to the projections' dtype.
        kernels = self.kernel_matrices(T)
        return run_blocks(self.blocks, self.final_ln, x, as_lengths(lengths), kernels)


def run_blocks(blocks, final_ln, x, lengths, kernels):
    """Applies blocks (with their (A_k, A_v) pairs) and the final LayerNorm, keeping padded rows 0.

    Padded rows are selected away, not multiplied by 0, so that whatever the input holds there
    (NaN, Inf) reaches neither the outputs nor the weights' gradients.
    """
    B, T, _ = x.shape
    keep = padding_mask(lengths, B, T, x.device)
    if keep is None:
        for block, (a_k, a_v) in zip(blocks, kernels):
            x = block(x, lengths, a_k, a_v)
        return final_ln(x)
    keep = keep.unsqueeze(-1)  # [B, T, 1]
    zero = x.new_zeros(())
    x = torch.where(keep, x, zero)
    for block, (a_k, a_v) in zip(blocks, kernels):
        # Padded rows pick up biases in the FFN; keep them exactly 0.
        x = torch.where(keep, block(x, lengths, a_k, a_v), zero)
    return torch.where(keep, final_ln(x), zero)
