"""The quality study's cell runner (benchmarks/quality.py): claims, locks, stale cells, resuming."""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import signal
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import quality  # noqa: E402

# Stands in for `pka-rec train`: appends its arguments to calls.txt in the cell's folder.
RECORDER = "import sys; open(sys.argv[1], 'a').write(' '.join(sys.argv[2:]) + '\\n')"


def make_cell(tmp_path, name="c"):
    d = str(tmp_path / name)
    return dict(table="main", dataset="ml-100k", model="psa", variant=None, seed=0, dir=d,
                cmd=[sys.executable, "-c", RECORDER, os.path.join(d, "calls.txt"), "--seed", "0"])


def write_metrics(d, test, *, block="pre_ln", lr=1e-3, epochs=60, history=None, seed=0):
    """metrics.json of a finished run in folder d, as pka-rec writes it (test metrics doubling as
    validation ones)."""
    metrics = {"test": test, "val": test, "best_epoch": 2, "epochs_run": 3, "train_seconds": 1.0,
               "config": {"train": {"epochs": epochs, "lr": lr, "loss": "ce", "seed": seed},
                          "model": {"max_len": 50, "block": block}}}
    if history is not None:
        metrics["history"] = history
    (d / "metrics.json").write_text(json.dumps(metrics))


def write_finished_cell(d, cell, test, **kwargs):
    """cell.json and metrics.json of a finished cell in folder d, as the runner and pka-rec write them."""
    (d / "cell.json").write_text(json.dumps(cell))
    write_metrics(d, test, **kwargs)


def calls(cell):
    path = os.path.join(cell["dir"], "calls.txt")
    return open(path).read().splitlines() if os.path.exists(path) else []


def test_fresh_cell_runs_once(tmp_path):
    cell = make_cell(tmp_path)
    quality.run_cell(cell)
    quality.run_cell(cell)
    quality.run_cell(cell, resume_stale=True)
    assert calls(cell) == ["--seed 0"]
    with open(os.path.join(cell["dir"], "cell.json")) as f:
        assert json.load(f)["rc"] == 0


def test_cell_locked_by_a_live_runner_is_skipped(tmp_path):
    cell = make_cell(tmp_path)
    os.makedirs(cell["dir"])
    fd = os.open(os.path.join(cell["dir"], "claimed"), os.O_CREAT | os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        quality.run_cell(cell, resume_stale=True)
    finally:
        os.close(fd)
    assert calls(cell) == []


@pytest.mark.parametrize("checkpoint", [False, True])
def test_stale_cell_is_resumed_only_when_asked(tmp_path, capsys, checkpoint):
    cell = make_cell(tmp_path)
    os.makedirs(cell["dir"])
    with open(os.path.join(cell["dir"], "claimed"), "w") as f:
        f.write("12345\n")  # a runner that died without finishing
    ckpt = os.path.join(cell["dir"], "checkpoint.pt")
    if checkpoint:
        open(ckpt, "w").close()
    quality.run_cell(cell)
    assert calls(cell) == [] and "--resume-stale" in capsys.readouterr().out
    quality.run_cell(cell, resume_stale=True)
    assert calls(cell) == (["--seed 0 --resume " + ckpt] if checkpoint else ["--seed 0"])
    assert os.path.exists(os.path.join(cell["dir"], "cell.json"))


def test_finished_cell_without_record_is_adopted(tmp_path):
    cell = make_cell(tmp_path)
    os.makedirs(cell["dir"])
    open(os.path.join(cell["dir"], "claimed"), "w").close()
    write_metrics(tmp_path / "c", {})
    assert quality.run_cell(cell, resume_stale=True)
    assert calls(cell) == []
    with open(os.path.join(cell["dir"], "cell.json")) as f:
        assert json.load(f)["wall_seconds"] is None


def test_folder_holding_a_run_with_other_settings_is_neither_run_nor_recorded(tmp_path, capsys):
    cell = make_cell(tmp_path)
    cell["cmd"] += ["--lr", "0.001"]
    os.makedirs(cell["dir"])
    write_metrics(tmp_path / "c", {}, lr=3e-4)
    assert not quality.run_cell(cell, resume_stale=True)
    assert calls(cell) == [] and not os.path.exists(os.path.join(cell["dir"], "cell.json"))
    assert "--lr 0.0003 (asked: 0.001)" in capsys.readouterr().out


def test_adopt_refuses_a_run_with_other_settings(tmp_path):
    args = argparse.Namespace(table="small", seeds=[0], models=["psa"], datasets=["ml-100k"],
                              max_len=None, loss="ce", block="pre_ln", lr=1e-3, epochs=100,
                              patience=10, out=str(tmp_path), variants=None, grid_lr=None)
    (cell,) = quality.cells(args)
    os.makedirs(cell["dir"])
    config = {"model": {"model": "psa", "max_len": 50, "hidden": 128, "num_blocks": 2, "block": "pre_ln"},
              "train": {"seed": 0, "batch_size": 128, "lr": 1e-3, "epochs": 60, "patience": 10,
                        "loss": "ce"}}
    with open(os.path.join(cell["dir"], "metrics.json"), "w") as f:
        json.dump({"config": config}, f)
    with pytest.raises(SystemExit, match="not adopted"):
        quality.cmd_adopt(args)  # trained for 60 epochs, asked for 100
    assert not os.path.exists(os.path.join(cell["dir"], "cell.json"))
    args.epochs = 60
    quality.cmd_adopt(args)
    with open(os.path.join(cell["dir"], "cell.json")) as f:
        assert "--epochs 60 " in json.load(f)["command"]


def test_recorded_command_names_the_data_under_shared_data(monkeypatch):
    monkeypatch.setattr(quality, "DATA", "/srv/data/")
    cmd = [sys.executable, "-m", "pka_ext.rec", "train", "--data", "/srv/data/ml-100k/ml-100k.inter",
           "--name", "data"]
    assert quality.recorded_command(cmd) == \
        "pka-rec train --data ../shared/data/ml-100k/ml-100k.inter --name data"


def test_tune_table_leaves_out_the_rate_each_model_ran_in_the_main_table(tmp_path):
    args = argparse.Namespace(table="tune", seeds=[0], models=["psa", "rope"], datasets=["LastFM"],
                              max_len=None, loss="ce", block="pre_ln", lr=None, epochs=100,
                              patience=10, out=str(tmp_path), variants=None, grid_lr=None)
    lrs = {(c["model"], c["variant"]) for c in quality.cells(args)}
    assert lrs == {("psa", "lr 0.001"), ("psa", "lr 0.003"), ("rope", "lr 0.0003"), ("rope", "lr 0.003")}
    args.lr = 3e-3
    assert {v for _, v in {(c["model"], c["variant"]) for c in quality.cells(args)}} == {"lr 0.0003", "lr 0.001"}


# A runner with two cells whose training (a stand-in) writes its pid and sleeps.
STOPPED_RUNNER = """
import json, os, sys
sys.path.insert(0, sys.argv[1])
import quality
sleeper = "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(600)"
cells = [dict(table="main", dataset="d", model="psa", variant=None, seed=s,
              dir=os.path.join(sys.argv[2], f"seed{s}"),
              cmd=[sys.executable, "-c", sleeper, os.path.join(sys.argv[2], f"pid{s}")])
         for s in (0, 1)]
quality.run_cells(cells, jobs=2, resume_stale=False)
"""


def start_runner(tmp_path):
    """A runner process on STOPPED_RUNNER's two cells, once both stand-ins run: (runner, their pids)."""
    bench = os.path.dirname(os.path.abspath(quality.__file__))
    runner = subprocess.Popen([sys.executable, "-c", STOPPED_RUNNER, bench, str(tmp_path)])
    pid_files = [tmp_path / f"pid{s}" for s in (0, 1)]
    deadline = time.monotonic() + 60
    while not all(p.exists() and p.read_text() for p in pid_files):
        assert runner.poll() is None and time.monotonic() < deadline, "the cells did not start"
        time.sleep(0.05)
    return runner, [int(p.read_text()) for p in pid_files]


def kill(pids):
    """A failed test must not leave the stand-ins sleeping."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stopped_runner_stops_its_cells_and_leaves_them_stale(tmp_path, sig):
    runner, children = start_runner(tmp_path)
    runner.send_signal(sig)
    try:
        assert runner.wait(timeout=60) != 0
        for pid in children:
            with pytest.raises(ProcessLookupError):  # reaped by the runner: gone
                os.kill(pid, 0)
    finally:
        runner.kill()
        kill(children)
    for s in (0, 1):
        cell_dir = tmp_path / f"seed{s}"
        assert not (cell_dir / "cell.json").exists()  # not recorded as finished
        assert (cell_dir / "claimed").read_text().strip()  # stale: --resume-stale continues it


def test_training_of_a_killed_runner_keeps_its_cell(tmp_path):
    """SIGKILL leaves the runner no chance to stop its cells; their training holds the lock too, so a
    --resume-stale runner does not start a second training of the same cell beside it."""
    runner, children = start_runner(tmp_path)
    runner.kill()
    runner.wait()
    try:
        cell = make_cell(tmp_path, "seed0")
        assert quality.run_cell(cell, resume_stale=True)
        assert calls(cell) == []
    finally:
        kill(children)


def test_report_merges_an_earlier_report_and_replaces_cells_run_again(tmp_path):
    import torch

    with open(os.path.join(os.path.dirname(quality.__file__), "results", "quality.json")) as f:
        earlier = json.load(f)["cells"][:3]  # Beauty psa seeds 0-2
    oldest = dict(date="2026-01-01", torch="2.11.0", python="3.12.3", cpu="Oldest CPU", cpu_count=16,
                  torch_threads=1)
    older = dict(oldest, date="2026-02-02", cpu="Older CPU", cpu_count=2)
    (tmp_path / "earlier.json").write_text(json.dumps({
        "environment": dict(older, earlier_environments=[oldest]), "cells": earlier}))
    again = earlier[1]
    # Its folder spelled differently from the earlier report's: rows match on what the cell ran.
    cell_dir = tmp_path / again["command"].rsplit("--out ", 1)[1].split()[0].replace("runs/quality", "./runs")
    cell_dir.mkdir(parents=True)
    keys = ("table", "dataset", "model", "variant", "seed", "command", "wall_seconds", "rc")
    test = {"ndcg@10": 0.5, "hr@10": 0.6, "cov@10": 0.7}
    write_finished_cell(cell_dir, {k: again[k] for k in keys}, test, lr=again["lr"])
    torch.save({"train_state": {"history": [{"val_ndcg@10": v} for v in (0.1, 0.5, 0.4)]}},
               cell_dir / "checkpoint.pt")
    results = tmp_path / "results"
    quality.cmd_report(argparse.Namespace(out=str(tmp_path / "runs"), results=str(results),
                                          summary=None, merge=str(tmp_path / "earlier.json")))
    with open(results / "quality.json") as f:
        merged = json.load(f)
    cells = merged["cells"]
    assert merged["environment"]["legacy_cell_machines"] == [older, oldest]  # one flat list
    assert [c["seed"] for c in cells] == [0, 1, 2]  # the study's order, not the merge's
    # Rows of reports older than the block setting were all pre-LN, and say so once merged.
    assert cells[0] == {"block": "pre_ln"} | earlier[0] and cells[2] == {"block": "pre_ln"} | earlier[2]
    assert cells[1]["test"] == test and cells[1]["val_curve"] == [0.1, 0.5, 0.4]
    md = (results / "quality.md").read_text()
    mean = (earlier[0]["test"]["ndcg@10"] + 0.5 + earlier[2]["test"]["ndcg@10"]) / 3
    assert f"| psa | {again['lr']:g} | 3 | {mean:.4f} ± " in md
    assert ("Machines: cells recorded without their machine ran on Older CPU (2 cores), torch 2.11.0 "
            "(reports of 2026-02-02); Oldest CPU (16 cores), torch 2.11.0 (reports of 2026-01-01).") in md


def test_report_names_the_machines_the_cells_ran_on_not_the_one_writing_it(tmp_path):
    ran = dict(date="2026-03-03", torch="2.11.0", python="3.12.3", cpu="Cell CPU", cpu_count=16,
               torch_threads=1)
    d = tmp_path / "runs" / "main" / "ml-100k" / "psa" / "seed0"
    d.mkdir(parents=True)
    cell = {"table": "main", "dataset": "ml-100k", "model": "psa", "variant": None, "seed": 0,
            "command": "pka-rec train --protocol temporal --out x", "wall_seconds": 1.0, "rc": 0,
            "machine": ran}
    write_finished_cell(d, cell, {"ndcg@10": 0.5, "hr@10": 0.5, "cov@10": 0.5}, history=[])
    results = tmp_path / "results"
    for merge in (None, str(results / "first.json")):  # and once more, merging its own report
        quality.cmd_report(argparse.Namespace(out=str(tmp_path / "runs"), results=str(results),
                                              summary=None, merge=merge))
        os.replace(results / "quality.json", results / "first.json")
        md = (results / "quality.md").read_text()
        assert "Machines: cells ran on Cell CPU (16 cores), torch 2.11.0 (runs finished 2026-03-03). " in md


def test_report_reads_the_learning_curve_from_metrics_json(tmp_path):
    cell = {"table": "main", "dataset": "Beauty", "model": "psa", "variant": None, "seed": 0,
            "command": "pka-rec train ...", "wall_seconds": 1.0, "rc": 0}
    write_finished_cell(tmp_path, cell, {"ndcg@10": 0.5}, history=[
        {"epoch": e, "val_ndcg@10": v} for e, v in ((1, 0.2), (2, 0.5), (3, 0.3))])
    (row,) = quality._collect(str(tmp_path))  # no checkpoint.pt: the curve comes from metrics.json
    assert row["val_curve"] == [0.2, 0.5, 0.3] and row["best_epoch"] == 2


def test_ablation_variants_select_cells_by_index(tmp_path):
    args = argparse.Namespace(table="ablation", seeds=[0, 2], variants=[0, len(quality.ABLATIONS) - 1],
                              max_len=None, loss="ce", block="pre_ln", lr=1e-3, epochs=100,
                              patience=10,
                              out=str(tmp_path))
    chosen = quality.cells(args)
    assert [(c["variant"], c["seed"]) for c in chosen] == [
        (quality.ABLATIONS[0][0], 0), (quality.ABLATIONS[0][0], 2),
        (quality.ABLATIONS[-1][0], 0), (quality.ABLATIONS[-1][0], 2)]
    assert chosen[-1]["cmd"][-2:] == ["--block", "authors"]
    assert chosen[-1]["dir"] == os.path.join(str(tmp_path), "ablation", f"v{len(quality.ABLATIONS) - 1}",
                                             "seed2")
    args.variants = None
    assert len(quality.cells(args)) == 2 * len(quality.ABLATIONS)


def test_authors_block_cells_form_their_own_table(tmp_path):
    args = argparse.Namespace(table="small", seeds=[0], models=["psa", "nope"], datasets=["ml-100k"],
                              max_len=None, loss="ce", block="authors", lr=None, epochs=100,
                              patience=10, out=str(tmp_path), variants=None)
    chosen = quality.cells(args)
    assert [c["dir"] for c in chosen] == [os.path.join(str(tmp_path), "main", "ml-100k-authors", m, "seed0")
                                          for m in ("psa", "nope")]
    assert all(c["cmd"][c["cmd"].index("--block") + 1] == "authors" for c in chosen)
    args.block = "pre_ln"
    assert all("--block" not in c["cmd"] for c in quality.cells(args))
    assert quality.setting_text(50, "sampled", "authors", negatives=False) == \
        "max-len 50, sampled softmax, authors' blocks"
    args.table, args.variants = "ablation", None
    args.block = "authors"
    with pytest.raises(SystemExit, match="--block"):
        quality.cells(args)


def test_report_puts_each_block_in_its_own_table_pre_ln_first(tmp_path):
    for block, ndcg in (("authors", 0.25), ("pre_ln", 0.5)):
        folder = "ml-100k" + ("-authors" if block == "authors" else "")
        d = tmp_path / "runs" / "main" / folder / "psa" / "seed0"
        d.mkdir(parents=True)
        cell = {"table": "main", "dataset": "ml-100k", "model": "psa", "variant": None, "seed": 0,
                "command": f"pka-rec train --protocol temporal --out runs/quality/main/{folder}/psa/seed0",
                "wall_seconds": 1.0, "rc": 0}
        write_finished_cell(d, cell, {"ndcg@10": ndcg, "hr@10": ndcg, "cov@10": ndcg}, block=block,
                            epochs=100, history=[{"epoch": 1, "val_ndcg@10": ndcg}])
    results = tmp_path / "results"
    quality.cmd_report(argparse.Namespace(out=str(tmp_path / "runs"), results=str(results),
                                          summary=None, merge=None))
    md = (results / "quality.md").read_text()
    tables = [line for line in md.splitlines() if line.startswith(("## ml-100k", "| psa"))]
    assert tables == ["## ml-100k (temporal, max-len 50)", "| psa | 0.001 | 1 | 0.5000 | 0.5000 | 0.5000 | 2 | 3 |",
                      "## ml-100k (temporal, max-len 50, authors' blocks)",
                      "| psa | 0.001 | 1 | 0.2500 | 0.2500 | 0.2500 | 2 | 3 |"]
    assert (results / "quality_val_curves_ml-100k_authors.png").exists()
