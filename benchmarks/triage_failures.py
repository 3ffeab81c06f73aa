"""Which kernel choice a failing CUDA test depends on, found in the same device call.

    python benchmarks/triage_failures.py JUNIT_XML [--out DIR] [--max-tests 24]

Device time is lent in minutes, so a failing GPU check should say more than "failed": this reruns
the tests that failed (read from the junit report of the tests step) once as they were and once
under each switch of the CUDA code that changes what runs (the unfused path, the buffer placement,
where the 16-bit scores live, the warps per block, the block order), all variants at once in separate processes (one GPU holds
them all). A test that passes as rerun points at a race or a stale state; one that passes only
without a feature points at that feature. Writes triage.md and triage.json to --out and prints the
table; exits 0 when nothing failed. Never a verdict on its own: the table is a lead for the next
change, made on the CPU machine.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> environment additions; "as run" repeats the tests step's conditions.
VARIANTS = {
    "as run": {},
    "unfused": {"PKA_CUDA_UNFUSED": "1"},
    "workspace": {"PKA_FUSED_WORKSPACE": "1"},
    "split": {"PKA_FUSED_WORKSPACE": "split"},
    "smem scores": {"PKA_SMEM_SCORES": "1"},
    "fwd 4 warps": {"PKA_FWD_WARPS": "4"},
    "fwd 8 warps": {"PKA_FWD_WARPS": "8"},
    "bwd 4 warps": {"PKA_BWD_WARPS": "4"},
    "bwd 8 warps": {"PKA_BWD_WARPS": "8"},
    "batch order": {"PKA_BLOCK_ORDER": "0"},
}


def node_id(classname: str, name: str, root: str) -> str | None:
    """The pytest node id of a junit test case: the longest prefix of `classname` that is a file
    under `root` is the module, the rest are classes. None for a case that is no test (a module
    that failed to collect, as after a failed build)."""
    parts = classname.split(".") if classname else []
    for i in range(len(parts), 0, -1):
        path = "/".join(parts[:i]) + ".py"
        if os.path.isfile(os.path.join(root, path)):
            return "::".join([path, *parts[i:], name])
    return None


def outcomes(junit: str, root: str) -> dict[str, str]:
    """Node id -> "failed" (failure or error), "skipped" or "passed" for every case of the report,
    in report order (a case with a failed teardown appears twice; the failure wins). Cases that
    are no test (collection errors) are left out: there is nothing to rerun."""
    seen: dict[str, str] = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        nid = node_id(case.get("classname", ""), case.get("name", ""), root)
        if nid is None:
            continue
        if case.find("failure") is not None or case.find("error") is not None:
            seen[nid] = "failed"
        elif seen.get(nid) != "failed":
            seen[nid] = "skipped" if case.find("skipped") is not None else "passed"
    return seen


def failed_tests(junit: str, root: str) -> list[str]:
    """Node ids of the test cases the report marks failed or errored, in report order."""
    return [nid for nid, outcome in outcomes(junit, root).items() if outcome == "failed"]


def spread(items: list[str], n: int) -> list[str]:
    """At most n items, evenly spaced (so a long list keeps cases from each of its parts)."""
    if len(items) <= n:
        return items
    return [items[i * len(items) // n] for i in range(n)]


def run_variants(tests: list[str], root: str, python: str, deadline: float) -> dict[str, dict]:
    """Runs `tests` under every variant at once, all within `deadline` seconds; per variant the
    names that passed, the exit code ("timeout" if cut), and the last lines of its output.

    At the deadline every variant still running gets SIGINT, on which pytest writes its report of
    the tests that finished, and those that have not ended 10 s later are killed.
    """
    results = {}
    end = time.monotonic() + deadline
    with tempfile.TemporaryDirectory() as tmp:
        procs = {}
        for i, (variant, extra) in enumerate(VARIANTS.items()):
            report = os.path.join(tmp, f"{i}.xml")
            log = open(os.path.join(tmp, f"{i}.log"), "w")
            cmd = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--junitxml", report, *tests]
            # Ten variants share the machine: one CPU thread each.
            env = {**os.environ, "OMP_NUM_THREADS": "1", **extra}
            procs[variant] = (subprocess.Popen(cmd, cwd=root, env=env, stdout=log,
                                               stderr=subprocess.STDOUT), report, log)
        cut = set()
        for variant, (proc, _, _) in procs.items():
            try:
                proc.wait(timeout=max(end - time.monotonic(), 0))
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGINT)
                cut.add(variant)
        # One 10 s grace for all of them: a variant stuck in a CUDA call (a hung kernel) does not
        # answer SIGINT, and ten such variants waited for one after another took 100 s.
        grace_end = time.monotonic() + 10
        for variant, (proc, report, log) in procs.items():
            try:
                rc = (proc.wait(timeout=max(grace_end - time.monotonic(), 0)) if variant in cut
                      else proc.returncode)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if variant in cut:
                rc = "timeout"
            log.close()
            tail = open(log.name).read().splitlines()[-3:]
            passed = ({nid for nid, o in outcomes(report, root).items() if o == "passed"}
                      if os.path.exists(report) and os.path.getsize(report) else set())
            results[variant] = {"rc": rc, "passed": sorted(passed), "tail": tail}
    return results


def default_deadline() -> float:
    """75 s; as a step of gpu_check.sh, the step's limit (PKA_STEP_LIMIT, which the check's budget
    may have cut) less 15 s: the variants' 10 s to end after SIGINT and the writing of the report,
    so that the step's timeout does not end this script before it writes anything."""
    limit = os.environ.get("PKA_STEP_LIMIT")
    return max(float(limit) - 15, 0.0) if limit else 75.0


def table(tests: list[str], results: dict[str, dict]) -> str:
    lines = ["| test | " + " | ".join(results) + " |", "|---" * (len(results) + 1) + "|"]
    for nid in tests:
        cells = ["pass" if nid in r["passed"] else "FAIL" for r in results.values()]
        lines.append(f"| {nid.split('::', 1)[1]} | " + " | ".join(cells) + " |")
    lines.append("| passed | " + " | ".join(f"{len(set(tests) & set(r['passed']))}/{len(tests)}"
                                          for r in results.values()) + " |")
    lines.append("| exit code | " + " | ".join(str(r["rc"]) for r in results.values()) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("junit", help="junit XML report of the tests step")
    parser.add_argument("--out", default=".", help="folder for triage.md and triage.json")
    parser.add_argument("--max-tests", type=int, default=24, help="rerun at most this many failures")
    parser.add_argument("--deadline", type=float, default=default_deadline(),
                        help="seconds for all variants together (they run at once); default 75, "
                             "or PKA_STEP_LIMIT less 15 where set")
    parser.add_argument("--root", default=REPO, help="folder the test paths are relative to")
    args = parser.parse_args(argv)
    if not os.path.exists(args.junit):
        print(f"{args.junit}: no junit report (the tests step did not get to write one)")
        return 1
    failed = failed_tests(args.junit, args.root)
    if not failed:
        print("no failed tests: nothing to triage")
        return 0
    tests = spread(failed, args.max_tests)
    results = run_variants(tests, args.root, sys.executable, args.deadline)
    md = (f"# Triage of {len(failed)} failed CUDA tests ({len(tests)} rerun)\n\n"
          "Variants: " + "; ".join(f"{k}: " + (" ".join(f"{n}={x}" for n, x in v.items()) or "as the tests step")
                                   for k, v in VARIANTS.items())
          + "\n\n" + table(tests, results) + "\n")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "triage.md"), "w") as f:
        f.write(md)
    with open(os.path.join(args.out, "triage.json"), "w") as f:
        json.dump({"failed": failed, "rerun": tests, "variants": VARIANTS, "results": results}, f,
                  indent=1)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
