"""Metrics, loss, training, checkpoints, recommend, DDP and the CLI end to end."""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pka_ext.rec.cli import main as cli_main, rank_device
from pka_ext.rec.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from pka_ext.rec.data import DataError, load
from pka_ext.rec.evaluate import evaluate, pad_left, rank_metrics, score_contexts
from pka_ext.rec.models import SeqRecModel
from pka_ext.rec.protocols import EvalSet
from pka_ext.rec.recommender import Recommender
from pka_ext.rec.train import fit, next_item_loss, train_steps

TESTS = os.path.dirname(os.path.abspath(__file__))
INF = math.inf


def test_rank_metrics_hand_computed():
    scores = torch.tensor([[-INF, 3.0, 1.0, 2.0, 0.5],    # target 2: two items higher -> rank 2
                           [-INF, 1.0, 4.0, 2.0, 0.0]])   # target 2: rank 0
    hit, ndcg, topk = rank_metrics(scores, torch.tensor([2, 2]), k=3)
    assert hit.tolist() == [1.0, 1.0]
    torch.testing.assert_close(ndcg, torch.tensor([1 / math.log2(4), 1.0], dtype=torch.float64))
    hit2, ndcg2, _ = rank_metrics(scores, torch.tensor([2, 2]), k=2)
    assert hit2.tolist() == [0.0, 1.0] and ndcg2[0] == 0
    assert topk[0].tolist() == [1, 3, 2]


def test_rank_metrics_ties_take_the_expectation_over_random_order():
    scores = torch.zeros(1, 5)
    scores[0, 0] = -INF
    # The target ties with 3 others: rank 0, 1, 2 or 3, each with probability 1/4.
    hit, ndcg, _ = rank_metrics(scores, torch.tensor([3]), k=2)
    assert hit.item() == pytest.approx(2 / 4)
    assert ndcg.item() == pytest.approx((1 + 1 / math.log2(3)) / 4)
    scores[0, 1] = 1.0  # item 1 moves above the tie: rank 1, 2 or 3
    hit, ndcg, _ = rank_metrics(scores, torch.tensor([3]), k=2)
    assert hit.item() == pytest.approx(1 / 3)
    assert ndcg.item() == pytest.approx(1 / math.log2(3) / 3)


def test_rank_metrics_broken_scores_never_hit():
    scores = torch.tensor([[-INF, 1.0, 2.0, 3.0],
                           [-INF, 1.0, 2.0, 3.0],
                           [-INF, INF, 2.0, 3.0]])
    scores[0, 3] = math.nan  # the target's own score: a diverged model
    scores[1, 2] = math.nan  # another item's: counts as above the target
    hit, ndcg, _ = rank_metrics(scores, torch.tensor([3, 1, 1]), k=2)
    assert hit.tolist() == [0.0, 0.0, 0.0] and ndcg.tolist() == [0.0, 0.0, 0.0]
    hit, ndcg, _ = rank_metrics(scores, torch.tensor([3, 1, 1]), k=3)
    assert hit.tolist() == [0.0, 1.0, 0.0]
    assert ndcg[1].item() == pytest.approx(1 / math.log2(4))


class FixedScorer(torch.nn.Module):
    """Scores every history with the same vector: isolates the evaluation logic."""

    def __init__(self, item_scores):
        super().__init__()
        self.cfg = ModelConfig(num_items=len(item_scores) - 1, max_len=4)
        self.s = torch.tensor(item_scores, dtype=torch.float32)

    def encode(self, seqs):
        return torch.zeros(seqs.shape[0], seqs.shape[1], 1)

    def scores(self, h):
        return self.s.expand(h.shape[0], -1).clone()


def test_evaluate_excludes_context_but_keeps_repeated_target():
    model = FixedScorer([9.0, 5.0, 4.0, 3.0, 2.0, 1.0])  # item 0 is padding; item 1 best
    es = EvalSet(contexts=[np.array([1, 2]), np.array([3]), np.array([4, 1])],
                 targets=np.array([3, 2, 4]), users=np.arange(3))
    m = evaluate(model, es, num_items=5, k=1)
    # row 0: 1, 2 excluded -> 3 is top; row 1: 1 scores higher than 2 -> miss;
    # row 2: 1 excluded, 4 repeats the context but stays rankable: 2, 3 above it -> miss
    assert m["hr@1"] == pytest.approx(1 / 3)
    assert m["ndcg@1"] == pytest.approx(1 / 3)
    assert m["cov@1"] == pytest.approx(3 / 5)  # top-1 lists: {3}, {1}, {2}
    assert m["events"] == 3
    several = evaluate(model, es, num_items=5, k=[3, 1, 2])
    assert list(several) == ["ndcg@1", "ndcg@2", "ndcg@3", "hr@1", "hr@2", "hr@3",
                             "cov@1", "cov@2", "cov@3", "events"]
    for c in (1, 2, 3):
        one = evaluate(model, es, num_items=5, k=c)
        assert {key: several[key] for key in one} == one
    # ranks 0, 1 and 2: row 1's target 2 is second, row 2's target 4 third
    assert several["hr@2"] == pytest.approx(2 / 3) and several["hr@3"] == 1.0
    assert several["ndcg@3"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(4)) / 3)
    with pytest.raises(ValueError, match="k must be one or more positive cutoffs"):
        evaluate(model, es, num_items=5, k=[0, 10])


def test_coverage_counts_only_rankable_items():
    """A list longer than the items left to rank is not padded out with padding or the context."""
    model = FixedScorer([9.0, 5.0, 4.0, 3.0])
    es = EvalSet(contexts=[np.array([1, 2])], targets=np.array([3]), users=np.arange(1))
    m = evaluate(model, es, num_items=3, k=[1, 5])
    assert m["cov@1"] == m["cov@5"] == pytest.approx(1 / 3)
    assert m["hr@1"] == 1.0


@pytest.mark.parametrize("name", ["psa", "sasrec", "nope", "rope"])
def test_score_contexts_trimmed_batches_equal_full_width(name):
    """Length-ordered batches padded to their longest history score like max_len-wide padding."""
    torch.manual_seed(0)
    model = SeqRecModel(ModelConfig(model=name, num_items=40, hidden=16, num_blocks=2, num_heads=2,
                                    max_len=12, dropout=0.3)).eval()
    rng = np.random.default_rng(0)
    contexts = [rng.integers(1, 41, n) for n in (3, 0, 12, 1, 20, 7, 3, 5, 12, 2)]
    with torch.no_grad():
        full = model.scores(model.encode(torch.from_numpy(pad_left(contexts, 12)))[:, -1])
    seen = []
    for rows, s in score_contexts(model, contexts, "cpu", batch_size=3, exclude=[[]] * len(contexts)):
        assert s.shape[0] == len(rows) <= 3
        ref = full[torch.as_tensor(rows)].clone()
        ref[:, 0] = -math.inf
        torch.testing.assert_close(s, ref, rtol=1e-5, atol=1e-5)
        seen.extend(rows.tolist())
    assert sorted(seen) == list(range(len(contexts)))


@pytest.mark.parametrize("name", ["psa", "sasrec", "nope", "rope"])
def test_models_export_dynamic_in_batch_and_length(name):
    """A serving graph from torch.export takes any batch of histories up to max_len."""
    torch.manual_seed(0)
    model = SeqRecModel(ModelConfig(model=name, num_items=30, hidden=16, num_blocks=2, num_heads=2,
                                    max_len=12, dropout=0.2)).eval()
    seqs = torch.tensor([[0, 0, 3, 4, 5, 6, 7, 8], [0] * 6 + [1, 2], [0] * 8])
    dims = {0: torch.export.Dim("B"), 1: torch.export.Dim("T", min=1, max=12)}
    exported = torch.export.export(model, (seqs,), dynamic_shapes=(dims,)).module()
    for b, t in ((5, 12), (2, 1), (4, 7)):
        s = torch.randint(0, 31, (b, t))
        torch.testing.assert_close(exported(s), model(s), rtol=0, atol=0)


def test_pad_left_truncates_to_most_recent():
    out = pad_left([np.array([1, 2, 3, 4, 5]), np.array([7]), np.array([], dtype=np.int64)], 3)
    assert out.tolist() == [[3, 4, 5], [0, 0, 7], [0, 0, 0]]


def _tiny_model(model="psa", num_items=30, max_len=8):
    torch.manual_seed(0)
    return SeqRecModel(ModelConfig(model=model, num_items=num_items, hidden=16, num_blocks=2,
                                   num_heads=2, max_len=max_len, dropout=0.0))


@pytest.mark.parametrize("model", ["psa", "sasrec", "nope", "rope"])
def test_loss_uses_only_real_positions(model):
    m = _tiny_model(model)
    x = torch.tensor([[0, 0, 3, 4, 5, 6, 7, 8], [0, 0, 0, 0, 0, 0, 1, 2]])
    y = torch.tensor([[0, 0, 4, 5, 6, 7, 8, 9], [0, 0, 0, 0, 0, 0, 2, 3]])
    loss = next_item_loss(m, x, y, TrainConfig(), 30)
    logits = m.scores(m.encode(x))  # [B, T, N + 1], all positions
    logits[..., 0] = -INF
    real = y != 0
    expected = F.cross_entropy(logits[real], y[real], reduction="sum")
    torch.testing.assert_close(loss, expected)
    # Sampled softmax: the target against the drawn negatives, a negative equal to the target
    # left out (30 draws from 30 items: some collide with targets).
    sampled = next_item_loss(m, x, y, TrainConfig(loss="sampled", num_negatives=30), 30,
                             torch.Generator().manual_seed(0))
    neg = torch.randint(1, 31, (30,), generator=torch.Generator().manual_seed(0))
    assert any(int(t) in neg.tolist() for t in y[real])
    expected = 0.0
    for row, target in zip(logits[real], y[real]):
        others = row[neg][neg != target]
        expected = expected - row[target] + torch.logsumexp(torch.cat([row[target].view(1), others]), 0)
    torch.testing.assert_close(sampled, expected)


def test_sampled_negatives_are_fresh_each_epoch_and_reproducible():
    x = np.array([[0, 0, 3, 4, 5, 6, 7, 8], [0, 0, 0, 0, 0, 0, 1, 2]])
    y = np.array([[0, 0, 4, 5, 6, 7, 8, 9], [0, 0, 0, 0, 0, 0, 2, 3]])
    cfg = TrainConfig(loss="sampled", num_negatives=4)

    def loss_of_one_step(epoch):
        m = _tiny_model()
        opt = torch.optim.SGD(m.parameters(), lr=0.0)
        return train_steps(m, opt, x, y, [np.arange(2)], cfg, 30, "cpu", epoch=epoch)[0]

    assert loss_of_one_step(1) == loss_of_one_step(1)
    assert loss_of_one_step(1) != loss_of_one_step(2)


@pytest.mark.parametrize("model", ["psa", "sasrec", "nope", "rope"])
def test_padding_does_not_change_scores(model):
    """A history's states are the same whatever padding precedes it (none, one, three ids, in a
    batch of other lengths), padded positions are 0, and another history gives other states."""
    m = _tiny_model(model).eval()
    seq = [5, 6, 7, 8, 9]
    with torch.no_grad():
        alone = m.encode(torch.tensor([seq]))  # T = 5: no padding at all
        for pad in (1, 3):
            padded = m.encode(torch.tensor([[0] * pad + seq]))
            torch.testing.assert_close(padded[:, pad:], alone, msg=lambda s: f"{pad} pads: {s}")
            assert torch.all(padded[:, :pad] == 0)
        batch = m.encode(torch.tensor([[0, 0, 0] + seq, [0] * 7 + [9], [1, 2, 3, 4, 5, 6, 7, 8]]))
        torch.testing.assert_close(batch[0, 3:], alone[0])
        torch.testing.assert_close(batch[1:2, 7:], m.encode(torch.tensor([[9]])))
        torch.testing.assert_close(batch[2:3], m.encode(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])))
    assert not torch.allclose(alone[:, -1], batch[1, -1:])


def _train_cli(tmp_path, model="psa", extra=()):
    out = str(tmp_path / model)
    cli_main(["train", "--format", "synthetic", "--model", model, "--epochs", "2", "--max-len",
              "20", "--hidden", "32", "--out", out, "--no-progress", *extra])
    return out


def test_cli_train_evaluate_recommend_plot(tmp_path, capsys):
    out = _train_cli(tmp_path)
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)
    assert set(metrics) == {"model", "dataset", "protocol", "val", "test", "best_epoch",
                            "epochs_run", "train_seconds", "history", "config"}
    # The learning curve: one row per epoch, whose best validation NDCG@10 is the best epoch's.
    history = metrics["history"]
    assert [row["epoch"] for row in history] == list(range(1, metrics["epochs_run"] + 1))
    best = max(history, key=lambda row: row["val_ndcg@10"])
    assert best["epoch"] == metrics["best_epoch"] and all(row["loss"] > 0 for row in history)
    assert sum(row["seconds"] for row in history) == pytest.approx(metrics["train_seconds"])
    assert set(metrics["test"]) == {f"{m}@{k}" for m in ("ndcg", "hr", "cov") for k in (5, 10, 20)}
    assert metrics["model"] == "psa" and metrics["protocol"] == "loo"
    assert RunConfig.from_dict(metrics["config"]).to_dict() == metrics["config"]
    # the synthetic data is learnable: far above a random ranking's HR@10 of 10/500
    assert metrics["test"]["hr@10"] > 0.1
    ckpt = os.path.join(out, "checkpoint.pt")
    capsys.readouterr()
    cli_main(["evaluate", "--checkpoint", ckpt])
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["test"].keys() == metrics["test"].keys()
    for key in metrics["test"]:
        assert evaluated["test"][key] == pytest.approx(metrics["test"][key], abs=1e-12)
    cli_main(["recommend", "--checkpoint", ckpt, "--history", "12 7 99", "-k", "5"])
    printed = capsys.readouterr().out.split()
    rec = Recommender.load(ckpt)
    assert printed == rec.recommend(["12", "7", "99"], 5)
    assert not {"12", "7", "99"} & set(printed) and len(printed) == 5
    png = str(tmp_path / "k.png")
    cli_main(["plot-kernels", "--checkpoint", ckpt, "--out", png])
    assert os.path.getsize(png) > 10_000


def test_cli_demo_trains_both_models_and_prints_their_table(tmp_path, capsys):
    cli_main(["demo", "--epochs", "1", "--out", str(tmp_path)])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| model | val NDCG@10 | test NDCG@10 |")
    for model, row in zip(("psa", "sasrec"), rows[1:]):
        with open(tmp_path / model / "metrics.json") as f:
            metrics = json.load(f)
        assert row.startswith(f"| {model} | {metrics['val']['ndcg@10']:.4f} | "
                              f"{metrics['test']['ndcg@10']:.4f} | {metrics['test']['hr@10']:.4f} |")
        assert metrics["test"]["hr@10"] > 0.1  # far above random (10 of 500 items) after one epoch
    assert len(rows) == 3


def test_recommend_scores_empty_and_unknown_histories(tmp_path):
    rec = Recommender.load(os.path.join(_train_cli(tmp_path, "psa"), "checkpoint.pt"))
    top = rec.recommend(["12", "7", "99"], 6, with_scores=True)
    assert [item for item, _ in top] == rec.recommend(["12", "7", "99"], 6)
    scores = [s for _, s in top]
    assert scores == sorted(scores, reverse=True) and all(math.isfinite(s) for s in scores)
    with pytest.warns(UserWarning) as caught:
        out = rec.recommend([["12", "nope-1"], [], ["nope-2", "nope-3"], ["7"]], 3)
    messages = sorted(str(w.message) for w in caught)
    assert messages == ["2 histories have no item known to the model and get no recommendations",
                        "skipping 3 item ids unknown to the model: ['nope-1', 'nope-2', 'nope-3']"]
    assert out[1] == out[2] == [] and out[0] == rec.recommend(["12"], 3) and len(out[3]) == 3
    with pytest.warns(UserWarning, match=r"skipping 1 item ids unknown to the model \(2 "
                                         r"occurrences\): \['nope-1'\]"):
        rec.recommend(["nope-1", "12", "nope-1"], 3)
    with pytest.raises(SystemExit, match="no item of --history is known to the model"), \
            pytest.warns(UserWarning):
        cli_main(["recommend", "--checkpoint", os.path.join(tmp_path, "psa", "checkpoint.pt"),
                  "--history", "nope-1 nope-2"])
    everything = rec.vocab.decode(range(1, len(rec.vocab) + 1))
    assert sorted(rec.recommend(everything[2:], 5)) == sorted(everything[:2])  # fewer than k left


def test_cli_report_k_sets_the_cutoffs_of_metrics_json(tmp_path, capsys):
    out = _train_cli(tmp_path, "sasrec", ["--report-k", "50,1"])
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)
    assert list(metrics["test"]) == ["ndcg@1", "ndcg@10", "ndcg@50", "hr@1", "hr@10", "hr@50",
                                     "cov@1", "cov@10", "cov@50"]  # 10: early stopping's cutoff
    assert metrics["config"]["train"]["report_ks"] == [50, 1]
    assert metrics["test"]["hr@1"] <= metrics["test"]["hr@10"] <= metrics["test"]["hr@50"]
    capsys.readouterr()
    cli_main(["evaluate", "--checkpoint", os.path.join(out, "checkpoint.pt"), "--report-k", "50,3"])
    evaluated = json.loads(capsys.readouterr().out)["test"]
    assert list(evaluated) == ["ndcg@3", "ndcg@10", "ndcg@50", "hr@3", "hr@10", "hr@50",
                               "cov@3", "cov@10", "cov@50"]
    assert evaluated["ndcg@50"] == pytest.approx(metrics["test"]["ndcg@50"], abs=1e-12)
    for bad in ("0,10", "5,x", ""):
        with pytest.raises(SystemExit):
            cli_main(["train", "--report-k", bad, "--out", str(tmp_path / "bad")])
        assert "expected positive integers such as 5,10,20" in capsys.readouterr().err


@pytest.mark.parametrize("model", ["psa", "rope"])
def test_user_and_item_vectors_reproduce_the_scores(tmp_path, model):
    rec = Recommender.load(os.path.join(_train_cli(tmp_path, model), "checkpoint.pt"))
    histories = [["12", "7", "99"], ["3"], [], ["no-such-item"]]
    with pytest.warns(UserWarning, match="skipping 1 item ids unknown"):
        users = rec.user_vectors(histories)
    ids, items = rec.item_vectors()
    assert ids == rec.vocab.ids and users.shape == (4, 32) and items.shape == (len(ids), 32)
    assert not users[2:].any()  # nothing known to condition on
    scores = users @ items.T  # [4, N]
    for history, row in zip(histories[:2], scores):
        top = rec.recommend(history, 8, exclude_seen=False, with_scores=True)
        assert [s for _, s in top] == pytest.approx([row[ids.index(i)] for i, _ in top], rel=1e-5)
        assert {ids[i] for i in np.argsort(-row)[:8]} == {i for i, _ in top}


def test_checkpoint_round_trip_and_batched_recommend(tmp_path):
    out = _train_cli(tmp_path, "sasrec")
    rec = Recommender.load(os.path.join(out, "checkpoint.pt"))
    histories = [["1", "2", "3"], ["40", "41"], ["7"]]
    batched = rec.recommend(histories, 10)
    assert batched == [rec.recommend(h, 10) for h in histories]
    seqs = torch.tensor([[0, 0, 1, 2, 3]])
    rec2 = Recommender.load(os.path.join(out, "checkpoint.pt"))
    assert torch.equal(rec.model.scores(rec.model.encode(seqs)), rec2.model.scores(rec2.model.encode(seqs)))
    with pytest.warns(UserWarning, match="unknown"):
        rec.recommend(["1", "no-such-item"], 3)
    # A string is not a history: iterated, its characters would be read as item ids ("12" -> "1",
    # "2"), which are valid ids here, so it would recommend silently from the wrong history.
    with pytest.raises(TypeError, match=r"not a string \('12 3'\); split it first"):
        rec.recommend("12 3", 3)
    with pytest.raises(TypeError, match=r"not a string \('12'\)"):
        rec.user_vectors(["12", "3"])
    for k in (0, 2.5, True, len(rec.vocab) + 1):
        with pytest.raises(ValueError, match=rf"k must be in \[1, {len(rec.vocab)}\], got {k}"):
            rec.recommend(["1"], k)


def test_resume_continues_from_checkpoint(tmp_path):
    out = _train_cli(tmp_path, "nope", ["--patience", "50"])
    resumed = str(tmp_path / "resumed")
    cli_main(["train", "--format", "synthetic", "--model", "nope", "--epochs", "3", "--max-len",
              "20", "--hidden", "32", "--out", resumed, "--no-progress", "--patience", "50",
              "--resume", os.path.join(out, "checkpoint.pt")])
    with open(os.path.join(resumed, "metrics.json")) as f:
        m = json.load(f)
    assert m["epochs_run"] == 3
    with open(os.path.join(out, "metrics.json")) as f:
        first = json.load(f)["history"]
    assert m["history"][:2] == first  # epochs 1-2 taken over, wall times included: not retrained


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    """Weights, optimiser, batch order and dropout masks all continue where the checkpoint left."""
    args = ["train", "--format", "synthetic", "--model", "psa", "--max-len", "20", "--hidden", "32",
            "--dropout", "0.3", "--patience", "50", "--no-progress"]
    straight, first, resumed = (str(tmp_path / n) for n in ("straight", "first", "resumed"))
    cli_main(args + ["--epochs", "3", "--out", straight])
    cli_main(args + ["--epochs", "1", "--out", first])
    cli_main(args + ["--epochs", "3", "--out", resumed, "--resume", os.path.join(first, "checkpoint.pt")])
    a, b, c = (torch.load(os.path.join(d, "checkpoint.pt"), weights_only=False)
               for d in (straight, resumed, first))
    assert [h["loss"] for h in a["train_state"]["history"]] == [h["loss"] for h in b["train_state"]["history"]]
    # Epoch 1 was taken over from the checkpoint, not trained again (its wall time would differ).
    assert b["train_state"]["history"][0] == c["train_state"]["history"][0]
    for name, w in a["model_state"].items():
        assert torch.equal(w, b["model_state"][name]), name


def test_resuming_an_early_stopped_run_trains_no_further(tmp_path):
    out = _train_cli(tmp_path, "nope", ["--patience", "50"])
    path = os.path.join(out, "checkpoint.pt")
    ckpt = torch.load(path, weights_only=False)
    ckpt["train_state"]["bad_epochs"] = 3
    torch.save(ckpt, path)
    resumed = str(tmp_path / "resumed")
    cli_main(["train", "--format", "synthetic", "--model", "nope", "--epochs", "5", "--max-len",
              "20", "--hidden", "32", "--out", resumed, "--no-progress", "--patience", "3",
              "--resume", path])
    with open(os.path.join(resumed, "metrics.json")) as f:
        assert json.load(f)["epochs_run"] == 2


def test_cli_trains_under_cpu_bfloat16_autocast(tmp_path, monkeypatch):
    import pka_ext.modules

    seen = set()
    op = pka_ext.modules.pka_attention

    def recording(q, *args, **kwargs):
        seen.add((torch.is_grad_enabled(), q.dtype))
        return op(q, *args, **kwargs)

    monkeypatch.setattr(pka_ext.modules, "pka_attention", recording)
    out = _train_cli(tmp_path, extra=["--amp"])
    assert (True, torch.bfloat16) in seen  # the training steps ran the attention in bfloat16
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)
    assert metrics["config"]["train"]["amp"] is True
    assert metrics["test"]["hr@10"] > 0.1  # a random ranking scores about 10 / 500


def free_port() -> int:
    """A port nothing listens on now (a fixed or pid-derived one can collide between runs)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args, env, outputs, timeout):
    """``python -m torch.distributed.run --nproc_per_node 2 ... args``, asserted to succeed.

    Run a second time only after gloo's known teardown abort (a rank's std::terminate with no
    exception, in torch's process-group destruction) once every file in ``outputs`` was written:
    the run itself had finished, and the abort is torch's, not ours; any other failure, or the
    same one twice, fails the test.
    """
    for attempt in (1, 2):
        for path in outputs:
            if os.path.exists(path):
                os.remove(path)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *args]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        teardown_abort = (res.returncode != 0 and all(os.path.exists(p) for p in outputs)
                          and "terminate called without an active exception" in res.stderr)
        if not (teardown_abort and attempt == 1):
            break
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.mark.parametrize("model", ["psa", "sasrec"])
def test_ddp_two_gloo_processes_match_single_process(tmp_path, model):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([TESTS, os.path.dirname(TESTS)]),
               MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1")
    torchrun([os.path.join(TESTS, "ddp_worker.py"), model, str(tmp_path)], env,
             [str(tmp_path / f"rank{r}.pt") for r in range(2)], timeout=300)
    sys.path.insert(0, TESTS)
    from ddp_worker import run

    single = run(model).state_dict()
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name, ref in single.items():
        assert torch.equal(ranks[0][name], ranks[1][name]), name
        torch.testing.assert_close(ranks[0][name], ref, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_torchrun_train_end_to_end_matches_one_process(tmp_path):
    """The README's ``torchrun ... -m pka_ext.rec train``: both ranks train, take the same
    early-stopping decisions (rank 0's validation metric is broadcast), and rank 0 writes files
    whose metrics match a one-process run on the same global batches."""
    flags = ["train", "--format", "synthetic", "--model", "psa", "--epochs", "2", "--max-len", "10",
             "--hidden", "16", "--dropout", "0", "--no-progress"]
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1")
    torchrun(["-m", "pka_ext.rec", *flags, "--out", str(tmp_path / "ddp")], env,
             [str(tmp_path / "ddp" / "metrics.json")], timeout=600)
    cli_main([*flags, "--out", str(tmp_path / "one")])
    ddp, one = (json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("ddp", "one"))
    assert ddp["epochs_run"] == one["epochs_run"] == 2
    for split in ("val", "test"):
        for key, value in one[split].items():
            assert ddp[split][key] == pytest.approx(value, abs=1e-3), (split, key)


def _events_csv(tmp_path, name="events.txt", header="uid;item_name", sep=";", bad_line=True):
    """The synthetic data as a CSV with its own column names; optionally one malformed line 7."""
    from pka_ext.rec.synthetic import make_synthetic

    data = make_synthetic(num_users=150, num_items=40, seed=1)
    rows = [f"{u}{sep}sku{data.item_ids[i - 1]}" for u, seq in zip(data.user_ids, data.sequences)
            for i in seq]
    path = tmp_path / name
    path.write_text("\n".join([header, *rows[:5], *(["only-one-field"] if bad_line else []),
                               *rows[5:]]) + "\n")
    return path


def _train_on_csv(path, out, *extra):
    cli_main(["train", "--data", str(path), "--format", "csv", "--columns", "uid,item_name",
              "--sep", ";", "--epochs", "1", "--max-len", "10", "--hidden", "16", "--no-progress",
              "--out", out, *extra])
    with open(os.path.join(out, "metrics.json")) as f:
        return json.load(f)


def test_cli_reads_a_csv_with_named_columns_and_skips_bad_lines_on_request(tmp_path, capsys):
    path = _events_csv(tmp_path)
    out = str(tmp_path / "run")
    with pytest.raises(SystemExit, match=rf"pka-rec train: {path}:7: expected 2 fields, got 1"):
        _train_on_csv(path, out)
    with pytest.warns(UserWarning, match="skipped 1 bad line"):
        metrics = _train_on_csv(path, out, "--skip-bad")
    assert metrics["dataset"] == "events"
    assert metrics["config"]["data"]["columns"] == ["uid", "item_name"]
    assert RunConfig.from_dict(metrics["config"]).to_dict() == metrics["config"]
    capsys.readouterr()
    ckpt = os.path.join(out, "checkpoint.pt")
    with pytest.warns(UserWarning, match="skipped 1 bad line"):
        # The checkpoint's config reads the file as training did: the same columns, separator, skip.
        cli_main(["evaluate", "--checkpoint", ckpt])
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["test"]["ndcg@10"] == pytest.approx(metrics["test"]["ndcg@10"], abs=1e-12)
    # The same events in another layout: evaluate's reading flags override the training run's.
    tsv = _events_csv(tmp_path, "events.tsv", header="user\tsku", sep="\t", bad_line=False)
    cli_main(["evaluate", "--checkpoint", ckpt, "--data", str(tsv), "--columns", "user,sku",
              "--sep", "tab"])
    assert json.loads(capsys.readouterr().out) == evaluated


def test_ranks_under_torchrun_take_the_gpu_of_their_local_rank():
    # Every rank on cuda:0 (what --device cuda meant before) makes NCCL fail with duplicate GPUs.
    torchrun = {"WORLD_SIZE": "4", "LOCAL_RANK": "3", "RANK": "7"}
    assert rank_device("cuda", torchrun) == "cuda:3"
    assert rank_device("cuda", {}) == "cuda"  # one process: as given
    assert rank_device("cuda:1", torchrun) == "cuda:1"
    assert rank_device("cpu", torchrun) == "cpu"


def test_cli_refuses_to_resume_with_other_settings(tmp_path):
    # Before, another width failed inside load_state_dict with a traceback, and another seed or
    # learning rate resumed silently into a run that was neither the old one nor a fresh one.
    ckpt = os.path.join(_train_cli(tmp_path), "checkpoint.pt")
    resumed = str(tmp_path / "resumed")
    with pytest.raises(SystemExit, match=r"trained with other settings; .*model.hidden: 32 -> 16; "
                                         r"train.lr: 0.001 -> 0.01; train.seed: 0 -> 3$"):
        _train_cli(tmp_path, extra=["--hidden", "16", "--lr", "0.01", "--seed", "3", "--resume",
                                    ckpt, "--out", resumed])
    # Where it stops and what it reports may change.
    _train_cli(tmp_path, extra=["--epochs", "3", "--patience", "9", "--report-k", "10",
                                "--resume", ckpt, "--out", resumed])
    with open(os.path.join(resumed, "metrics.json")) as f:
        assert json.load(f)["epochs_run"] == 3


def test_cli_refuses_to_resume_on_other_data(tmp_path):
    ckpt = os.path.join(_train_cli(tmp_path), "checkpoint.pt")
    path = _events_csv(tmp_path, bad_line=False)
    with pytest.raises(SystemExit, match=f"pka-rec train: {ckpt}: its item id map does not match"):
        _train_on_csv(path, str(tmp_path / "resumed"), "--resume", ckpt, "--epochs", "2")


def test_cli_recommends_for_every_user_of_a_file(tmp_path, capsys):
    path = _events_csv(tmp_path, bad_line=False)
    out = str(tmp_path / "run")
    _train_on_csv(path, out)
    ckpt = os.path.join(out, "checkpoint.pt")
    recs = str(tmp_path / "recs.csv")
    cli_main(["recommend", "--checkpoint", ckpt, "--data", str(path), "-k", "4", "--out", recs])
    assert "wrote top-4 items for 150 of 150 users" in capsys.readouterr().err
    with open(recs, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["user", "rank", "item", "score"] and len(rows) == 1 + 150 * 4
    rec = Recommender.load(ckpt)
    data = load(str(path), "csv", user_col="uid", item_col="item_name", time_col=None, sep=";")
    for u in (0, 77, 149):
        history = data.vocab.decode(data.sequences[u])
        expected = rec.recommend(history, 4, with_scores=True)
        got = rows[1 + 4 * u: 5 + 4 * u]
        assert [r[:3] for r in got] == [[data.user_ids[u], str(i + 1), item]
                                        for i, (item, _) in enumerate(expected)]
        assert [float(r[3]) for r in got] == pytest.approx([s for _, s in expected], rel=1e-5)
        assert not set(history) & {item for item, _ in expected}
    cli_main(["recommend", "--checkpoint", ckpt, "--data", str(path), "-k", "40",
              "--include-seen"])
    printed = list(csv.reader(capsys.readouterr().out.splitlines()))
    assert len(printed) == 1 + 150 * 40  # every item, seen ones included
    with pytest.raises(SystemExit, match=r"pka-rec recommend: -k must be in \[1, 40\], got 41"):
        cli_main(["recommend", "--checkpoint", ckpt, "--data", str(path), "-k", "41"])
    with pytest.raises(SystemExit, match="--columns, --out apply to --data, not --history"):
        cli_main(["recommend", "--checkpoint", ckpt, "--history", "sku3", "--columns", "a,b",
                  "--out", recs])


def test_train_run_on_in_memory_events_equals_training_on_their_file(tmp_path, capsys):
    from pka_ext.rec import Interactions, train_run

    path = _events_csv(tmp_path, bad_line=False)
    from_file = _train_on_csv(path, str(tmp_path / "file"))
    lines = path.read_text().splitlines()[1:]
    users, items = zip(*(line.split(";") for line in lines))
    cfg = RunConfig.from_dict(from_file["config"])
    cfg.data = DataConfig(protocol=cfg.data.protocol)
    metrics = train_run(cfg, str(tmp_path / "memory"), data=Interactions.from_events(users, items),
                        progress=False)
    assert metrics["dataset"] == "events"  # not "synthetic", the format DataConfig defaults to
    for split in ("val", "test"):
        assert metrics[split] == from_file[split]
    # Recorded as events from Python, not as the built-in data: evaluating needs the data again.
    assert metrics["config"]["data"]["format"] == "events"
    ckpt = str(tmp_path / "memory" / "checkpoint.pt")
    with pytest.raises(SystemExit, match="pka-rec evaluate: this run was trained on events passed "
                                         "from Python"):
        cli_main(["evaluate", "--checkpoint", ckpt])
    capsys.readouterr()
    cli_main(["evaluate", "--checkpoint", ckpt, "--data", str(path), "--format", "csv",
              "--columns", "uid,item_name", "--sep", ";"])
    assert json.loads(capsys.readouterr().out)["test"] == from_file["test"]


def test_a_diverging_run_stops_with_an_error_naming_the_epoch(tmp_path):
    from pka_ext.rec import TrainingDiverged, make_synthetic
    from pka_ext.rec.protocols import leave_one_out

    # Adam's steps are about lr in size: 1e30 overflows the logits within the first epoch.
    with pytest.raises(SystemExit, match="pka-rec train: epoch 1: the training loss is not "
                                         "finite; no epoch had finished. Try a lower learning"):
        _train_cli(tmp_path, "psa", ["--lr", "1e30"])
    split = leave_one_out(make_synthetic(num_users=200, num_items=50, max_len=12))
    model = _tiny_model(num_items=50)
    saved = []

    def poison_after_epoch_2(state):
        saved.append(copy.deepcopy(state.best_state))
        if state.epoch == 2:
            with torch.no_grad():
                next(model.parameters()).fill_(math.nan)

    with pytest.raises(TrainingDiverged, match=r"epoch 3: the training loss is not finite; "
                                               r"the last epoch to finish was 2 \(the best: [12]\)"):
        fit(model, split, TrainConfig(epochs=5, patience=50), on_epoch_end=poison_after_epoch_2,
            progress=False, log=lambda *_: None)
    assert len(saved) == 2
    assert all(torch.isfinite(w).all() for w in saved[-1].values())


def test_an_empty_validation_split_is_an_error_not_a_blind_early_stop(tmp_path):
    from pka_ext.rec import Interactions, train_run

    rng = np.random.default_rng(0)
    users = [f"u{n % 40}" for n in range(800)]
    items = [f"i{rng.integers(20)}" for _ in users]
    times = [min(n, 700) for n in range(800)]  # the last eighth of the events share one time
    cfg = RunConfig(ModelConfig(model="nope", max_len=8, hidden=16), TrainConfig(epochs=1),
                    DataConfig(protocol="temporal"))
    with pytest.raises(DataError, match=r"the validation split has no events to score.*temporal "
                                        r"cuts at times 700 and 700: 0 events fall between them"):
        train_run(cfg, str(tmp_path / "o"), data=Interactions.from_events(users, items, times),
                  progress=False)


@pytest.mark.parametrize("flags,match", [
    (["--format", "s3rec", "--data", "x.txt", "--columns", "u,i"],
     "columns and sep apply to the csv format only"),
    (["--format", "csv", "--data", "x.csv", "--columns", "u"], "columns must name user, item"),
    (["--format", "csv", "--data", "x.csv", "--columns", "u,,t"], "columns must name user, item"),
    # An empty --columns (an unset shell variable) was taken for no --columns: the defaults.
    (["--format", "csv", "--data", "x.csv", "--columns", ""], "columns must name user, item"),
    (["--format", "csv", "--data", "x.csv", "--sep", ";;"], "sep must be one character"),
    (["--format", "csv", "--data", "no-such-file.csv"], "pka-rec train: .*no-such-file.csv"),
    (["--format", "csv"], "pka-rec train: a data file is required for format 'csv'"),
    # The built-in data ignores any file: this used to train on it under the file's name.
    (["--format", "synthetic", "--data", "x.txt"],
     r"a data file \(x.txt\) is given with format 'synthetic'"),
    (["--format", "s3rec", "--data", "."], r"pka-rec train: \[Errno 21\] a folder, not a data file"),
])
def test_cli_bad_data_flags_are_one_line_errors(tmp_path, flags, match):
    with pytest.raises(SystemExit, match=match):
        cli_main(["train", *flags, "--out", str(tmp_path / "o")])


@pytest.mark.parametrize("flag,value,expected", [
    ("--epochs", "0", "a positive integer"),
    ("--batch-size", "0", "a positive integer"),
    ("--hidden", "0", "a positive integer"),
    ("--heads", "0", "a positive integer"),
    ("--blocks", "-1", "a positive integer"),
    ("--max-len", "x", "a positive integer"),
    ("--patience", "0", "a positive integer"),
    ("--negatives", "0", "a positive integer"),
    ("--max-eval-events", "0", "a positive integer"),
    ("--lr", "-1e-3", "a positive number"),
    ("--lr", "nan", "a positive number"),
    ("--dropout", "1", r"a number in \[0, 1\)"),
    ("--val-start", "2", r"a number in \(0, 1\)"),
    ("--test-start", "0", r"a number in \(0, 1\)"),
    ("--seed", "-1", r"a non-negative integer below 2\*\*64"),
    # torch.manual_seed's limit: this failed with a traceback once the data had been read.
    ("--seed", str(2**64), r"a non-negative integer below 2\*\*64"),
    # An empty path (an unset shell variable): --resume "" trained afresh, silently.
    ("--resume", "", "a path"),
    ("--out", "", "a path"),
])
def test_cli_bad_numbers_are_usage_errors_naming_the_flag(tmp_path, capsys, flag, value, expected):
    # Each of these used to train nothing silently (--epochs 0, --negatives 0, --patience 0) or
    # fail with a traceback from deep inside training (a zero batch size or width).
    with pytest.raises(SystemExit) as exc:
        cli_main(["train", f"{flag}={value}", "--out", str(tmp_path / "o")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert re.search(rf"argument {flag}: expected {expected}, got '{re.escape(value)}'", err), err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("cls,field,value,match", [
    (ModelConfig, "hidden", 0, "hidden must be a positive integer, got 0"),
    (ModelConfig, "num_heads", 0, "num_heads must be a positive integer, got 0"),
    (ModelConfig, "num_blocks", 1.5, "num_blocks must be a positive integer, got 1.5"),
    (ModelConfig, "num_items", -1, "num_items must be a non-negative integer"),
    (ModelConfig, "dropout", 1.0, r"dropout must be a number in \[0, 1\), got 1.0"),
    (ModelConfig, "block", "post_ln", "block must be one of .*'pre_ln'.*got 'post_ln'"),
    (ModelConfig, "key_kernel", "band", "key_kernel must be one of .*got 'band'"),
    (ModelConfig, "backend", "gpu", "backend must be one of .*got 'gpu'"),
    (TrainConfig, "epochs", 0, "epochs must be a positive integer, got 0"),
    (TrainConfig, "batch_size", True, "batch_size must be a positive integer, got True"),
    (TrainConfig, "num_negatives", 0, "num_negatives must be a positive integer"),
    (TrainConfig, "lr", 0.0, "lr must be a positive number, got 0.0"),
    (TrainConfig, "weight_decay", -0.1, "weight_decay must be a non-negative number"),
    (TrainConfig, "loss", "bpr", "loss must be 'ce' or 'sampled', got 'bpr'"),
    (TrainConfig, "seed", -1, "seed must be a non-negative integer, got -1"),
    (TrainConfig, "device", "tpu", "device must be 'cpu', 'cuda' or 'cuda:N', got 'tpu'"),
    (TrainConfig, "report_ks", 5, "eval_k must be a positive integer and report_ks a list of them"),
    (DataConfig, "val_start", 1.0, r"val_start must be a number in \(0, 1\), got 1.0"),
    (DataConfig, "test_start", 0.5, "val_start=0.95 must be <= test_start=0.5"),
    (DataConfig, "max_eval_events", 0, "max_eval_events must be a positive integer or None"),
])
def test_configs_reject_bad_fields_by_name(cls, field, value, match):
    with pytest.raises(ValueError, match=match):
        cls(**{field: value})
    cls(**{field: getattr(cls(), field)})  # the default passes
    assert ModelConfig(num_items=np.int64(5)).num_items == 5  # numpy integers count as integers


def test_cli_train_defaults_are_the_configs_defaults():
    """`pka-rec train` without options builds RunConfig(): the CLI takes its defaults from the
    config dataclasses, and an option whose default is edited on one side only fails here."""
    from pka_ext.rec.cli import _run_config, build_parser

    args = build_parser().parse_args(["train", "--out", "run"])
    assert _run_config(args) == RunConfig()


def test_psa_kernel_settings_are_refused_for_other_models(tmp_path):
    with pytest.raises(ValueError, match=r"the PSA kernel settings apply to model 'psa' only, not "
                                         r"'nope': got \{'add_positional_embedding': True\}"):
        ModelConfig(model="nope", add_positional_embedding=True)
    with pytest.raises(SystemExit, match=r"pka-rec train: the PSA kernel settings .* not 'sasrec': "
                                         r"got \{'key_kernel': 'full', 'share_value_kernel': False\}"):
        cli_main(["train", "--model", "sasrec", "--key-kernel", "full", "--per-layer-value-kernel",
                  "--out", str(tmp_path / "o")])
    assert ModelConfig(model="psa", key_kernel="full").key_kernel == "full"


def test_max_eval_events_is_refused_for_leave_one_out(tmp_path):
    # Leave-one-out scores every user: a cap accepted there changed nothing while metrics.json's
    # config recorded it, as if the published numbers came from that many events.
    with pytest.raises(ValueError, match=r"max_eval_events applies to the temporal protocol only"):
        DataConfig(protocol="loo", max_eval_events=5)
    with pytest.raises(SystemExit, match=r"pka-rec train: max_eval_events applies to the temporal"):
        cli_main(["train", "--protocol", "loo", "--max-eval-events", "5", "--out",
                  str(tmp_path / "o")])
    assert not os.path.exists(tmp_path / "o")
    assert DataConfig(protocol="temporal", max_eval_events=5).max_eval_events == 5


def test_cli_train_takes_the_format_from_the_suffix_and_asks_for_it_otherwise(tmp_path):
    path = _events_csv(tmp_path, "events.csv", header="user,sku", sep=",", bad_line=False)
    out = str(tmp_path / "run")
    cli_main(["train", "--data", str(path), "--columns", "user,sku", "--epochs", "1", "--max-len",
              "10", "--hidden", "16", "--no-progress", "--out", out])
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)
    assert metrics["config"]["data"]["format"] == "csv" and metrics["dataset"] == "events"
    # A .txt file is S3-Rec or SASRec lines: without --format this used to train on the built-in
    # synthetic data and report it under the file's name.
    txt = path.rename(tmp_path / "events.txt")
    with pytest.raises(SystemExit, match=r"--format is needed for .*events.txt: s3rec"):
        cli_main(["train", "--data", str(txt), "--out", str(tmp_path / "txt")])
    assert not (tmp_path / "txt").exists()


def test_cli_names_bad_paths_checkpoints_and_devices_in_one_line(tmp_path, capsys):
    ckpt = os.path.join(_train_cli(tmp_path), "checkpoint.pt")
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    with pytest.raises(SystemExit, match=r"\[Errno 20\] the output folder is a file: .*file"):
        cli_main(["train", "--epochs", "1", "--out", str(not_a_folder)])
    metrics = os.path.join(os.path.dirname(ckpt), "metrics.json")
    with pytest.raises(SystemExit, match=rf"pka-rec evaluate: {metrics} could not be read as a "
                                         r"pka-rec-checkpoint/1 checkpoint \(torch.load: "
                                         r"UnpicklingError: "):
        cli_main(["evaluate", "--checkpoint", metrics])
    with pytest.raises(SystemExit):
        cli_main(["recommend", "--checkpoint", ckpt, "--history", "1", "--device", "tpu"])
    assert "argument --device: expected cpu, cuda or cuda:N, got 'tpu'" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            cli_main(["train", "--device", "cuda", "--out", str(tmp_path / "cuda")])
        assert "argument --device: 'cuda': no CUDA device is available here" in capsys.readouterr().err
    with pytest.raises(SystemExit, match=r"pka-rec evaluate: .* is a folder; name the checkpoint "
                                         r"file, such as .*checkpoint.pt"):
        cli_main(["evaluate", "--checkpoint", os.path.dirname(ckpt)])
    # The built-in data has no file format to inherit: the suffix names it, or --format must.
    with pytest.raises(SystemExit, match=r"pka-rec plot-kernels: --format is needed for x.txt"):
        cli_main(["plot-kernels", "--checkpoint", ckpt, "--data", "x.txt", "--out",
                  str(tmp_path / "k.png")])
    for out, match in ((tmp_path, "is a folder; name an image file such as"),
                       (tmp_path / "kernels", "name an image file ending in one of .*, .png,")):
        with pytest.raises(SystemExit, match=f"pka-rec plot-kernels: {re.escape(str(out))}.*"
                                             f"{match}"):
            cli_main(["plot-kernels", "--checkpoint", ckpt, "--out", str(out)])


def test_plot_kernels_reads_another_file_in_the_models_numbering(tmp_path, monkeypatch):
    import pka_ext.rec.plots as plots

    path = _events_csv(tmp_path, bad_line=False)
    _train_on_csv(path, str(tmp_path / "psa"))
    _train_on_csv(path, str(tmp_path / "sasrec"), "--model", "sasrec")
    header, *rows = path.read_text().splitlines()
    by_user = {}
    for row in rows:
        by_user.setdefault(row.split(";")[0], []).append(row)
    # The same events, users in reverse order: the file's own numbering of the items differs.
    flipped = tmp_path / "flipped.txt"
    flipped.write_text("\n".join([header, *(r for u in reversed(by_user) for r in by_user[u])]))
    captured = {}
    monkeypatch.setattr(plots, "plot_kernels",
                        lambda model, out, contexts: captured.update(c=contexts))
    ckpt = str(tmp_path / "psa" / "checkpoint.pt")
    cli_main(["plot-kernels", "--checkpoint", ckpt, "--data", str(flipped), "--out",
              str(tmp_path / "k.png")])
    vocab = Recommender.load(ckpt).vocab
    assert [vocab.decode(c) for c in captured["c"]] == [
        [r.split(";")[1] for r in by_user[u]] for u in reversed(by_user)]
    monkeypatch.undo()
    with pytest.raises(SystemExit, match="pka-rec plot-kernels: nothing to plot: the model has no "
                                         "kernels and no contexts were given"):
        cli_main(["plot-kernels", "--checkpoint", str(tmp_path / "sasrec" / "checkpoint.pt"),
                  "--out", str(tmp_path / "k.png")])


def test_a_cutoff_beyond_the_catalogue_needs_no_table_of_its_size():
    """--report-k 1000000000000 used to allocate a discount table of that length (8 TB) when the
    run had finished training, and crash instead of writing metrics.json."""
    model = FixedScorer([0.0, 9.0, 5.0, 4.0, 3.0])
    es = EvalSet(contexts=[np.array([1]), np.array([2])], targets=np.array([3, 4]),
                 users=np.arange(2))
    huge = evaluate(model, es, num_items=4, k=[2, 10**12])
    small = evaluate(model, es, num_items=4, k=[2, 4])
    assert huge["hr@1000000000000"] == small["hr@4"] == 1.0
    assert huge["ndcg@1000000000000"] == small["ndcg@4"] and huge["hr@2"] == small["hr@2"]
    assert huge["cov@1000000000000"] == small["cov@4"]


def _tiny_recommender(num_items=30):
    from pka_ext.rec.data import ItemVocab

    return Recommender(_tiny_model(num_items=num_items).eval(), RunConfig(),
                       ItemVocab([str(i) for i in range(1, num_items + 1)]))


def test_recommend_names_a_bad_batch_size_or_history():
    rec = _tiny_recommender()
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match=rf"batch_size must be a positive integer, got {bad}"):
            rec.recommend(["1", "2"], 3, batch_size=bad)
        with pytest.raises(ValueError, match=rf"batch_size must be a positive integer, got {bad}"):
            rec.user_vectors([["1", "2"]], batch_size=bad)
    # One flat history where a list of histories is due: an int is not a history.
    with pytest.raises(TypeError, match=r"a history must be a list of item ids, oldest first, not "
                                        r"int \(12\); pass user_vectors a list of histories"):
        rec.user_vectors([12, 7])
    for bad in (None, 5, iter(["1", "2"])):
        with pytest.raises(TypeError, match=r"history must be a list of item ids, or a list of "
                                            r"such lists, not "):
            rec.recommend(bad, 3)


@pytest.mark.parametrize("value,ok", [
    (3, True), (np.int64(3), True), (np.uint8(3), True),
    (0, False), (True, False), (np.bool_(True), False), (3.0, False), ("3", False),
    (torch.tensor(3), False),
])
def test_sizes_counts_and_cutoffs_take_the_same_integers(value, ok):
    """The modules, the configs, recommend and evaluate share one rule (a Python or numpy integer,
    not bool) and name a refused value as it was given. evaluate took a numpy k for a collection
    (TypeError) and True for the cutoff 1 (keys 'ndcg@True'); recommend printed the string '3' as
    3, which reads as a valid k."""
    from pka_ext.modules import PositionalKernel
    from pka_ext.rec.protocols import temporal
    from pka_ext.rec.synthetic import ChainProcess, make_synthetic

    rec = _tiny_recommender()
    model = FixedScorer([9.0, 5.0, 4.0, 3.0, 2.0, 1.0])
    es = EvalSet(contexts=[np.array([1, 2])], targets=np.array([3]), users=np.arange(1))
    timed = make_synthetic(num_users=5, num_items=6, seed=0)
    process = ChainProcess.draw(6, seed=0)
    calls = [
        ("max_len", lambda: PositionalKernel(value)),
        ("num_blocks", lambda: ModelConfig(num_blocks=value)),
        ("batch_size", lambda: TrainConfig(batch_size=value)),
        ("k", lambda: rec.recommend(["1", "2"], value)),
        ("batch_size", lambda: rec.user_vectors([["1", "2"]], batch_size=value)),
        ("k", lambda: evaluate(model, es, num_items=5, k=value)),
        ("batch_size", lambda: evaluate(model, es, num_items=5, batch_size=value)),
        ("max_eval_events", lambda: temporal(timed, max_eval_events=value)),
        ("num_users", lambda: process.sample(value, 2, 4)),
    ]
    for name, call in calls:
        if ok:
            call()
        else:
            with pytest.raises(ValueError, match=rf"{name} must .*got {re.escape(repr(value))}$"):
                call()
    if ok:
        assert list(evaluate(model, es, num_items=5, k=value))[0] == "ndcg@3"


def test_cli_recommend_says_why_a_known_history_leaves_nothing(tmp_path, capsys):
    path = _events_csv(tmp_path, bad_line=False)
    out = str(tmp_path / "run")
    _train_on_csv(path, out)
    ckpt = os.path.join(out, "checkpoint.pt")
    # A history of the whole catalogue leaves nothing to recommend: every item is known, so
    # "no item of --history is known to the model" would send the user after the wrong cause.
    everything = " ".join(Recommender.load(ckpt).vocab.ids)
    capsys.readouterr()
    with pytest.raises(SystemExit, match=r"pka-rec recommend: every item the model knows is in "
                                         r"--history and left out as seen; --include-seen"):
        cli_main(["recommend", "--checkpoint", ckpt, "--history", everything, "-k", "3"])
    cli_main(["recommend", "--checkpoint", ckpt, "--history", everything, "-k", "3",
              "--include-seen"])
    assert len(capsys.readouterr().out.split()) == 3


def test_cli_recommend_checks_out_before_any_work(tmp_path, monkeypatch):
    import pka_ext.rec.cli as cli

    path = _events_csv(tmp_path, bad_line=False)
    out = str(tmp_path / "run")
    _train_on_csv(path, out)
    ckpt = os.path.join(out, "checkpoint.pt")
    # --out is refused before the file is read and every user scored, not after.
    monkeypatch.setattr(cli, "load_interactions", lambda *a: pytest.fail("read the data first"))
    original = path.read_text()
    for bad, match in ((tmp_path, r"is a folder; name a CSV file"),
                       (tmp_path / "no-such-folder" / "r.csv", r": its folder .* does not exist"),
                       (path, r"is the --data file"),
                       (ckpt, r"is the --checkpoint file")):
        with pytest.raises(SystemExit, match=rf"pka-rec recommend: --out {re.escape(str(bad))} ?"
                                             rf"{match}"):
            cli_main(["recommend", "--checkpoint", ckpt, "--data", str(path), "--out", str(bad)])
    assert path.read_text() == original
    Recommender.load(ckpt)


def test_evaluate_and_recommend_take_the_format_the_suffix_of_data_names(tmp_path, capsys):
    """README: for another file, --format may be left out where the suffix names it, even when
    the training run's file had another format (a CSV converted to RecBole's .inter, say)."""
    path = _events_csv(tmp_path, bad_line=False)
    out = str(tmp_path / "run")
    metrics = _train_on_csv(path, out)
    users, items = zip(*(line.split(";") for line in path.read_text().splitlines()[1:]))
    inter = tmp_path / "events.inter"
    inter.write_text("user_id:token\titem_id:token\n"
                     + "".join(f"{u}\t{i}\n" for u, i in zip(users, items)))
    ckpt = os.path.join(out, "checkpoint.pt")
    capsys.readouterr()
    cli_main(["evaluate", "--checkpoint", ckpt, "--data", str(inter)])
    assert json.loads(capsys.readouterr().out)["test"] == metrics["test"]
    cli_main(["recommend", "--checkpoint", ckpt, "--data", str(inter), "-k", "2"])
    rows = list(csv.reader(capsys.readouterr().out.splitlines()))
    assert len(rows) == 1 + 150 * 2


def test_cli_recommend_piped_into_a_reader_that_stops_early_is_quiet(tmp_path):
    """``pka-rec recommend --data ... | head``: the closed pipe ends the command without the
    '[Errno 32] Broken pipe' message an OSError would print."""
    path = _events_csv(tmp_path, bad_line=False)
    out = str(tmp_path / "run")
    _train_on_csv(path, out)
    cmd = [sys.executable, "-m", "pka_ext.rec", "recommend", "--checkpoint",
           os.path.join(out, "checkpoint.pt"), "--data", str(path), "-k", "40", "--include-seen"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # 6,000 rows, well past a pipe's buffer, so the writer meets the closed pipe.
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        assert proc.stdout.readline().rstrip() == b"user,rank,item,score"
        proc.stdout.close()
        err = proc.stderr.read().decode()
        assert proc.wait(timeout=300) == 1
    assert err == ""


@pytest.mark.parametrize("cls,kw,match", [
    # A string is truthy whatever it says: "false" used to share the key kernel.
    (ModelConfig, {"share_key_kernel": "false"}, "share_key_kernel must be True or False, got 'false'"),
    (ModelConfig, {"normalize_kernels": None}, "normalize_kernels must be True or False, got None"),
    (TrainConfig, {"amp": "no"}, "amp must be True or False, got 'no'"),
    (DataConfig, {"skip_bad": 1}, "skip_bad must be True or False, got 1"),
    (DataConfig, {"format": "csv", "columns": ["user", 2]},
     r"columns must be a list of column names, got \['user', 2\]"),
    (DataConfig, {"format": "csv", "columns": "ui"}, "columns must be a list of column names, got 'ui'"),
    (DataConfig, {"format": "csv", "sep": 9}, "sep must be one character, got 9"),
    (DataConfig, {"format": "csv", "path": 5}, "path must be a file path or None, got 5"),
    (DataConfig, {"name": 5}, "name must be a string or None, got 5"),
    (RunConfig, {"train": DataConfig()}, "train must be a TrainConfig, got DataConfig"),
])
def test_configs_name_fields_of_the_wrong_type(cls, kw, match):
    with pytest.raises(ValueError, match=match):
        cls(**kw)


def test_rope_needs_an_even_head_dim_before_any_work(tmp_path):
    """Refused by ModelConfig, not by the model built after the data was read and split (a
    traceback from pka-rec train, and an empty output folder)."""
    with pytest.raises(ValueError, match=r"model 'rope' rotates pairs of dimensions, so "
                                         r"hidden / num_heads must be even, got hidden=6, "
                                         r"num_heads=2"):
        ModelConfig(model="rope", hidden=6, num_heads=2)
    out = tmp_path / "rope"
    with pytest.raises(SystemExit, match="pka-rec train: model 'rope' rotates pairs"):
        cli_main(["train", "--model", "rope", "--hidden", "6", "--heads", "2", "--out", str(out)])
    assert not out.exists()
    assert ModelConfig(model="rope", hidden=8, num_heads=2).hidden == 8
    assert ModelConfig(model="psa", hidden=6, num_heads=2).hidden == 6  # only rope pairs them


def test_numpy_values_and_paths_round_trip_through_json_and_the_checkpoint(tmp_path):
    """Numpy scalars (a sweep over np.arange, say) pass the checks; kept as such, json could not
    write metrics.json when training had finished, and the checkpoint could not be loaded."""
    from pathlib import Path

    from pka_ext.rec import Interactions, make_synthetic, train_run
    from pka_ext.rec.recommender import load_checkpoint

    cfg = RunConfig(ModelConfig(hidden=np.int64(16), max_len=np.int32(10),
                                dropout=np.float64(0.1), share_key_kernel=np.bool_(True)),
                    TrainConfig(epochs=np.int64(1), lr=np.float32(1e-3), amp=np.bool_(False),
                                report_ks=list(np.array([5, 10]))),
                    DataConfig(protocol=np.str_("loo"), name=np.str_("syn")))
    plain = [type(v) for v in (cfg.model.hidden, cfg.model.dropout, cfg.model.share_key_kernel,
                               cfg.train.lr, cfg.train.amp, *cfg.train.report_ks,
                               cfg.data.protocol, cfg.data.name)]
    assert plain == [int, float, bool, float, bool, int, int, str, str]
    assert cfg.train.lr == float(np.float32(1e-3))  # the value given, as a Python float
    data: Interactions = make_synthetic(num_users=60, num_items=30, min_len=4, max_len=10)
    metrics = train_run(cfg, str(tmp_path / "run"), data=data, progress=False, log=lambda *a: None)
    with open(tmp_path / "run" / "metrics.json") as f:
        assert json.load(f)["config"] == metrics["config"] == cfg.to_dict()
    saved = RunConfig.from_dict(load_checkpoint(str(tmp_path / "run" / "checkpoint.pt"))["config"])
    assert saved == cfg and RunConfig.from_json(cfg.to_json()) == cfg
    assert Recommender.load(str(tmp_path / "run" / "checkpoint.pt")).recommend(["1"], 3)
    # A pathlib.Path is a path: kept as its string (it had no .rstrip for dataset_name, and json
    # could not write it).
    dc = DataConfig(format="csv", path=Path("/data/events.csv"))
    assert dc.path == "/data/events.csv" and dc.dataset_name == "events"
    assert RunConfig.from_json(RunConfig(data=dc).to_json()).data == dc


def test_train_run_names_an_unavailable_device_before_any_work(tmp_path):
    from pka_ext.rec import make_synthetic, train_run

    device = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU, or any GPU on a CPU host
    cfg = RunConfig(ModelConfig(max_len=10), TrainConfig(epochs=1, device=device))
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=rf"device {device!r} is not available here"):
        train_run(cfg, str(out), data=make_synthetic(num_users=60, num_items=30, max_len=10))
    assert not out.exists()


@pytest.mark.parametrize("name", ["cpu", "cuda", f"cuda:{torch.cuda.device_count()}", "tpu",
                                  "cuda:x", ""])
def test_cli_config_and_train_run_agree_on_devices(name, tmp_path, capsys):
    """One check (config.device_problem) behind --device, TrainConfig.device (the name only: a
    config travels to other machines) and train_run's check before any work."""
    from pka_ext.rec.cli import build_parser
    from pka_ext.rec.config import device_problem
    from pka_ext.rec.runner import check_device

    problem = device_problem(name)
    argv = ["train", "--device", name, "--out", str(tmp_path / "o")]
    if problem:
        with pytest.raises(SystemExit):
            build_parser().parse_args(argv)
        assert f"argument --device: {problem}" in capsys.readouterr().err
    else:
        assert build_parser().parse_args(argv).device == name
    named = device_problem(name, here=False) is None
    assert named == (name in ("cpu", "cuda", f"cuda:{torch.cuda.device_count()}"))
    if not named:
        with pytest.raises(ValueError, match=r"device must be 'cpu', 'cuda' or 'cuda:N'"):
            TrainConfig(device=name)
        # A config whose device was set after it was checked: named as no device, not as a
        # missing GPU.
        with pytest.raises(ValueError, match=r"TrainConfig.device: expected cpu, cuda or cuda:N"):
            check_device(name)
    elif problem:
        with pytest.raises(ValueError, match=rf"device {name!r} is not available here"):
            check_device(TrainConfig(device=name).device)
    else:
        check_device(TrainConfig(device=name).device)


def test_synthetic_sizes_follow_the_integer_rule():
    """The synthetic process's sizes are integers (a float min_len had been drawn from, a float
    max_len failed inside numpy, a float num_items inside range)."""
    from pka_ext.rec.synthetic import ChainProcess

    process = ChainProcess.draw(6, seed=0)
    for args, name in [((5, True, 4), "min_len"), ((5, 2.5, 4), "min_len"), ((5, 2, 4.5), "max_len")]:
        with pytest.raises(ValueError, match=rf"{name} must be a positive integer"):
            process.sample(*args)
    with pytest.raises(ValueError, match=r"need min_len <= max_len"):
        process.sample(5, 4, 2)
    with pytest.raises(ValueError, match=r"num_items must be an integer >= 2, got 6.0"):
        ChainProcess.draw(6.0)
    with pytest.raises(ValueError, match=r"num_chains must lie in 1..num_items // 2 = 3, got 1.5"):
        ChainProcess.draw(6, num_chains=1.5)
    assert len(process.sample(np.int64(5), np.int64(2), np.int64(4)).sequences) == 5


def test_plot_kernels_without_a_history_as_long_as_max_len_draws_the_kernels(tmp_path, capsys):
    """README: train on the built-in data with the defaults (max_len 50), then plot-kernels. The
    built-in histories have at most 40 items, too few for the attention map, which used to stop
    the command with no picture; the kernels are drawn and the map is left out with a warning."""
    from pka_ext.rec import make_synthetic
    from pka_ext.rec.recommender import save_checkpoint

    data = make_synthetic()
    cfg = RunConfig()  # pka-rec train's defaults
    cfg.model.num_items = data.num_items
    ckpt, png = str(tmp_path / "checkpoint.pt"), str(tmp_path / "kernels.png")
    save_checkpoint(ckpt, SeqRecModel(cfg.model), cfg, data.id_maps())
    with pytest.warns(UserWarning, match=r"no history has at least max_len=50 items \(the "
                                         r"longest has 40\); the mean attention map is left out"):
        cli_main(["plot-kernels", "--checkpoint", ckpt, "--out", png])
    assert os.path.getsize(png) > 10_000
    # A model with no kernels has nothing else to draw: still an error.
    cfg.model = ModelConfig(model="sasrec", num_items=data.num_items)
    save_checkpoint(ckpt, SeqRecModel(cfg.model), cfg, data.id_maps())
    with pytest.raises(SystemExit, match="pka-rec plot-kernels: no history has at least "
                                         "max_len=50 items"):
        cli_main(["plot-kernels", "--checkpoint", ckpt, "--out", png])


@pytest.mark.parametrize("model", ["psa", "sasrec", "rope"])
def test_average_attention_is_the_first_blocks_own_attention(model, monkeypatch):
    """plots.average_attention recomputes block 1's scores from its inputs: they must be the
    queries and keys the forward scores (PSA: keys mixed by A_k; rope: both rotated)."""
    import python_ref
    from pka_ext.rec.plots import average_attention

    torch.manual_seed(0)
    net = SeqRecModel(ModelConfig(model=model, num_items=30, hidden=16, num_heads=2, max_len=6,
                                  dropout=0.0, backend="reference" if model == "psa" else "auto"))
    seen = []
    if model == "psa":
        ref = python_ref.pka_attention

        def spy(q, k, v, a_k, a_v, *args, **kw):
            seen.append((q, a_k.tril() @ k))
            return ref(q, k, v, a_k, a_v, *args, **kw)
        monkeypatch.setattr(python_ref, "pka_attention", spy)
    else:
        sdpa = F.scaled_dot_product_attention

        def spy(q, k, v, **kw):
            seen.append((q, k))
            return sdpa(q, k, v, **kw)
        monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    contexts = [np.random.default_rng(i).integers(1, 31, size=6 + i % 3) for i in range(5)]
    got = average_attention(net, contexts)
    q, k = seen[0]  # block 1, in average_attention's own forward pass
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    s = s.masked_fill(~torch.ones(6, 6, dtype=torch.bool).tril(), -INF)
    np.testing.assert_allclose(got, s.softmax(-1).mean(dim=(0, 1)).numpy(), rtol=1e-5, atol=1e-6)


def test_resuming_a_finished_run_continues_from_its_last_weights_not_its_best(tmp_path, monkeypatch):
    # A finished run's checkpoint held the best epoch's weights as the training state (loading the
    # best weights overwrote the saved state dict's tensors in place), so a resume went on from
    # them with the last epoch's optimiser: not the continuation an uninterrupted run trains.
    import pka_ext.rec.train as train_module

    # Validation NDCG falling every epoch: the best epoch is 1, the last another one.
    scores = iter([0.5, 0.4, 0.3, 0.5, 0.4, 0.3])
    monkeypatch.setattr(train_module, "evaluate", lambda *a, **kw: {"ndcg@10": next(scores)})
    args = ["train", "--format", "synthetic", "--max-len", "10", "--hidden", "16", "--patience",
            "50", "--no-progress"]
    straight, first, resumed = (str(tmp_path / n) for n in ("straight", "first", "resumed"))
    cli_main(args + ["--epochs", "3", "--out", straight])
    cli_main(args + ["--epochs", "2", "--out", first])
    cli_main(args + ["--epochs", "3", "--out", resumed, "--resume",
                     os.path.join(first, "checkpoint.pt")])
    a, b = (torch.load(os.path.join(d, "checkpoint.pt"), weights_only=True)
            for d in (straight, resumed))
    assert a["train_state"]["best_epoch"] == b["train_state"]["best_epoch"] == 1
    assert [h["loss"] for h in a["train_state"]["history"]] == \
        [h["loss"] for h in b["train_state"]["history"]]
    for name, w in a["train_state"]["model_state"].items():  # the last epoch's, for a resume
        assert torch.equal(w, b["train_state"]["model_state"][name]), name
    for name, w in a["model_state"].items():  # the best epoch's, for inference
        assert torch.equal(w, b["model_state"][name]), name


@pytest.mark.parametrize("flags,match", [
    (["--negatives", "64"], "--negatives applies to --loss sampled only"),
    (["--val-start", "0.5"], "--val-start applies to --protocol temporal only"),
    (["--test-start", "0.99"], "--test-start applies to --protocol temporal only"),
    (["--skip-bad"], r"--skip-bad applies to a data file \(--data\) only"),
])
def test_cli_refuses_flags_that_the_run_would_ignore(tmp_path, flags, match):
    # Each was accepted and changed nothing, while metrics.json's config recorded it.
    with pytest.raises(SystemExit, match=f"pka-rec train: {match}$"):
        cli_main(["train", "--epochs", "1", *flags, "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_a_bad_resume_checkpoint_is_an_error_before_any_work(tmp_path, monkeypatch):
    # A mistyped --resume, or a file that is not a checkpoint, failed only once the data had been
    # read and split, leaving an empty output folder behind.
    import pka_ext.rec.runner as runner

    def read(*_):
        raise AssertionError("the data was read")

    monkeypatch.setattr(runner, "load_interactions", read)
    not_a_checkpoint = tmp_path / "notes.pt"
    not_a_checkpoint.write_text("hello")
    out = tmp_path / "o"
    for path, match in ((tmp_path / "missing.pt", "checkpoint not found"),
                        (not_a_checkpoint, "could not be read as a pka-rec-checkpoint/1")):
        with pytest.raises(SystemExit, match=f"pka-rec train: .*{match}"):
            cli_main(["train", "--epochs", "1", "--resume", str(path), "--out", str(out)])
        assert not out.exists()


def test_resuming_with_fewer_epochs_than_were_trained_is_refused(tmp_path):
    # It trained nothing and wrote a metrics.json whose epochs_run exceeded its config's epochs.
    flags = ["train", "--format", "synthetic", "--max-len", "10", "--hidden", "16", "--no-progress"]
    first = str(tmp_path / "first")
    cli_main([*flags, "--epochs", "2", "--out", first])
    ckpt = os.path.join(first, "checkpoint.pt")
    with pytest.raises(SystemExit, match=r"pka-rec train: .* has trained 2 epochs already; "
                                         r"resuming it takes epochs >= 2, got 1"):
        cli_main([*flags, "--epochs", "1", "--resume", ckpt, "--out", str(tmp_path / "again")])
    assert not (tmp_path / "again").exists()


def _unwritable_folder(tmp_path) -> str:
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o500)
    for candidate in (str(folder), "/sys/kernel"):  # root writes into any mode; not into sysfs
        try:
            with open(os.path.join(candidate, "probe"), "w"):
                pass
            os.remove(os.path.join(candidate, "probe"))
        except OSError:
            return candidate
    pytest.skip("no folder that cannot be written to")


def test_an_output_folder_that_cannot_be_written_to_is_an_error_before_any_work(tmp_path,
                                                                                monkeypatch):
    # It failed when the first epoch's checkpoint was saved, with a traceback from torch.save.
    import pka_ext.rec.runner as runner

    def read(*_):
        raise AssertionError("the data was read")

    monkeypatch.setattr(runner, "load_interactions", read)
    out = _unwritable_folder(tmp_path)
    with pytest.raises(SystemExit, match=rf"pka-rec train: \[Errno \d+\] the output folder cannot "
                                         rf"be written to: '{re.escape(out)}'$"):
        cli_main(["train", "--epochs", "1", "--out", out])


def test_a_run_stopped_in_a_folder_of_another_run_leaves_no_stale_metrics(tmp_path, monkeypatch):
    # The folder's metrics.json (another model's) stayed next to the stopped run's checkpoint.
    import pka_ext.rec.train as train_module

    args = ["train", "--format", "synthetic", "--max-len", "10", "--hidden", "16", "--no-progress"]
    out = str(tmp_path / "run")
    cli_main(args + ["--epochs", "1", "--model", "sasrec", "--out", out])
    assert os.path.exists(os.path.join(out, "metrics.json"))
    steps = train_module.train_steps

    def interrupted_in_epoch_2(*a, epoch, **kw):
        if epoch == 2:
            raise KeyboardInterrupt
        return steps(*a, epoch=epoch, **kw)

    monkeypatch.setattr(train_module, "train_steps", interrupted_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        cli_main(args + ["--epochs", "3", "--model", "psa", "--out", out])
    ckpt = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    assert ckpt["config"]["model"]["model"] == "psa" and ckpt["train_state"]["epoch"] == 1
    assert not os.path.exists(os.path.join(out, "metrics.json"))
    # The checkpoint resumes; the finished run writes its metrics.json again.
    monkeypatch.setattr(train_module, "train_steps", steps)
    cli_main(args + ["--epochs", "2", "--model", "psa", "--out", out, "--resume",
                     os.path.join(out, "checkpoint.pt")])
    with open(os.path.join(out, "metrics.json")) as f:
        m = json.load(f)
    assert (m["model"], m["epochs_run"]) == ("psa", 2)
