"""The CPU benchmarks' methodology (benchmarks/bench_cpu_op.py, bench_epoch.py, speed_report.py),
at tiny sizes: what they check before timing, what their peak memory counts, what they record."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "benchmarks")


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(BENCH)
    import bench_cpu_op

    return bench_cpu_op


def _clear_refs_works() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _clear_refs_works(), reason="needs Linux's /proc/self/clear_refs")
@pytest.mark.parametrize("impl", ["pka", "composition", "reference"])
def test_peak_memory_leaves_out_the_first_call_one_time_costs(impl):
    """At B=H=1, T=d=2 the tensors are a few bytes: the peak RSS growth of one fwd+bwd must be
    about nothing. Measured on a fresh process's first call it was 39-44 MiB (code loaded, thread
    pools, caches), which every published peak figure carried."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, os.path.join(BENCH, "bench_cpu_op.py"), "--memory-child", impl,
                          "--shape", "1", "1", "2", "2"], capture_output=True, text=True, env=env,
                         check=True)
    peak = json.loads(res.stdout.strip().splitlines()[-1])["peak_mib"]
    assert peak < 4, f"{impl}: {peak:.1f} MiB for a fwd+bwd of a few bytes"


def _ignores_padding(q, k, v, a_k, a_v, lengths):
    from attention_impls import composition

    return composition(q, k, v, a_k, a_v, torch.full_like(lengths, q.shape[2]))


def _no_grad_to_a_k(q, k, v, a_k, a_v, lengths):
    from attention_impls import composition

    return composition(q, k, v, a_k.detach() + 0 * a_k, a_v, lengths)


@pytest.mark.parametrize("wrong", [_ignores_padding, _no_grad_to_a_k], ids=["padding", "grad_a_k"])
def test_time_case_refuses_implementations_that_disagree(bench, monkeypatch, wrong):
    """The three implementations are checked against each other (output and the gradients w.r.t.
    q, k, v, a_k and a_v) at the timed shape before anything is timed."""
    torch.set_num_threads(1)
    monkeypatch.setitem(bench.IMPLS, "composition", wrong)
    with pytest.raises(RuntimeError, match="composition does not compute what python_ref does"):
        bench.time_case(4, 1, 8, 4, repeats=2)


def test_time_case_times_agreeing_implementations(bench):
    torch.set_num_threads(1)
    row = bench.time_case(4, 2, 8, 4, repeats=3)
    for name in ("pka", "reference", "composition"):
        r = row[name]
        assert r["fwd_ms"] > 0 and r["bwd_ms"] > 0 and r["fwd_bwd_ms"] > 0
        q1, q3 = r["fwd_bwd_iqr_ms"]
        assert q1 <= r["fwd_bwd_ms"] <= q3


def test_op_results_record_the_command_and_repeats(bench, monkeypatch, tmp_path):
    """The JSON (which speed_report.py folds into speed.md) names the command with its flags and
    the number of rounds; the markdown's command is the one that was run, not a fixed string."""
    import speed_report

    torch.set_num_threads(1)
    monkeypatch.setattr(sys, "argv", ["bench_cpu_op.py", "--repeats", "2", "--batch", "2", "--heads", "1",
                                      "--no-memory", "--out", str(tmp_path)])
    bench.main()
    run = json.loads((tmp_path / "cpu_op.json").read_text())
    command = "python benchmarks/bench_cpu_op.py --repeats 2 --batch 2 --heads 1 --no-memory"
    assert run["command"] == command and run["repeats"] == 2
    assert {"date", "torch", "cpu", "torch_threads"} <= set(run["machine"])
    assert f"Command: `{command}`" in (tmp_path / "cpu_op.md").read_text()
    monkeypatch.setattr(speed_report, "RESULTS", str(tmp_path))
    assert any(f"`{command}`" in line and "median of 2 runs" in line
               for line in speed_report.cpu_op_section(run))


def test_op_refuses_fewer_than_two_repeats_before_timing(bench, monkeypatch, tmp_path):
    """One round has no quartiles: statistics.quantiles raised after all the timing, writing
    nothing."""
    monkeypatch.setattr(sys, "argv", ["bench_cpu_op.py", "--repeats", "1", "--batch", "1", "--heads", "1",
                                      "--no-memory", "--out", str(tmp_path)])
    monkeypatch.setattr(bench, "time_case", lambda *a: pytest.fail("timed with one repeat"))
    with pytest.raises(SystemExit):
        bench.main()


def test_epoch_results_record_the_command(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(BENCH)
    import bench_epoch
    import speed_report

    torch.set_num_threads(1)
    data = tmp_path / "tiny.txt"
    data.write_text("".join(f"{u} " + " ".join(str(1 + (u + i) % 9) for i in range(6)) + "\n"
                            for u in range(1, 13)))
    monkeypatch.setattr(sys, "argv", ["bench_epoch.py", "--data", str(data), "--epochs", "1",
                                      "--out", str(tmp_path)])
    bench_epoch.main()
    run = json.loads((tmp_path / "epoch_cpu.json").read_text())
    command = f"python benchmarks/bench_epoch.py --data {data} --epochs 1"
    assert run["command"] == command
    assert [h["epoch"] for h in run["epochs"]["psa"]] == [1]
    assert any(f"`{command}`" in line for line in speed_report.train_section(None, run))
