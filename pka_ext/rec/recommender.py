"""Checkpoints and the user-facing :class:`Recommender` (load a trained model, recommend)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable

import numpy as np
import torch

from pka_ext.modules import check_sizes, int_at_least
from pka_ext.rec.config import RunConfig
from pka_ext.rec.data import ItemVocab
from pka_ext.rec.evaluate import encode_contexts, score_contexts
from pka_ext.rec.models import SeqRecModel

CHECKPOINT_FORMAT = "pka-rec-checkpoint/1"


def save_checkpoint(path: str, model, config: RunConfig, id_maps: dict, *, metrics=None,
                    train_state: dict | None = None) -> None:
    """Writes model weights, config, id maps, metrics and (for resuming) the training state.

    Written to a temporary file first and renamed, so an interrupted save never leaves a torn file.
    """
    payload = {
        "format": CHECKPOINT_FORMAT,
        "config": config.to_dict(),
        "model_state": model.state_dict(),
        "id_maps": id_maps,
        "metrics": metrics,
        "train_state": train_state,
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    torch.save(payload, tmp)
    os.replace(tmp, path)


class CheckpointError(ValueError):
    """A file given as a checkpoint is not one this package wrote."""


def load_checkpoint(path: str, device="cpu") -> dict:
    """The payload :func:`save_checkpoint` wrote, tensors on ``device``.

    Raises FileNotFoundError for a missing file, IsADirectoryError for a folder and
    :class:`CheckpointError` for any other file.
    """
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a folder; name the checkpoint file, such as "
                                f"{os.path.join(path, 'checkpoint.pt')}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # torch.load raises anything from pickle, zip and its own checks
        # Its first line kept: the file may be a checkpoint that cannot be loaded here.
        reason = (str(e).strip().splitlines() or [""])[0]
        reason = reason if len(reason) <= 160 else reason[:159] + "…"
        raise CheckpointError(f"{path} could not be read as a {CHECKPOINT_FORMAT} checkpoint "
                              f"(torch.load: {type(e).__name__}: {reason})") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a {CHECKPOINT_FORMAT} checkpoint")
    return ckpt


class Recommender:
    """A trained model with its id maps; recommends original item ids for raw histories."""

    def __init__(self, model: SeqRecModel, config: RunConfig, vocab: ItemVocab, device="cpu"):
        self.model = model.to(device).eval()
        self.config, self.vocab, self.device = config, vocab, torch.device(device)

    @classmethod
    def load(cls, path: str, device="cpu") -> "Recommender":
        """The model, config and id maps of a checkpoint that ``pka-rec train`` or ``train_run``
        wrote, on ``device``, in eval mode; raises as :func:`load_checkpoint` does."""
        return cls.from_checkpoint(load_checkpoint(path, device), device)

    @classmethod
    def from_checkpoint(cls, ckpt: dict, device="cpu") -> "Recommender":
        """From a payload :func:`load_checkpoint` already read."""
        config = RunConfig.from_dict(ckpt["config"])
        model = SeqRecModel(config.model)
        model.load_state_dict(ckpt["model_state"])
        return cls(model, config, ItemVocab.from_dict(ckpt["id_maps"]), device)

    def _encode_histories(self, histories) -> list[np.ndarray]:
        """Remapped ids per history; unknown ids skipped with one warning for the whole call."""
        contexts, unknown = [], []
        for h in histories:
            if isinstance(h, (str, bytes)):
                # Iterating a string would read its characters as item ids.
                raise TypeError(f"a history must be a list of item ids, oldest first, not a string "
                                f"({h!r}); split it first, e.g. {h!r}.split(), and pass "
                                f"user_vectors a list of histories")
            if not isinstance(h, Iterable):
                # An int here is one history passed where a list of histories is due.
                raise TypeError(f"a history must be a list of item ids, oldest first, not "
                                f"{type(h).__name__} ({h!r}); pass user_vectors a list of "
                                f"histories")
            raw = [str(x) for x in h]
            enc = self.vocab.encode(raw, unknown="skip")
            if len(enc) < len(raw):
                unknown.extend(r for r in raw if r not in self.vocab.index)
            contexts.append(enc)
        if unknown:
            distinct = sorted(set(unknown))
            repeats = f" ({len(unknown)} occurrences)" if len(unknown) > len(distinct) else ""
            warnings.warn(f"skipping {len(distinct)} item ids unknown to the model{repeats}: "
                          f"{distinct[:5]}", stacklevel=3)
        return contexts

    def item_vectors(self) -> tuple[list[str], np.ndarray]:
        """Original item ids and their output embeddings ``[N, D]`` (float32).

        The models score with tied embeddings, so the score of an item after a history is the dot
        product of :meth:`user_vectors` and the item's vector: the pair can serve top-k from an
        approximate nearest-neighbour (maximum inner product) index.
        """
        weight = self.model.item_emb.weight[1:]  # row 0 is padding
        return list(self.vocab.ids), weight.detach().float().cpu().numpy()

    def user_vectors(self, histories, *, batch_size: int = 512) -> np.ndarray:
        """The model's state after each history, ``[len(histories), D]`` (float32).

        ``histories``: lists of original item ids, oldest first (unknown ids skipped with a
        warning). A history with no known item gives a zero vector, which scores every item 0.
        """
        check_sizes(batch_size=batch_size)
        contexts = self._encode_histories(histories)
        out = np.zeros((len(contexts), self.model.cfg.hidden), dtype=np.float32)
        for rows, h in encode_contexts(self.model, contexts, self.device, batch_size):
            out[rows] = h.float().cpu().numpy()
        return out

    def recommend(self, history, k: int = 10, *, exclude_seen: bool = True, batch_size: int = 512,
                  with_scores: bool = False):
        """Top-``k`` original item ids for one history or a batch of histories.

        Parameters
        ----------
        history : list of ids, or list of lists of ids
            Original item ids (str or int), oldest first. Ids unknown to the model are skipped,
            with one warning for the whole call that counts them.
        k : int
        exclude_seen : bool
            Leave items of the history out of the recommendations.
        batch_size : int
            Histories scored per forward pass.
        with_scores : bool
            Return ``(item, score)`` pairs, the score being the model's logit.

        Returns
        -------
        list of str (or of (str, float) pairs), or one such list per history (batched input)
            Best first. A history with no item known to the model gets an empty list (the model
            has nothing to condition on), with a warning; one that covers all but a few items of
            the catalogue gets fewer than ``k`` when ``exclude_seen`` leaves fewer.

        Raises
        ------
        ValueError
            If ``k`` is outside ``1..len(vocab)`` or ``batch_size`` is not a positive integer.
        TypeError
            If ``history`` is not a list (an iterator, a scalar) or a history is a string.
        """
        if not int_at_least(k) or k > len(self.vocab):
            raise ValueError(f"k must be in [1, {len(self.vocab)}], got {k!r}")
        check_sizes(batch_size=batch_size)
        if not hasattr(history, "__len__") or not hasattr(history, "__getitem__"):
            # One history and a batch are told apart by their first element, which an iterator
            # or a scalar does not have.
            raise TypeError(f"history must be a list of item ids, or a list of such lists, not "
                            f"{type(history).__name__} ({history!r})")
        single = len(history) == 0 or not isinstance(history[0], (list, tuple, np.ndarray))
        histories = [history] if single else list(history)
        contexts = self._encode_histories(histories)
        out = [[] for _ in contexts]
        scored = [i for i, c in enumerate(contexts) if len(c)]
        if len(scored) < len(contexts):
            warnings.warn(f"{len(contexts) - len(scored)} histories have no item known to the "
                          f"model and get no recommendations", stacklevel=2)
        known = [contexts[i] for i in scored]
        exclude = known if exclude_seen else [np.zeros(0, np.int64)] * len(known)
        for rows, s in score_contexts(self.model, known, self.device, batch_size, exclude=exclude):
            top = s.topk(k, dim=1)
            for r, ids, vals in zip(rows, top.indices.cpu().numpy(), top.values.cpu().numpy()):
                ids, vals = ids[np.isfinite(vals)], vals[np.isfinite(vals)]
                items = self.vocab.decode(ids)
                out[scored[r]] = list(zip(items, vals.tolist())) if with_scores else items
        return out[0] if single else out
