"""Evaluation protocols of pka_ext.rec: leave-one-out and the global temporal split."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pka_ext.rec.data import DataError, Interactions
from pka_ext.rec.protocols import EvalSet, leave_one_out, temporal
from pka_ext.rec.synthetic import make_synthetic


def make_data(sequences, timestamps=None, num_items=None) -> Interactions:
    num_items = num_items or max(max(s, default=0) for s in sequences)
    return Interactions([np.array(s, dtype=np.int64) for s in sequences],
                        None if timestamps is None else [np.array(t, float) for t in timestamps],
                        [f"i{i}" for i in range(1, num_items + 1)],
                        [f"u{u}" for u in range(len(sequences))])


def lists(arrays) -> list[list[int]]:
    return [a.tolist() for a in arrays]


# --- leave-one-out ------------------------------------------------------------------------------

def test_leave_one_out_known_answer():
    data = make_data([[1, 2, 3, 4, 5], [3, 1, 2], [4, 5], [2], [5, 4, 3, 2]])
    split = leave_one_out(data)
    assert split.protocol == "leave_one_out" and split.num_items == 5
    assert lists(split.train) == [[1, 2, 3], [4, 5], [5, 4]]
    assert lists(split.val.contexts) == [[1, 2, 3], [3], [5, 4]]
    assert split.val.targets.tolist() == [4, 1, 3]
    assert lists(split.test.contexts) == [[1, 2, 3, 4], [3, 1], [5, 4, 3]]
    assert split.test.targets.tolist() == [5, 2, 2]
    assert split.val.users.tolist() == split.test.users.tolist() == [0, 1, 4]
    assert split.val.targets.dtype == split.val.users.dtype == np.int64
    assert len(split.val) == len(split.test) == 3
    assert split.info == {"users": 5, "evaluated_users": 3, "train_only_users": 1,
                          "dropped_users": 1, "train_sequences": 3, "train_events": 7}


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.integers(1, 9), max_size=8), min_size=1, max_size=10))
def test_leave_one_out_properties(sequences):
    split = leave_one_out(make_data(sequences, num_items=9))
    long = [s for s in sequences if len(s) >= 3]
    assert len(split.test) == len(split.val) == len(long)
    for s, vc, vt, tc, tt in zip(long, split.val.contexts, split.val.targets,
                                 split.test.contexts, split.test.targets):
        assert vc.tolist() + [vt] == s[:-1]
        assert tc.tolist() + [tt] == s
    # Training sequences are the users' histories without their validation and test items.
    assert sorted(tuple(np.asarray(t).tolist()) for t in split.train) == sorted(
        [tuple(s[:-2]) for s in long if len(s) >= 4] + [tuple(s) for s in sequences if len(s) == 2])


# --- temporal -----------------------------------------------------------------------------------

def test_temporal_known_answer_with_unseen_items_and_empty_contexts():
    # Times over all events: 1 2 5 9 10 11 12 13 14 15. With method="lower" the 0.5 quantile is
    # the 5th smallest (index floor(0.5 * 9) = 4): t_val = 10; the 0.8 quantile is index 7:
    # t_test = 13. Training items are {1, 2, 3}, so held-out events of items 4, 5, 6 are dropped.
    data = make_data(
        [[1, 2, 3, 4], [2, 3, 5], [6, 1, 2]],
        [[1, 5, 9, 13], [2, 10, 14], [11, 12, 15]],
    )
    split = temporal(data, val_start=0.5, test_start=0.8)
    assert split.protocol == "temporal" and split.num_items == 6
    assert lists(split.train) == [[1, 2, 3]]  # user 1 has a single training event
    # user 1: item 3 at t=10 from [2]. user 2: item 6 (t=11) is unseen; item 1 (t=12) has an
    # empty context, so it is not scored but becomes the context of item 2 at t=15 (a test event).
    assert lists(split.val.contexts) == [[2]]
    assert split.val.targets.tolist() == [3] and split.val.users.tolist() == [1]
    assert lists(split.test.contexts) == [[1]]
    assert split.test.targets.tolist() == [2] and split.test.users.tolist() == [2]
    assert split.info == {
        "t_val": 10.0, "t_test": 13.0, "train_events": 4, "train_sequences": 1,
        "val_events": 3, "val_dropped_unseen_items": 1, "val_skipped_empty_context": 1,
        "val_capped": 0, "val_scored": 1,
        "test_events": 3, "test_dropped_unseen_items": 2, "test_skipped_empty_context": 0,
        "test_capped": 0, "test_scored": 1,
    }


def test_temporal_successive_contexts_time_order_and_cap():
    # Times: 0 0 1 2 3 7 8 8 9 -> t_val = index 4 = 3, t_test = index 6 = 8.
    data = make_data([[1, 2, 3, 1, 2], [3, 1, 2, 3]], [[0, 1, 2, 8, 9], [0, 3, 7, 8]])
    split = temporal(data, val_start=0.5, test_start=0.75)
    assert (split.info["t_val"], split.info["t_test"]) == (3.0, 8.0)
    assert lists(split.train) == [[1, 2, 3]]
    assert lists(split.val.contexts) == [[3], [3, 1]]
    assert split.val.targets.tolist() == [1, 2] and split.val.users.tolist() == [1, 1]
    # Test events in time order; the tie at t=8 goes to the lower user index. Contexts contain
    # the earlier test event (user 0) and the validation events (user 1).
    assert lists(split.test.contexts) == [[1, 2, 3], [3, 1, 2], [1, 2, 3, 1]]
    assert split.test.targets.tolist() == [1, 3, 2]
    assert split.test.users.tolist() == [0, 1, 0]

    capped = temporal(data, val_start=0.5, test_start=0.75, max_eval_events=2)
    assert lists(capped.test.contexts) == [[1, 2, 3], [3, 1, 2]]
    assert capped.test.targets.tolist() == [1, 3]
    assert lists(capped.val.contexts) == [[3], [3, 1]]
    assert (capped.info["test_capped"], capped.info["test_scored"]) == (1, 2)
    assert capped.info["val_capped"] == 0


def test_temporal_equal_cuts_give_empty_validation():
    data = make_data([[1, 2, 1, 2]], [[0, 1, 2, 3]])
    split = temporal(data, val_start=0.75, test_start=0.75)  # t_val = t_test = 2
    assert len(split.val) == 0 and split.val.targets.dtype == np.int64
    assert lists(split.train) == [[1, 2]]
    assert lists(split.test.contexts) == [[1, 2], [1, 2, 1]]
    assert split.test.targets.tolist() == [1, 2]


def test_eval_set_checks_lengths():
    assert len(EvalSet([np.array([1])], [2], [0])) == 1
    with pytest.raises(ValueError, match="1 contexts, 2 targets and 1 users"):
        EvalSet([np.array([1])], [2, 3], [0])


def test_temporal_rejects_bad_input():
    with pytest.raises(DataError, match="timestamps"):
        temporal(make_data([[1, 2, 3]]))
    data = make_data([[1, 2, 3]], [[0, 1, 2]])
    for val_start, test_start in [(0, 0.5), (0.6, 0.5), (0.5, 1.0), (-0.1, 0.5)]:
        with pytest.raises(ValueError, match="val_start"):
            temporal(data, val_start, test_start)
    for bad in (-1, 0, True, 2.5):
        with pytest.raises(ValueError, match=rf"max_eval_events must be a positive integer or None, "
                                             rf"got {bad}"):
            temporal(data, max_eval_events=bad)
    with pytest.raises(DataError, match=r"user 0 \('u0'\).*chronological"):
        temporal(make_data([[1, 2, 3]], [[0, 2, 1]]))


@st.composite
def timed_data(draw):
    num_users = draw(st.integers(1, 6))
    sequences, times = [], []
    for _ in range(num_users):
        n = draw(st.integers(0, 8))
        sequences.append(draw(st.lists(st.integers(1, 6), min_size=n, max_size=n)))
        times.append(sorted(draw(st.lists(st.integers(0, 20), min_size=n, max_size=n))))
    if not any(sequences):
        sequences[0], times[0] = [1], [0]
    return make_data(sequences, times, num_items=6)


def check_temporal_split(data, val_start, test_start):
    """The temporal split's properties, each rebuilt independently of the implementation;
    returns the split."""
    split = temporal(data, val_start, test_start)
    t_val, t_test = split.info["t_val"], split.info["t_test"]
    times = np.concatenate(data.timestamps)
    assert t_val in times and t_test in times
    assert np.mean(times < t_val) <= val_start
    # Rebuild each user's kept events independently of the implementation.
    seen = {x for s, t in zip(data.sequences, data.timestamps) for x in s[t < t_val].tolist()}
    kept = [[(x, tx) for x, tx in zip(s.tolist(), t.tolist()) if tx < t_val or x in seen]
            for s, t in zip(data.sequences, data.timestamps)]
    assert lists(split.train) == [[x for x, tx in k if tx < t_val] for k in kept
                                  if sum(tx < t_val for _, tx in k) >= 2]
    for name, evals, lo, hi in [("val", split.val, t_val, t_test),
                                ("test", split.test, t_test, np.inf)]:
        order = []
        for ctx, target, u in zip(evals.contexts, evals.targets, evals.users):
            k = len(ctx)
            assert k >= 1
            assert [x for x, _ in kept[u][:k + 1]] == ctx.tolist() + [target]
            assert lo <= kept[u][k][1] < hi
            order.append((kept[u][k][1], u, k))
        assert order == sorted(order)
        expected = sum(1 for k in kept for j, (_, tx) in enumerate(k) if j >= 1 and lo <= tx < hi)
        assert len(evals) == expected == split.info[f"{name}_scored"]
        assert split.info[f"{name}_events"] == (split.info[f"{name}_dropped_unseen_items"]
                                                + split.info[f"{name}_skipped_empty_context"]
                                                + split.info[f"{name}_scored"])
    assert (split.info["train_events"] + split.info["val_events"] + split.info["test_events"]
            == data.num_events)
    return split


@settings(max_examples=200, deadline=None)
@given(timed_data(), st.floats(0.05, 0.9), st.floats(0, 0.09))
def test_temporal_properties(data, val_start, gap):
    check_temporal_split(data, val_start, val_start + gap)


def test_temporal_properties_on_random_logs():
    """The properties on logs of a realistic mix, where validation is rarely empty: hypothesis'
    small examples above leave the validation period empty in most draws (no event between the
    cuts, or none of a training item), so its order and contexts were seldom checked."""
    rng = np.random.default_rng(0)
    val_users = test_users = 0
    for _ in range(150):
        num_users = int(rng.integers(2, 9))
        lengths = rng.integers(0, 13, num_users)
        lengths[0] = max(lengths[0], 1)
        sequences = [rng.integers(1, 6, n).tolist() for n in lengths]
        times = [np.sort(rng.integers(0, 30, n)).tolist() for n in lengths]
        val_start = float(rng.uniform(0.2, 0.7))
        split = check_temporal_split(make_data(sequences, times, num_items=5), val_start,
                                     val_start + float(rng.uniform(0, 0.29)))
        val_users += len(set(split.val.users.tolist())) >= 2
        test_users += len(set(split.test.users.tolist())) >= 2
    # Most draws score events of several users in both periods: their time order is exercised.
    assert val_users >= 75 and test_users >= 75, (val_users, test_users)


def test_temporal_on_synthetic_data():
    data = make_synthetic(num_users=500, num_items=100, seed=2)
    split = temporal(data)
    assert split.info["val_scored"] > 100 and split.info["test_scored"] > 100
    assert split.info["t_val"] <= split.info["t_test"]
    assert all(len(c) >= 1 for c in split.test.contexts)
    assert split.info["val_dropped_unseen_items"] == split.info["test_dropped_unseen_items"] == 0
