"""Full-ranking evaluation: NDCG@k, HR@k, COV@k, computed batched on the model's device."""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch


def pad_left(seqs, length: int) -> np.ndarray:
    """Left-pads (with 0) or truncates to the last ``length`` items: [len(seqs), length] int64."""
    out = np.zeros((len(seqs), length), dtype=np.int64)
    for r, s in enumerate(seqs):
        s = np.asarray(s, dtype=np.int64)[-length:]
        if s.size:
            out[r, length - s.size:] = s
    return out


def target_ranks(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """0-based rank of each event's target: [n] float64.

    scores: [n, N + 1] (column 0 = padding, already -inf along with excluded items); targets: [n].
    The rank counts items scoring strictly higher plus half of the other items tied with the
    target, so a constant model gets the expected rank of a random order, not rank 0.
    """
    t = scores.gather(1, targets[:, None])  # [n, 1]
    higher = (scores > t).sum(1).double()
    ties = (scores == t).sum(1).double() - 1
    return higher + ties / 2


def hit_ndcg(rank: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-event HR@k and NDCG@k from 0-based target ranks."""
    hit = (rank < k).double()
    return hit, hit / torch.log2(rank + 2)


def rank_metrics(scores: torch.Tensor, targets: torch.Tensor, k: int):
    """Per-event HR@k and NDCG@k (see :func:`target_ranks`), plus the top-k lists."""
    return (*hit_ndcg(target_ranks(scores, targets), k), scores.topk(k, dim=1).indices)


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
    ``"events"``. COV@k is the share of the catalogue that appears in some top-k list.
    """
    ks = sorted({k} if isinstance(k, int) else set(k))
    if not ks or ks[0] < 1:
        raise ValueError(f"k must be one or more positive cutoffs, got {k!r}")
    was_training = model.training
    model.eval()
    targets = np.asarray(evalset.targets, dtype=np.int64)
    ranks, tops = [], []
    for rows, s in score_contexts(model, evalset.contexts, device, batch_size, keep=targets):
        ranks.append(target_ranks(s, torch.from_numpy(targets[rows]).to(s.device)))
        tops.append(s.topk(min(ks[-1], s.shape[1]), dim=1).indices)
    model.train(was_training)
    rank = torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.float64)
    top = torch.cat(tops) if tops else torch.zeros(0, ks[-1], dtype=torch.int64)
    per_k = {c: hit_ndcg(rank, c) for c in ks}
    out = {f"ndcg@{c}": per_k[c][1].mean().item() if ranks else 0.0 for c in ks}
    out.update({f"hr@{c}": per_k[c][0].mean().item() if ranks else 0.0 for c in ks})
    out.update({f"cov@{c}": top[:, :c].unique().numel() / num_items for c in ks})
    out["events"] = len(targets)
    return out
