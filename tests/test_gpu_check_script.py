"""benchmarks/gpu_check.sh without a GPU: its steps replaced by stand-ins, its bookkeeping checked
(what comes back from a device call: two files, a summary of every step, the budget honoured)."""

from __future__ import annotations

import os
import subprocess
import tarfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "gpu_check.sh")
STEPS = ("build", "tests", "error_stack", "memcheck", "racecheck", "bench_op", "bench_train",
         "bench_train_amp", "ncu", "sass")


def run_check(tmp_path, python, budget):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=python, COMPUTE_SANITIZER="true", NCU="true", CUOBJDUMP="true",
               PKA_GPU_CHECK_BUDGET=str(budget))
    subprocess.run(["bash", SCRIPT, str(out)], env=env, check=True, capture_output=True, timeout=120)
    summary = (out / "summary.txt").read_text().splitlines()
    with tarfile.open(out / "gpu_check.tar.gz") as tar:
        names = {os.path.basename(n) for n in tar.getnames()}
    return sorted(os.listdir(out)), summary, names


def test_every_step_reported_in_two_files(tmp_path):
    files, summary, names = run_check(tmp_path, "true", 100)
    assert files == ["gpu_check.tar.gz", "summary.txt"]  # the device tool returns at most 8
    assert [line.split()[0] for line in summary] == [*STEPS, "total"]
    assert all(" rc=0 " in line for line in summary[:-1])
    assert {"machine.txt", "summary.txt", *(f"{s}.log" for s in STEPS)} <= names


def test_budget_skips_the_remaining_steps(tmp_path):
    slow = tmp_path / "slow_python"
    slow.write_text("#!/bin/sh\nsleep 5\n")
    slow.chmod(0o755)
    # The machine lines (two python calls), the xdist probe and the build take 5 s each: 20 s of a
    # 39 s budget leave 19 s, enough for the tests step (5 s, runs while at least 15 s are left);
    # after it 14 s are left, so the rest is skipped. Up to 4 s of overhead keep the same outcome.
    _, summary, names = run_check(tmp_path, str(slow), 39)
    assert summary[0].startswith("build rc=0") and summary[1].startswith("tests rc=0")
    assert all(line.endswith("skipped (budget of 39s spent)") for line in summary[2:-1])
    assert "tests.log" in names and "memcheck.log" not in names


def test_sass_mix_counts_opcodes(tmp_path):
    """benchmarks/sass_mix.sh on a stand-in cuobjdump: one count per opcode, predicates skipped."""
    fake = tmp_path / "cuobjdump"
    fake.write_text("#!/bin/sh\ncat <<'SASS'\n"
                    "        /*0000*/                   LDC R1, c[0x0][0x28] ;\n"
                    "        /*0010*/              @!P0 LDSM.16.M88.4 R4, [R2] ;\n"
                    "        /*0a20*/                   LDSM.16.M88.4 R8, [R3+0x100] ;\n"
                    "        /*0a30*/                   HMMA.16816.F32.BF16 R12, R4, R8, R12 ;\n"
                    "        /*0a40*/                   EXIT ;\n"
                    "SASS\n")
    fake.chmod(0o755)
    lib = tmp_path / "lib.so"
    lib.write_bytes(b"")
    run = subprocess.run(["bash", os.path.join(REPO, "benchmarks", "sass_mix.sh"), str(lib)],
                         env=dict(os.environ, CUOBJDUMP=str(fake)), capture_output=True, text=True,
                         check=True, timeout=60)
    blocks = run.stdout.split("== ")[1:]
    assert len(blocks) == 2  # the forward and the backward kernel
    counts = {line.split()[1]: int(line.split()[0]) for line in blocks[0].splitlines()[1:]}
    assert counts == {"LDSM.16.M88.4": 2, "LDC": 1, "HMMA.16816.F32.BF16": 1, "EXIT": 1}
