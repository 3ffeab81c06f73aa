"""The quality study's cell runner (benchmarks/quality.py): claims, locks, stale cells, resuming."""

from __future__ import annotations

import fcntl
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import quality  # noqa: E402

# Stands in for `pka-rec train`: appends its arguments to calls.txt in the cell's folder.
RECORDER = "import sys; open(sys.argv[1], 'a').write(' '.join(sys.argv[2:]) + '\\n')"


def make_cell(tmp_path, name="c"):
    d = str(tmp_path / name)
    return dict(table="main", dataset="ml-100k", model="psa", variant=None, seed=0, dir=d,
                cmd=[sys.executable, "-c", RECORDER, os.path.join(d, "calls.txt"), "--seed", "0"])


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
    open(os.path.join(cell["dir"], "metrics.json"), "w").close()
    quality.run_cell(cell, resume_stale=True)
    assert calls(cell) == []
    with open(os.path.join(cell["dir"], "cell.json")) as f:
        assert json.load(f)["wall_seconds"] is None
