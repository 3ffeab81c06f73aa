"""benchmarks/gpu_check.sh without a GPU: its steps replaced by stand-ins, its bookkeeping checked
(what comes back from a device call: two files, a summary of every step, the budget honoured)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "gpu_check.sh")
STEPS = ("build", "tests", "memcheck", "racecheck", "bench_op", "bench_train", "bench_train_amp",
         "ncu", "sass", "memcheck_long", "triage", "error_stack")


def run_check(tmp_path, python, budget, **extra_env):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=python, COMPUTE_SANITIZER="true", NCU="true", CUOBJDUMP="true",
               PKA_GPU_CHECK_BUDGET=str(budget), **extra_env)
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
    # Every python call of the check advances its clock by 5 s (no waiting: the clock is a file).
    clock = tmp_path / "clock"
    clock.write_text("0")
    slow = tmp_path / "slow_python"
    slow.write_text(f"#!/bin/sh\necho $(( $(cat {clock}) + 5 )) > {clock}\n")
    slow.chmod(0o755)
    # The machine lines (two python calls), the xdist and pytest-timeout probes and the build take
    # 5 s each: 25 s of a 44 s budget leave 19 s, enough for the tests step (5 s, runs while at
    # least 15 s are left); after it 14 s are left, so the rest is skipped.
    _, summary, names = run_check(tmp_path, str(slow), 44, PKA_GPU_CHECK_CLOCK=str(clock))
    assert summary[0] == "build rc=0 5s" and summary[1] == "tests rc=0 5s"
    assert all(line.endswith("skipped (budget of 44s spent)") for line in summary[2:-1])
    assert "tests.log" in names and "memcheck.log" not in names


def test_hung_tests_and_cut_steps_leave_their_reports(tmp_path):
    """The commands the check runs, seen through a stand-in python and timeout that log them:
    pytest-timeout's thread method (a test stuck behind a hung kernel waits inside a CUDA call,
    where the signal method's SIGALRM handler never runs); 20 s from SIGINT to KILL for the tests
    (after SIGINT xdist waits up to 10 s for a stuck worker before the junit report is written);
    and the triage's deadline taken from its step's limit, which the budget cut to 40 s here (with
    the fixed 75 s deadline the step's timeout ended the triage before it wrote anything)."""
    clock, calls = tmp_path / "clock", tmp_path / "calls"
    clock.write_text("0")
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\necho "PKA_STEP_LIMIT=${{PKA_STEP_LIMIT:-}} $*" >> {calls}\n'
                      f"echo $(( $(cat {clock}) + 5 )) > {clock}\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "timeout").write_text(f'#!/bin/sh\necho "timeout $*" >> {calls}\n'
                                     f'exec {shutil.which("timeout")} "$@"\n')
    for f in (python, bin_dir / "timeout"):
        f.chmod(0o755)
    # 5 s per python call: the machine lines and the two probes (20 s), then build, tests, bench_op,
    # bench_train and bench_train_amp: 45 s of an 85 s budget when the triage starts.
    _, summary, _ = run_check(tmp_path, str(python), 85, PKA_GPU_CHECK_CLOCK=str(clock),
                              PATH=f"{bin_dir}:{os.environ['PATH']}")
    assert [line.split()[0] for line in summary] == [*STEPS, "total"]
    lines = calls.read_text().splitlines()
    pytest_call = next(line for line in lines if " -m pytest " in line and "PKA_STEP_LIMIT=" in line)
    assert " -n 8 --timeout 120 --timeout-method thread " in pytest_call
    assert any(line.startswith("timeout -k 20 -s INT 60 env OMP_NUM_THREADS=2 ") for line in lines)
    triage = next(line for line in lines if "triage_failures.py" in line and "PKA_STEP_LIMIT=" in line)
    assert triage.startswith("PKA_STEP_LIMIT=40 ") and "--deadline" not in triage


def test_a_failed_build_ends_the_check_with_its_results_packed(tmp_path):
    files, summary, names = run_check(tmp_path, "false", 100)
    assert files == ["gpu_check.tar.gz", "summary.txt"]
    assert summary[0].startswith("build rc=1 ")
    assert summary[1].startswith("total ") and summary[1].endswith("(build failed: no further steps)")
    assert len(summary) == 2 and {"machine.txt", "build.log"} <= names


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


def test_triage_finds_the_switch_a_failure_depends_on(tmp_path):
    """benchmarks/triage_failures.py on stand-in tests that pass only under one switch each."""
    (tmp_path / "test_stand_in.py").write_text(
        "import os\n"
        "def test_needs_four_warps():\n"
        "    assert os.environ.get('PKA_FWD_WARPS') == '4'\n"
        "def test_fine():\n"
        "    pass\n"
        "class TestPath:\n"
        "    def test_needs_unfused(self):\n"
        "        assert os.environ.get('PKA_CUDA_UNFUSED') == '1'\n")
    junit = tmp_path / "junit.xml"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PKA_")}
    first = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            f"--junitxml={junit}", "test_stand_in.py"], cwd=tmp_path, env=env,
                           capture_output=True, timeout=120)
    assert first.returncode == 1
    out = tmp_path / "triage"
    subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "triage_failures.py"), str(junit),
                    "--out", str(out), "--root", str(tmp_path)], env=env, check=True,
                   capture_output=True, timeout=300)
    report = json.loads((out / "triage.json").read_text())
    four, unfused = "test_stand_in.py::test_needs_four_warps", "test_stand_in.py::TestPath::test_needs_unfused"
    assert report["failed"] == [four, unfused]
    passed = {variant: set(r["passed"]) for variant, r in report["results"].items()}
    assert passed["as run"] == set()
    assert passed["fwd 4 warps"] == {four} and passed["unfused"] == {unfused}
    assert all(not p for v, p in passed.items() if v not in ("fwd 4 warps", "unfused"))
    assert "| TestPath::test_needs_unfused | FAIL | pass |" in (out / "triage.md").read_text()


def _one_failed_test(tmp_path, name, body):
    """A test module holding test ``name`` with ``body``, a junit report saying it failed, the
    triage's output folder and an environment without the kernel switches."""
    (tmp_path / f"{name}.py").write_text(f"def {name}():\n{body}")
    junit = tmp_path / "junit.xml"
    junit.write_text(f'<testsuites><testsuite><testcase classname="{name}" name="{name}">'
                     '<failure message="timeout"/></testcase></testsuite></testsuites>')
    env = {k: v for k, v in os.environ.items() if not k.startswith("PKA_")}
    return junit, tmp_path / "triage", env


def test_triage_cuts_hung_variants_at_one_shared_deadline(tmp_path):
    junit, out, env = _one_failed_test(tmp_path, "test_hangs", "    import time\n    time.sleep(120)\n")
    # With one wait per variant (each test sleeps 120 s) the run would not end within the guard.
    subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "triage_failures.py"), str(junit),
                    "--out", str(out), "--root", str(tmp_path), "--deadline", "5"], env=env,
                   check=True, capture_output=True, timeout=90)
    report = json.loads((out / "triage.json").read_text())
    assert {r["rc"] for r in report["results"].values()} == {"timeout"}
    assert "| exit code | timeout | timeout |" in (out / "triage.md").read_text()


def test_triage_ends_variants_stuck_in_a_cuda_call_at_one_deadline(tmp_path):
    """A test stuck behind a hung kernel waits in a CUDA call, deaf to SIGINT (stood in for by a
    second lock of a pthread mutex, which blocks in C with the GIL released). The ten variants
    share one 10 s grace after the deadline; waited for one after another they took 10 x 10 s,
    past the triage step's limit."""
    junit, out, env = _one_failed_test(
        tmp_path, "test_stuck",
        "    import ctypes\n"
        "    libc, mutex = ctypes.CDLL(None), ctypes.create_string_buffer(64)\n"
        "    libc.pthread_mutex_lock(mutex)\n"
        "    libc.pthread_mutex_lock(mutex)\n")
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "benchmarks", "triage_failures.py"),
                             str(junit), "--out", str(out), "--root", str(tmp_path), "--deadline", "3"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the triage and its stuck variants
        proc.wait()
        pytest.fail("the triage did not end within 60 s of a 3 s deadline")
    report = json.loads((out / "triage.json").read_text())
    assert {r["rc"] for r in report["results"].values()} == {"timeout"}


def test_triage_deadline_follows_its_step_limit(tmp_path):
    """Run as gpu_check.sh runs it when the budget cuts the triage step to 20 s: its deadline is
    that limit less 15 s, so it writes its report before the step's timeout ends it."""
    junit, out, env = _one_failed_test(tmp_path, "test_hangs", "    import time\n    time.sleep(120)\n")
    run = subprocess.run(["timeout", "-k", "5", "-s", "TERM", "20", sys.executable,
                          os.path.join(REPO, "benchmarks", "triage_failures.py"), str(junit),
                          "--out", str(out), "--root", str(tmp_path)],
                         env=dict(env, PKA_STEP_LIMIT="20"), capture_output=True, timeout=60)
    assert run.returncode == 0, run.stdout[-2000:]
    assert (out / "triage.json").exists()


def test_triage_skips_collection_errors(tmp_path):
    junit = tmp_path / "junit.xml"
    junit.write_text('<testsuites><testsuite><testcase classname="" name="tests.test_cuda">'
                     '<error message="collection failure"/></testcase></testsuite></testsuites>')
    run = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "triage_failures.py"),
                          str(junit), "--out", str(tmp_path / "o")], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0 and "nothing to triage" in run.stdout


def test_triage_without_failures_is_quiet(tmp_path):
    junit = tmp_path / "junit.xml"
    junit.write_text('<testsuites><testsuite><testcase classname="tests.test_gpu_check_script" name="t"/></testsuite></testsuites>')
    run = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "triage_failures.py"), str(junit),
                          "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and "nothing to triage" in run.stdout
    assert not (tmp_path / "o").exists()


def test_bench_gpu_keeps_the_main_table_when_a_variant_fails(tmp_path, monkeypatch):
    """bench_gpu.py without a GPU: timings stubbed, the first variant timing fails as a sticky
    CUDA error would; every shape's fused, unfused and composition times are already written."""
    monkeypatch.syspath_prepend(os.path.join(REPO, "benchmarks"))
    import bench_gpu

    calls = []

    class StubTimer:
        def __init__(self, repeats):
            pass

        def __call__(self, fn):
            calls.append(fn)
            if len(calls) > 6 * len(bench_gpu.SHAPES):  # fwd and fwd+bwd of the 3 main ones
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            return 1.0

    real_make_inputs = bench_gpu.make_inputs
    monkeypatch.setattr(bench_gpu, "Timer", StubTimer)
    monkeypatch.setattr(bench_gpu, "copy_bandwidth", lambda timer: 4e12)
    monkeypatch.setattr(bench_gpu, "make_inputs",
                        lambda B, H, T, d, **kw: real_make_inputs(1, 1, 2, 2, dtype=kw["dtype"]))
    monkeypatch.setattr(bench_gpu.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench_gpu, "cuda_usable", lambda: False)  # the error is sticky
    monkeypatch.setattr(bench_gpu, "machine_info", lambda: {"gpu": "stub", "torch": "stub",
                                                            "python": "stub", "date": "stub"})
    monkeypatch.setattr(sys, "argv", ["bench_gpu.py", "--out", str(tmp_path)])
    with pytest.raises(RuntimeError, match="illegal memory access"):
        bench_gpu.main()
    rows = json.loads((tmp_path / "gpu_op_bfloat16.json").read_text())["rows"]
    assert [(r["T"], r["d"]) for r in rows] == [(s["T"], s["d"]) for s in bench_gpu.SHAPES]
    assert all(r["fwdbwd_ms_composition"] == 1.0 and "fwd_ms_fwd4" not in r for r in rows)
    md = (tmp_path / "gpu_op_bfloat16.md").read_text()
    assert f"Partial: {len(rows)} of {len(rows)} shapes in the main table, 0 with their variants." in md


def test_train_step_batch_has_targets_only_at_real_inputs(monkeypatch):
    """bench_train_step.py's batch as training lays it out (pka_ext.rec.train.training_arrays): a
    target at every real input position and nowhere else, each the next input; input lengths
    uniform in [1, T]. (Its batch had one extra target per sequence, at the padded position before
    the first item.)"""
    monkeypatch.syspath_prepend(os.path.join(REPO, "benchmarks"))
    import bench_train_step

    x, y = bench_train_step.make_batch(128, 50, 12101)
    assert x.shape == y.shape == (128, 50) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x != 0, y != 0)
    both = (x[:, 1:] != 0) & (y[:, :-1] != 0)
    assert torch.equal(y[:, :-1][both], x[:, 1:][both])
    lengths = (x != 0).sum(1)
    assert lengths.min() >= 1 and lengths.max() <= 50 and (x.max() <= 12101)
    # Left-padded: the real items are the last `length` positions.
    assert torch.equal(x != 0, torch.arange(50) >= (50 - lengths)[:, None])


def test_bench_gpu_goes_on_past_an_error_that_leaves_the_device_usable(tmp_path, monkeypatch):
    """An out-of-memory error (or a failed check) in one implementation at one shape costs that
    entry only: every other shape, implementation and variant is still timed, the failure is named
    in the report and the exit code, and speed_report.py's chart leaves the missing point out."""
    monkeypatch.syspath_prepend(os.path.join(REPO, "benchmarks"))
    import bench_gpu
    import speed_report

    class StubTimer:
        def __init__(self, repeats):
            pass

        def __call__(self, fn):
            fn()  # the stand-in op below raises where the real one would
            return 1.0

    real_make_inputs, real_op = bench_gpu.make_inputs, bench_gpu.pka_ext.pka_attention
    current = {}

    def make_inputs(B, H, T, d, **kw):
        current.update(T=T, d=d)
        return real_make_inputs(1, 1, 2, 2, dtype=torch.float32)

    def op(*args, **kwargs):
        if current == {"T": 512, "d": 64} and os.environ.get("PKA_FUSED_WORKSPACE") is None \
                and os.environ.get("PKA_CUDA_UNFUSED") is None:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if current == {"T": 1024, "d": 64} and os.environ.get("PKA_CUDA_UNFUSED") is None:
            raise RuntimeError("")  # no message to quote
        return real_op(*args, **kwargs)

    monkeypatch.setattr(bench_gpu, "Timer", StubTimer)
    monkeypatch.setattr(bench_gpu, "copy_bandwidth", lambda timer: 4e12)
    monkeypatch.setattr(bench_gpu, "make_inputs", make_inputs)
    monkeypatch.setattr(bench_gpu.pka_ext, "pka_attention", op)
    monkeypatch.setattr(bench_gpu, "cuda_usable", lambda: True)
    monkeypatch.setattr(bench_gpu.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench_gpu, "machine_info", lambda: {"gpu": "stub", "torch": "stub",
                                                            "python": "stub", "date": "stub"})
    monkeypatch.setattr(sys, "argv", ["bench_gpu.py", "--out", str(tmp_path / "gpu")])
    with pytest.raises(SystemExit, match="some timings failed"):  # gpu_check.sh's summary shows it
        bench_gpu.main()
    rows = json.loads((tmp_path / "gpu" / "gpu_op_bfloat16.json").read_text())["rows"]
    assert [(r["T"], r["d"]) for r in rows] == [(s["T"], s["d"]) for s in bench_gpu.SHAPES]
    failed = next(r for r in rows if r["T"] == 512)
    assert "fwd_ms_fused" not in failed and "fwdbwd_ms_fused" not in failed
    assert failed["error_fused"].startswith("OutOfMemoryError: CUDA out of memory")
    assert next(r for r in rows if r["T"] == 1024)["error_fused"] == "RuntimeError: "
    assert failed["fwd_ms_unfused"] == failed["fwdbwd_ms_composition"] == 1.0
    assert "fwd_ms_fwd4" not in failed and "error_fwd4" in failed and failed["fwd_ms_workspace"] == 1.0
    assert all("fwd_ms_fused" in r and "fwd_ms_fwd4" in r for r in rows if r["T"] not in (512, 1024))
    md = (tmp_path / "gpu" / "gpu_op_bfloat16.md").read_text()
    assert "| 256 | 2 | 512 | 64 | - | 1.000 | 1.000 | - | - | - | 1.000 | 1.000 | - | - |" in md
    assert "- T=512, d=64, fused: OutOfMemoryError: CUDA out of memory" in md
    assert "Partial" not in md
    monkeypatch.setattr(speed_report, "RESULTS", str(tmp_path))
    assert speed_report.gpu_chart(str(tmp_path / "gpu" / "gpu_op_bfloat16.json"))
    assert (tmp_path / "speed_gpu_time_vs_T.png").exists()
