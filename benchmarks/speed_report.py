"""Collects the speed results into benchmarks/results/speed.md and draws its charts.

    python benchmarks/speed_report.py

Reads the JSON written by the benchmark scripts (each table below names its command), so every
number here was measured by a command in this repository; a missing file is reported as not run.
"""

from __future__ import annotations

import glob
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import describe  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
IMPLS = ("pka", "composition", "reference")


def _load(name):
    path = os.path.join(RESULTS, f"{name}.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _with_iqr(r) -> str:
    iqr = r.get("fwd_bwd_iqr_ms")
    return f"{r['fwd_bwd_ms']:.2f}" + (f" ({iqr[0]:.2f}-{iqr[1]:.2f})" if iqr else "")


def cpu_op_section(sweep) -> list[str]:
    bh = ", ".join(f"B={b}, H={h}" for b, h in dict.fromkeys((r["B"], r["H"]) for r in sweep["rows"]))
    md = ["## CPU op: forward, backward, forward + backward", "",
          f"Machine: {describe(sweep['machine'])}. Command: "
          f"`{sweep.get('command', 'python benchmarks/bench_cpu_op.py --sweep')}` (fp32, {bh}, lengths "
          f"uniform in [1, T], median of {sweep.get('repeats', 'repeated')} runs, fwd+bwd quartiles in "
          "parentheses where recorded; peak memory = "
          f"{sweep.get('memory') or 'growth of peak RSS during one fwd+bwd in a fresh process'}). "
          "Full table: `cpu_op_sweep.md`.", "",
          "| T | d | pka fwd / bwd / fwd+bwd ms | composition fwd+bwd ms | python_ref fwd+bwd ms "
          "| speed-up vs composition | vs python_ref | peak MiB pka / composition / python_ref |",
          "|---|---|---|---|---|---|---|---|"]
    for r in sweep["rows"]:
        p, c, ref = r["pka"], r["composition"], r["reference"]
        mem = " / ".join(f"{x.get('peak_mib', float('nan')):.0f}" for x in (p, c, ref))
        md.append(f"| {r['T']} | {r['d']} | {p['fwd_ms']:.2f} / {p['bwd_ms']:.2f} / {_with_iqr(p)} | "
                  f"{_with_iqr(c)} | {_with_iqr(ref)} | "
                  f"{c['fwd_bwd_ms'] / p['fwd_bwd_ms']:.2f}x | {ref['fwd_bwd_ms'] / p['fwd_bwd_ms']:.2f}x | {mem} |")
    plt = _pyplot()
    ds = sorted({r["d"] for r in sweep["rows"]})
    fig, axes = plt.subplots(1, len(ds), figsize=(5.2 * len(ds), 3.8), squeeze=False)
    for ax, d in zip(axes[0], ds):
        rows = sorted((r for r in sweep["rows"] if r["d"] == d), key=lambda r: r["T"])
        for impl in IMPLS:
            ax.plot([r["T"] for r in rows], [r[impl]["fwd_bwd_ms"] for r in rows], marker="o", label=impl)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("T")
        ax.set_ylabel("fwd + bwd ms")
        ax.set_title(f"CPU op, fp32, {bh}, d={d}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(RESULTS, "speed_cpu_time_vs_T.png"), dpi=110)
    plt.close(fig)
    md += ["", "![CPU op time vs T](speed_cpu_time_vs_T.png)", ""]
    return md


def train_section(step, epoch, step_amp=None) -> list[str]:
    md = ["## Training: step and epoch time, PSA vs baselines (CPU)", ""]
    if step:
        a = step["args"]
        md += [f"One training step (`python benchmarks/bench_train_step.py --repeats {a['repeats']}`; "
               f"B={a['batch']}, T={a['max_len']}, D={a['hidden']}, {a['blocks']} blocks, {a['items']} "
               f"items, full CE + Adam). Machine: {describe(step['machine'])}.", "",
               "| model | ms / step | vs sasrec |", "|---|---|---|"]
        base = step["ms_per_step"]["sasrec"]
        md += [f"| {m} | {t:.1f} | {t / base:.2f}x |" for m, t in step["ms_per_step"].items()]
        phases = step["phase_ms"]
        names, kinds = list(phases), list(next(iter(phases.values())))
        md += ["", "Step-time breakdown, ms (median per phase over a separate set of steps):", "",
               "| model | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
        md += [f"| {n} | " + " | ".join(f"{phases[n][k]:.1f}" for k in kinds) + " |" for n in names]
        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(6.5, 3.4))
        bottom = [0.0] * len(names)
        for k in kinds:
            vals = [phases[n][k] for n in names]
            ax.bar(names, vals, bottom=bottom, label=k)
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set_ylabel("ms / training step")
        ax.set_title(f"CPU training step, B={a['batch']}, T={a['max_len']}, D={a['hidden']}")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        fig.tight_layout()
        fig.savefig(os.path.join(RESULTS, "speed_train_step_cpu.png"), dpi=110)
        plt.close(fig)
        md += ["", "![training step](speed_train_step_cpu.png)", ""]
        if step_amp:
            md += [f"Under bfloat16 autocast (`python benchmarks/bench_train_step.py --repeats "
                   f"{step_amp['args']['repeats']} --amp`; machine: {describe(step_amp['machine'])}):", "",
                   "| model | float32 ms / step | bf16 autocast ms / step | autocast vs float32 |",
                   "|---|---|---|---|"]
            md += [f"| {m} | {step['ms_per_step'][m]:.1f} | {t:.1f} | {t / step['ms_per_step'][m]:.2f}x |"
                   for m, t in step_amp["ms_per_step"].items() if m in step["ms_per_step"]]
            md.append("")
    else:
        md += ["Training step: not run (`python benchmarks/bench_train_step.py`).", ""]
    if epoch:
        md += [f"Epochs on {epoch['data']} (`{epoch.get('command', 'python benchmarks/bench_epoch.py')}`). Machine: "
               f"{describe(epoch['machine'])}.", "",
               "| model | epoch | train s | validation s |", "|---|---|---|---|"]
        for m, hist in epoch["epochs"].items():
            md += [f"| {m} | {h['epoch']} | {h['train_s']:.1f} | {h['val_s']:.1f} |" for h in hist]
        md.append("")
    else:
        md += ["Epoch time: not run (`python benchmarks/bench_epoch.py`).", ""]
    return md


def gpu_section() -> list[str]:
    md = ["## GPU", ""]
    # The latest GPU check's archive is unpacked into results/gpu/ (earlier runs, kept for the tuning
    # history in gpu_notes.md, live in sibling folders); a standalone run writes to results/.
    files = sorted(glob.glob(os.path.join(RESULTS, "gpu", "gpu_op_*.md")) +
                   glob.glob(os.path.join(RESULTS, "gpu", "train_step_cuda*.md")) +
                   glob.glob(os.path.join(RESULTS, "gpu_op_*.md")) +
                   glob.glob(os.path.join(RESULTS, "train_step_cuda*.md")))
    if not files:
        return md + ["No GPU results yet: no GPU run of `bash benchmarks/gpu_check.sh` has been recorded "
                     "(see the README's status section).", ""]
    for path in files:
        with open(path) as f:
            md += [f.read().replace("# ", "### ", 1), ""]
    op = os.path.join(RESULTS, "gpu", "gpu_op_bfloat16.json")
    if os.path.exists(op):
        md += gpu_chart(op)
    return md


def gpu_chart(path) -> list[str]:
    """Fused kernels vs the composition against T (d=64), forward and forward + backward."""
    with open(path) as f:
        run = json.load(f)
    rows = sorted((r for r in run["rows"] if r["d"] == 64), key=lambda r: r["T"])
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, (key, label) in zip(axes, (("fwd_ms", "forward"), ("fwdbwd_ms", "forward + backward"))):
        for impl in ("fused", "unfused", "composition"):
            done = [r for r in rows if f"{key}_{impl}" in r]  # bench_gpu.py leaves out what failed
            ax.plot([r["T"] for r in done], [r[f"{key}_{impl}"] for r in done], marker="o", label=impl)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("T")
        ax.set_ylabel("ms")
        ax.set_title(f"{label}, bf16, B=256, H=2, d=64")
        ax.legend()
    fig.suptitle(describe(run["machine"]), fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(RESULTS, "speed_gpu_time_vs_T.png"), dpi=110)
    plt.close(fig)
    return ["![GPU op time vs T](speed_gpu_time_vs_T.png)", ""]


def main():
    sweep, step, epoch = _load("cpu_op_sweep"), _load("train_step_cpu"), _load("epoch_cpu")
    md = ["# Speed study", ""]
    md += cpu_op_section(sweep) if sweep else ["CPU op sweep: not run.", ""]
    md += train_section(step, epoch, _load("train_step_cpu_amp"))
    md += gpu_section()
    with open(os.path.join(RESULTS, "speed.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
