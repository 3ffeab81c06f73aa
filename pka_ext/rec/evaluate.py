"""Full-ranking evaluation: NDCG@k, HR@k, COV@k, computed batched on the model's device."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable

import numpy as np
import torch

from pka_ext.modules import check_sizes, int_at_least


def pad_left(seqs, length: int) -> np.ndarray:
    """Left-pads (with 0) or truncates to the last ``length`` items: [len(seqs), length] int64."""
    out = np.zeros((len(seqs), length), dtype=np.int64)
    for r, s in enumerate(seqs):
        s = np.asarray(s, dtype=np.int64)[-length:]
        if s.size:
            out[r, length - s.size:] = s
    return out


def target_ranks(scores: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each event's target stands: (items above it, other items tied with it), [n] int64 each.

    scores: [n, N + 1] (column 0 = padding, already -inf along with excluded items); targets: [n].
    A NaN score counts as above the target, and a target whose own score is not finite (a model
    that diverged) as below every item: a broken model must score 0, not rank its targets first.
    """
    t = scores.gather(1, targets[:, None])  # [n, 1]
    higher = (~(scores <= t)).sum(1)
    ties = (scores == t).sum(1) - 1
    broken = ~torch.isfinite(t[:, 0])
    higher = torch.where(broken, torch.full_like(higher, scores.shape[1]), higher)
    return higher, torch.where(broken, torch.zeros_like(ties), ties)


def hit_ndcg(higher: torch.Tensor, ties: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-event HR@k and NDCG@k, float64, from :func:`target_ranks`.

    Tied items are ranked in random order, and the metrics are their exact expectation over that
    order: the target's 0-based rank is uniform on ``higher ... higher + ties``. So a constant model
    gets what a random ranking would, rather than every target counted at the top of its tie.
    """
    # Ranks past the last one an event can take change nothing, so a cutoff beyond the catalogue
    # (--report-k 1000000000, say) must not build a discount table of its length.
    k = min(k, int((higher + ties).max()) + 1 if higher.numel() else 1)
    discount = 1.0 / torch.log2(torch.arange(k, dtype=torch.float64, device=higher.device) + 2)
    gain_before = torch.cat([discount.new_zeros(1), discount.cumsum(0)])  # [k + 1]: ranks < m
    lo = higher.clamp(max=k)
    hi = (higher + ties + 1).clamp(max=k)
    n = (ties + 1).double()
    return (hi - lo).double() / n, (gain_before[hi] - gain_before[lo]) / n


def rank_metrics(scores: torch.Tensor, targets: torch.Tensor, k: int):
    """Per-event HR@k and NDCG@k (see :func:`hit_ndcg`), plus the top-k lists."""
    return (*hit_ndcg(*target_ranks(scores, targets), k), scores.topk(k, dim=1).indices)


@torch.no_grad()
def encode_contexts(model, contexts, device, batch_size: int = 512):
    """Yields (row indices, states [n, D]): each history's state at its most recent item.

    Histories are batched in order of length and each batch is padded only to its longest history:
    the models align the most recent item with the last position whatever the width, so this is
    exact, and most histories are far shorter than ``max_len``. Rows come back in that order.
    """
    max_len = model.cfg.max_len
    lengths = np.array([min(len(c), max_len) for c in contexts], dtype=np.int64)
    order = np.argsort(lengths, kind="stable")
    for start in range(0, len(contexts), batch_size):
        idx = order[start:start + batch_size]
        seqs = pad_left([contexts[i] for i in idx], max(1, int(lengths[idx].max())))
        yield idx, model.encode(torch.from_numpy(seqs).to(device))[:, -1]


@torch.no_grad()
def score_contexts(model, contexts, device, batch_size: int = 512, exclude=None, keep=None):
    """Yields (row indices, scores [n, N + 1]) for histories, batched as :func:`encode_contexts`;
    padding and, per row, the items of ``exclude[row]`` (default: the full history) get -inf,
    except ``keep[row]`` if given.
    """
    keep = None if keep is None else np.asarray(keep)
    for idx, h in encode_contexts(model, contexts, device, batch_size):
        s = model.scores(h).float()  # [n, N + 1]
        kept = None if keep is None else torch.as_tensor(keep[idx], device=device)
        kept_scores = None if kept is None else s.gather(1, kept[:, None])
        ex = [contexts[i] for i in idx] if exclude is None else [exclude[i] for i in idx]
        rows = np.concatenate([np.full(len(c), r) for r, c in enumerate(ex)] + [np.zeros(0, int)])
        cols = np.concatenate([np.asarray(c, dtype=np.int64) for c in ex] + [np.zeros(0, int)])
        s[torch.from_numpy(rows).to(device), torch.from_numpy(cols).to(device)] = -math.inf
        s[:, 0] = -math.inf
        if kept is not None:
            s.scatter_(1, kept[:, None], kept_scores)
        yield idx, s


@torch.no_grad()
def evaluate(model, evalset, num_items: int, *, k: int | Iterable[int] = 10,
             batch_size: int = 512, device="cpu") -> dict:
    """Metrics of ``model`` on an :class:`~pka_ext.rec.protocols.EvalSet`.

    Full ranking over all items; items already in the context are excluded, except the target
    itself when it repeats an earlier item (excluding it would make the event unwinnable).
    ``k`` is one cutoff or several; returns ``{"ndcg@k", "hr@k", "cov@k"}`` for each, and
    ``"events"``. COV@k is the share of the catalogue that appears in some top-k list (rankable
    items only: padding and excluded items never count, even when too few items are left to fill
    a list).
    """
    try:
        cutoffs = [k] if isinstance(k, numbers.Integral) else list(k)
    except TypeError:  # neither an integer nor a collection (a float, say): refused below
        cutoffs = [k]
    if not cutoffs or not all(int_at_least(c) for c in cutoffs):
        raise ValueError(f"k must be one or more positive cutoffs, got {k!r}")
    check_sizes(batch_size=batch_size)
    ks = sorted({int(c) for c in cutoffs})
    was_training = model.training
    model.eval()
    targets = np.asarray(evalset.targets, dtype=np.int64)
    higher, ties, tops = [], [], []
    for rows, s in score_contexts(model, evalset.contexts, device, batch_size, keep=targets):
        h, t = target_ranks(s, torch.from_numpy(targets[rows]).to(s.device))
        higher.append(h)
        ties.append(t)
        vals, top = s.topk(min(ks[-1], s.shape[1]), dim=1)
        # Fewer than k rankable items leave -inf columns (padding, excluded items) in the list.
        tops.append(top.masked_fill(~torch.isfinite(vals), 0))
    model.train(was_training)
    if tops:
        per_k = {c: [m.mean().item() for m in hit_ndcg(torch.cat(higher), torch.cat(ties), c)]
                 for c in ks}
        top = torch.cat(tops)
    else:
        per_k = {c: [0.0, 0.0] for c in ks}
        top = torch.zeros(0, ks[-1], dtype=torch.int64)
    out = {f"ndcg@{c}": per_k[c][1] for c in ks}
    out.update({f"hr@{c}": per_k[c][0] for c in ks})
    out.update({f"cov@{c}": int((top[:, :c].unique() != 0).sum()) / num_items for c in ks})
    out["events"] = len(targets)
    return out
