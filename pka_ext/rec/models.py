"""The sequential recommender: one backbone, the positional scheme as a switch.

Item embeddings (scaled by sqrt(D), dropout, padding zeroed) -> transformer blocks -> final
LayerNorm -> scores as dot products with the same item embedding table (tied).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pka_ext.modules import PKABlock, PKATransformer, padding_mask, project_heads, run_blocks
from pka_ext.rec.config import ModelConfig


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of [B, H, T, d] (d even) by position-wise angles cos/sin [T, d/2].

    Rotates interleaved pairs (x[2i], x[2i+1]) as RoFormer does, not the two halves of d (the
    "rotate_half" layout); with learned projections the two differ only by a fixed permutation
    of the head dim."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)


class SDPAttention(nn.Module):
    """Standard causal multi-head attention with the same interface and padding semantics as
    :class:`pka_ext.PKAttention` (queries from ``query``, keys/values from ``key_value``).
    Optionally rotary embeddings on queries and keys."""

    def __init__(self, embed_dim: int, num_heads: int, max_len: int, dropout: float,
                 rope: bool = False, rope_base: float = 10000.0):
        super().__init__()
        self.num_heads, self.head_dim, self.dropout = num_heads, embed_dim // num_heads, dropout
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.kv_proj = nn.Linear(embed_dim, 2 * embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.rope = rope
        if rope:
            if self.head_dim % 2:
                raise ValueError(f"rope needs an even head dim, got {self.head_dim}")
            inv = rope_base ** (-torch.arange(0, self.head_dim, 2).float() / self.head_dim)
            ang = torch.arange(max_len).float()[:, None] * inv[None, :]  # [max_len, d/2]
            self.register_buffer("cos", ang.cos(), persistent=False)
            self.register_buffer("sin", ang.sin(), persistent=False)

    def project(self, query, key_value):
        """q, k, v ``[B, H, T, head_dim]`` as the attention scores them: with rope, queries and
        keys rotated."""
        q, k, v = project_heads(self, query, key_value)
        if self.rope:
            T = query.shape[1]
            cos, sin = self.cos[-T:].to(q.dtype), self.sin[-T:].to(q.dtype)
            q, k = rotate_pairs(q, cos, sin), rotate_pairs(k, cos, sin)
        return q, k, v

    def forward(self, query, key_value=None, lengths=None, *, key_kernel=None, value_kernel=None):
        key_value = query if key_value is None else key_value
        B, T, D = query.shape
        q, k, v = self.project(query, key_value)
        causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        valid = padding_mask(lengths, B, T, q.device)
        if valid is None:
            mask = causal
        else:
            # Padded queries see only themselves (SDPA needs a non-empty row); their rows are
            # zeroed by the caller.
            eye = torch.eye(T, dtype=torch.bool, device=q.device)
            mask = (causal & valid[:, None, None, :]) | eye  # [B, 1, T, T]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(o.transpose(1, 2).reshape(B, T, D))


class SDPATransformer(nn.Module):
    """The baselines' stack: the same blocks as PSA with standard attention."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D = cfg.hidden
        self.blocks = nn.ModuleList([
            PKABlock(D, cfg.num_heads, cfg.max_len, D, cfg.dropout, cfg.block,
                     attn=SDPAttention(D, cfg.num_heads, cfg.max_len, cfg.dropout,
                                       rope=cfg.model == "rope"))
            for _ in range(cfg.num_blocks)
        ])
        self.final_ln = nn.LayerNorm(D)

    def forward(self, x, lengths=None):
        return run_blocks(self.blocks, self.final_ln, x, lengths, [(None, None)] * len(self.blocks))


class SeqRecModel(nn.Module):
    """Next-item model: ``encode(seqs)`` gives [B, T, D] states, ``scores(h)`` item logits."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.num_items < 1:
            raise ValueError(f"num_items must be >= 1, got {cfg.num_items}")
        self.cfg = cfg
        D = cfg.hidden
        self.item_emb = nn.Embedding(cfg.num_items + 1, D, padding_idx=0)
        nn.init.normal_(self.item_emb.weight, std=D**-0.5)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()
        self.emb_drop = nn.Dropout(cfg.dropout)
        use_pos = cfg.model == "sasrec" or (cfg.model == "psa" and cfg.add_positional_embedding)
        self.pos_emb = nn.Embedding(cfg.max_len, D) if use_pos else None
        if cfg.model == "psa":
            self.backbone = PKATransformer(
                cfg.num_blocks, D, cfg.num_heads, cfg.max_len, dropout=cfg.dropout,
                key_kernel=cfg.key_kernel, value_kernel=cfg.value_kernel,
                share_key_kernel=cfg.share_key_kernel, share_value_kernel=cfg.share_value_kernel,
                normalize_kernels=cfg.normalize_kernels, block=cfg.block, backend=cfg.backend)
        else:
            self.backbone = SDPATransformer(cfg)

    def encode(self, seqs: torch.Tensor) -> torch.Tensor:
        """seqs: [B, T] item ids, left-padded with 0; returns [B, T, D]."""
        B, T = seqs.shape
        if T > self.cfg.max_len:
            raise ValueError(f"sequence length {T} exceeds max_len={self.cfg.max_len}")
        lengths = (seqs != 0).sum(dim=1)
        x = self.item_emb(seqs) * math.sqrt(self.cfg.hidden)  # [B, T, D]
        if self.pos_emb is not None:
            # Left padding: the most recent item always gets the last position embedding.
            x = x + self.pos_emb.weight[-T:]
        x = self.emb_drop(x)
        return self.backbone(x, lengths)

    def forward(self, seqs: torch.Tensor) -> torch.Tensor:
        return self.encode(seqs)

    def scores(self, h: torch.Tensor) -> torch.Tensor:
        """h: [N, D] -> [N, num_items + 1] logits (column 0 is padding)."""
        return h @ self.item_emb.weight.t()
