"""CPU benchmark of the attention op: the compiled kernels vs python_ref vs matmul + SDPA.

Checks first that the three compute the same output and gradients (w.r.t. q, k, v, a_k and a_v)
at the timed shape. Times forward, backward and forward+backward (median and quartiles of --repeats
runs, one process, same thread count; every implementation and pass is called in turn in each
round, so the machine's slow spells fall on all of them alike), and measures the peak memory of one
forward+backward per implementation in a fresh subprocess: the growth of the process's peak
resident set (VmHWM, reset through /proc/self/clear_refs) over its resident set just before the
call, inputs already allocated, after one warm-up forward+backward of the same implementation at a
tiny shape (the first call's one-time costs, about 40 MiB at any shape, are not the op's memory).

    python benchmarks/bench_cpu_op.py                       # the issue's case: B=64 H=2 T=128 d=64
    python benchmarks/bench_cpu_op.py --sweep               # T in {50,128,200,512}, d in {32,64}
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from attention_impls import IMPLS, make_inputs  # noqa: E402
from common import command_line, describe, interleaved_times, machine_info, quartiles, write_results  # noqa: E402

GRAD_NAMES = ("out", "dq", "dk", "dv", "da_k", "da_v")
MEMORY = "growth of peak RSS during one fwd+bwd in a fresh process, after a warm-up fwd+bwd at a tiny shape"
AGREE_TOL = 1e-4  # max |x - ref| / max |ref| in float32; the implementations agree to ~1e-6


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory_child(impl: str, B: int, H: int, T: int, d: int) -> None:
    """Runs in a fresh process: prints the peak RSS growth (MiB) of one fwd+bwd."""
    fn = IMPLS[impl]
    # The first call loads code (pka_ext's import, torch's kernels), starts thread pools and fills
    # caches: ~40 MiB even at B=H=1, T=d=2, paid once per process, not per call. A warm-up at a tiny
    # shape pays it; its tensors stay under malloc's mmap threshold, so it leaves no freed memory
    # for the measured call to reuse.
    warm = make_inputs(1, H, min(T, 4), d)
    fn(*warm).backward(torch.ones(1, H, min(T, 4), d))
    del warm
    inputs = make_inputs(B, H, T, d)
    grad = torch.randn(B, H, T, d)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    before = _status_kib("VmRSS")
    fn(*inputs).backward(grad)
    print(json.dumps({"peak_mib": (_status_kib("VmHWM") - before) / 1024}))


def peak_memory(impl: str, B: int, H: int, T: int, d: int) -> float:
    cmd = [sys.executable, __file__, "--memory-child", impl, "--shape", str(B), str(H), str(T), str(d)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])["peak_mib"]


def check_agreement(inputs, grad, tol=AGREE_TOL) -> None:
    """Raises unless every implementation's output and gradients match python_ref's."""
    results = {}
    for name, fn in IMPLS.items():
        out = fn(*inputs)
        results[name] = (out.detach(), *torch.autograd.grad(out, inputs[:5], grad))
    for name, got in results.items():
        for what, x, ref in zip(GRAD_NAMES, got, results["reference"]):
            err = ((x - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
            if not err <= tol:
                raise RuntimeError(f"{name} does not compute what python_ref does: {what} differs by "
                                   f"{err:.2e} (relative to its largest entry; tolerance {tol:g})")


def time_case(B, H, T, d, repeats):
    inputs = make_inputs(B, H, T, d)
    grad = torch.randn(B, H, T, d)
    check_agreement(inputs, grad)
    held = {}  # each implementation's output, kept for the backward-only timing

    def clear_grads():
        for t in inputs[:5]:
            t.grad = None

    fns = {}
    for name, fn in IMPLS.items():
        def fwd(fn=fn):
            with torch.no_grad():
                fn(*inputs)

        def fwd_bwd(fn=fn):
            fn(*inputs).backward(grad)
            clear_grads()

        def bwd_only(name=name):
            held[name].backward(grad, retain_graph=True)
            clear_grads()

        held[name] = fn(*inputs)
        fns[(name, "fwd")], fns[(name, "bwd")], fns[(name, "fwd_bwd")] = fwd, bwd_only, fwd_bwd
    times = interleaved_times(fns, repeats=repeats)
    held.clear()
    row = {"B": B, "H": H, "T": T, "d": d}
    for name in IMPLS:
        row[name] = {f"{kind}_ms": 1e3 * statistics.median(times[(name, kind)]) for kind in ("fwd", "bwd", "fwd_bwd")}
        q1, _, q3 = quartiles(times[(name, "fwd_bwd")])
        row[name]["fwd_bwd_iqr_ms"] = [1e3 * q1, 1e3 * q3]
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--sweep", action="store_true", help="T in {50,128,200,512} x d in {32,64}")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--shape", type=int, nargs=4, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.repeats < 2:
        ap.error("--repeats must be at least 2 (quartiles need two times)")
    if args.memory_child:
        peak_memory_child(args.memory_child, *args.shape)
        return

    cases = [(T, d) for T in (50, 128, 200, 512) for d in (32, 64)] if args.sweep else [(128, 64)]
    info = machine_info()
    rows = []
    for T, d in cases:
        row = time_case(args.batch, args.heads, T, d, args.repeats)
        if not args.no_memory:
            for name in IMPLS:
                row[name]["peak_mib"] = peak_memory(name, args.batch, args.heads, T, d)
        rows.append(row)
        print(json.dumps(row), flush=True)

    command = command_line("bench_cpu_op.py", ap, args, skip=("out", "memory_child", "shape"))
    lines = [
        f"# CPU op benchmark{' sweep' if args.sweep else ''}",
        "",
        f"Machine: {describe(info)}.",
        f"Command: `{command}`. fp32, "
        f"B={args.batch}, H={args.heads}, lengths uniform in [1, T], median of {args.repeats} runs "
        "(implementations interleaved round by round; fwd+bwd with its quartiles). "
        f"Peak memory: {MEMORY}.",
        "",
        "| T | d | impl | fwd ms | bwd ms | fwd+bwd ms (quartiles) | peak MiB | fwd+bwd speed-up of pka | pka peak / impl peak |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        for name in IMPLS:
            r = row[name]
            speed = row[name]["fwd_bwd_ms"] / row["pka"]["fwd_bwd_ms"]
            mem = r.get("peak_mib")
            ratio = f"{row['pka']['peak_mib'] / mem:.2f}" if mem else "-"
            lines.append(
                f"| {row['T']} | {row['d']} | {name} | {r['fwd_ms']:.2f} | {r['bwd_ms']:.2f} | "
                f"{r['fwd_bwd_ms']:.2f} ({r['fwd_bwd_iqr_ms'][0]:.2f}-{r['fwd_bwd_iqr_ms'][1]:.2f}) | "
                f"{mem if mem is None else f'{mem:.1f}'} | {speed:.2f}x | {ratio} |"
            )
    name = "cpu_op_sweep" if args.sweep else "cpu_op"
    payload = {"machine": info, "command": command, "repeats": args.repeats,
               "memory": None if args.no_memory else MEMORY, "rows": rows}
    write_results(name, payload, "\n".join(lines) + "\n", args.out)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
