"""Evaluation protocols: how interactions are split into training sequences and scored events.

Two protocols are provided:

:func:`leave_one_out`
    The usual protocol on the S3-Rec / SASRec files: each user's last item is the test target, the
    one before it the validation target, the rest is training.
:func:`temporal`
    A global temporal split with successive evaluation (as in the PSA paper): two timestamp cuts
    over all events divide them into training, validation and test events, and every held-out event
    is scored with the user's true earlier events as context.

Both return a :class:`Split`. Contexts and training sequences are views into the arrays of the
:class:`~pka_ext.rec.data.Interactions` they came from, so they must not be modified in place.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pka_ext.modules import int_at_least
from pka_ext.rec.data import DataError, Interactions

__all__ = ["EvalSet", "Split", "leave_one_out", "temporal"]


@dataclass
class EvalSet:
    """Next-item prediction problems: predict ``targets[k]`` from ``contexts[k]``.

    Attributes
    ----------
    contexts : list of np.ndarray
        int64 remapped item ids of the history before each target, oldest first, never empty.
    targets : np.ndarray
        int64 ``[n]`` remapped ids of the items to predict.
    users : np.ndarray
        int64 ``[n]`` user index (into ``Interactions.sequences``) of each problem.
    """

    contexts: list[np.ndarray]
    targets: np.ndarray
    users: np.ndarray

    def __post_init__(self) -> None:
        self.targets = np.asarray(self.targets, dtype=np.int64)
        self.users = np.asarray(self.users, dtype=np.int64)
        if not len(self.contexts) == len(self.targets) == len(self.users):
            raise ValueError(f"{len(self.contexts)} contexts, {len(self.targets)} targets and "
                             f"{len(self.users)} users must be equally many")

    def __len__(self) -> int:
        return len(self.targets)


@dataclass
class Split:
    """Training sequences and held-out evaluation sets produced by a protocol.

    Attributes
    ----------
    train : list of np.ndarray
        Training sequences, one per user that has at least 2 training items; a model is trained to
        predict each item of a sequence from the items before it.
    val, test : EvalSet
        Validation and test problems.
    num_items : int
        Size of the item id space (ids ``1..num_items``); items absent from training count too.
    protocol : str
        ``"leave_one_out"`` or ``"temporal"``.
    info : dict
        Counts (and for ``temporal`` the cut timestamps) describing the split.
    """

    train: list[np.ndarray]
    val: EvalSet
    test: EvalSet
    num_items: int
    protocol: str
    info: dict = field(default_factory=dict)


def leave_one_out(data: Interactions) -> Split:
    """Leave-one-out split on the order of each user's sequence (timestamps are not used).

    For a user with sequence ``s`` of ``n`` items:

    * ``n >= 3``: training sequence ``s[:-2]``; validation predicts ``s[-2]`` from ``s[:-2]``; test
      predicts ``s[-1]`` from ``s[:-1]``, so the test context includes the validation item.
      With ``n == 3`` the training part has a single item and is not added to ``train`` (there is
      no next-item pair in it), but the user is still evaluated.
    * ``n == 2``: the whole sequence is a training sequence; the user is not evaluated.
    * ``n <= 1``: the user is left out.

    Parameters
    ----------
    data : Interactions
        The interactions.

    Returns
    -------
    Split
        ``info`` has ``users``, ``evaluated_users``, ``train_only_users`` (n == 2),
        ``dropped_users`` (n <= 1), ``train_sequences`` and ``train_events``.
    """
    train, contexts_val, contexts_test, targets_val, targets_test, users = [], [], [], [], [], []
    train_only = dropped = 0
    for u, s in enumerate(data.sequences):
        n = len(s)
        if n >= 3:
            if n >= 4:
                train.append(s[:-2])
            contexts_val.append(s[:-2])
            targets_val.append(s[-2])
            contexts_test.append(s[:-1])
            targets_test.append(s[-1])
            users.append(u)
        elif n == 2:
            train.append(s)
            train_only += 1
        else:
            dropped += 1
    info = {
        "users": data.num_users,
        "evaluated_users": len(users),
        "train_only_users": train_only,
        "dropped_users": dropped,
        "train_sequences": len(train),
        "train_events": int(sum(len(s) for s in train)),
    }
    return Split(train, EvalSet(contexts_val, targets_val, users),
                 EvalSet(contexts_test, targets_test, users), data.num_items, "leave_one_out",
                 info)


def temporal(data: Interactions, val_start: float = 0.95, test_start: float = 0.97,
             max_eval_events: int | None = None) -> Split:
    """Global temporal split with successive evaluation of every held-out event.

    The cut times are quantiles of the timestamps of all events,
    ``t_val = np.quantile(times, val_start, method="lower")`` and likewise ``t_test`` for
    ``test_start``; ``"lower"`` makes each cut an actual event time, so at least a
    ``1 - val_start`` share of the events is held out (more when events tie at the cut). An event at
    time ``t`` is

    * a training event if ``t < t_val``,
    * a validation event if ``t_val <= t < t_test``,
    * a test event if ``t >= t_test``.

    Held-out events whose item never occurs among the training events are dropped, from scoring and
    from every context. Each remaining ("kept") held-out event is one problem whose context is all
    of the user's earlier kept events in sequence order: their training events and their earlier
    held-out events, validation events included for test events. An event whose context is empty
    (the user's first kept event) is not scored but still appears in the user's later contexts.

    Each :class:`EvalSet` is in time order, ties broken by user index and then by position. With
    ``max_eval_events`` only its first ``max_eval_events`` problems in that order are kept, which
    favours the events just after each cut.

    Parameters
    ----------
    data : Interactions
        Interactions with timestamps, each user's non-decreasing.
    val_start, test_start : float
        Quantile levels of the cuts, ``0 < val_start <= test_start < 1``; equal levels give an
        empty validation set, as do distinct levels whose quantiles fall on one shared timestamp
        (training refuses such a split).
    max_eval_events : int, optional
        Cap on the size of each of ``val`` and ``test``.

    Returns
    -------
    Split
        ``train`` holds each user's training events when there are at least 2. ``info`` has
        ``t_val``, ``t_test``, ``train_events``, ``train_sequences``, and for ``val`` and ``test``
        each: ``*_events`` (held-out events in the period), ``*_dropped_unseen_items``,
        ``*_skipped_empty_context``, ``*_capped`` (removed by ``max_eval_events``) and ``*_scored``.

    Raises
    ------
    DataError
        If ``data`` has no timestamps or a user's timestamps decrease.
    ValueError
        If the quantile levels or ``max_eval_events`` are out of range.
    """
    if data.timestamps is None:
        raise DataError("the temporal protocol needs timestamps, and this data has none "
                        "(use leave-one-out, pka-rec's --protocol loo, or a format with times such as "
                        "recbole or csv)")
    if not 0 < val_start <= test_start < 1:
        raise ValueError(f"need 0 < val_start <= test_start < 1, got val_start={val_start}, "
                         f"test_start={test_start}")
    if max_eval_events is not None and not int_at_least(max_eval_events):
        # 0 would leave nothing to evaluate: every metric 0 and early stopping blind.
        raise ValueError(f"max_eval_events must be a positive integer or None, "
                         f"got {max_eval_events!r}")
    for u, t in enumerate(data.timestamps):
        if np.any(np.diff(t) < 0):
            raise DataError(f"user {u} ({data.user_ids[u]!r}): timestamps are not in "
                            "chronological order")
    times = np.concatenate(data.timestamps)
    if times.size == 0:
        raise DataError("the data has no events")
    t_val = float(np.quantile(times, val_start, method="lower"))
    t_test = float(np.quantile(times, test_start, method="lower"))

    seen = np.zeros(data.num_items + 1, dtype=bool)
    for s, t in zip(data.sequences, data.timestamps):
        seen[s[t < t_val]] = True

    train = []
    problems = {"val": [], "test": []}  # (time, user, position, context, target)
    info: dict = {"t_val": t_val, "t_test": t_test, "train_events": 0}
    for name in problems:
        for what in ("events", "dropped_unseen_items", "skipped_empty_context"):
            info[f"{name}_{what}"] = 0
    for u, (s, t) in enumerate(zip(data.sequences, data.timestamps)):
        held_out = t >= t_val
        info["train_events"] += int((~held_out).sum())
        info["val_events"] += int((held_out & (t < t_test)).sum())
        info["test_events"] += int((t >= t_test).sum())
        keep = ~held_out | seen[s]
        info["val_dropped_unseen_items"] += int((~keep & (t < t_test)).sum())
        info["test_dropped_unseen_items"] += int((~keep & (t >= t_test)).sum())
        items, item_times = s[keep], t[keep]
        num_train = int((item_times < t_val).sum())
        if num_train >= 2:
            train.append(items[:num_train])
        for j in range(num_train, len(items)):
            name = "val" if item_times[j] < t_test else "test"
            if j == 0:
                info[f"{name}_skipped_empty_context"] += 1
            else:
                problems[name].append((item_times[j], u, j, items[:j], items[j]))
    info["train_sequences"] = len(train)

    sets = {}
    for name, rows in problems.items():
        rows.sort(key=lambda r: r[:3])
        info[f"{name}_capped"] = 0
        if max_eval_events is not None and len(rows) > max_eval_events:
            info[f"{name}_capped"] = len(rows) - max_eval_events
            rows = rows[:max_eval_events]
        info[f"{name}_scored"] = len(rows)
        sets[name] = EvalSet([r[3] for r in rows], [r[4] for r in rows], [r[1] for r in rows])
    return Split(train, sets["val"], sets["test"], data.num_items, "temporal", info)
