"""One training step (forward, full-catalogue CE, backward, Adam) of each recommender model.

    python benchmarks/bench_train_step.py            # B=128, T=50, D=128, 2 blocks, 12,101 items

Batches are random item sequences with lengths uniform in [1, T]; median of --repeats steps after
warm-up, all models in one process with the same thread count. A second set of --repeats steps is
timed phase by phase (backbone forward, full-catalogue scores + loss, backward, optimiser step; with a
device synchronisation at each boundary on CUDA) for the step-time breakdown; its medians need not
add up exactly to the whole-step median.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import command_line, describe, interleaved_times, machine_info, write_results  # noqa: E402

from pka_ext.rec.config import ModelConfig, TrainConfig  # noqa: E402
from pka_ext.rec.models import SeqRecModel  # noqa: E402
from pka_ext.rec.train import head_loss, make_optimizer, next_item_loss, training_arrays  # noqa: E402


PHASES = ("backbone", "scores + loss", "backward", "optimizer")


def make_batch(batch: int, max_len: int, items: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets [batch, max_len] of random sequences whose inputs have lengths uniform in
    [1, max_len], laid out as training gives them (training_arrays): a target at every real input
    position and nowhere else."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, max_len + 1, batch)
    x, y = training_arrays([rng.integers(1, items + 1, L + 1) for L in lengths], max_len)
    return torch.from_numpy(x), torch.from_numpy(y)


def phase_times(model, opt, x, y, cfg, args) -> dict[str, float]:
    """Median milliseconds of each phase of a training step over --repeats steps."""
    cuda = args.device.startswith("cuda")
    samples = {k: [] for k in PHASES}
    for i in range(args.repeats + 2):  # the first two are warm-up
        marks = []

        def mark():
            if cuda:
                torch.cuda.synchronize()
            marks.append(time.perf_counter())

        mark()
        with torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16, enabled=args.amp):
            h = model(x)
            mark()
            loss = head_loss(model, h, y, cfg, args.items) / (y != 0).sum()
        mark()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        mark()
        opt.step()
        mark()
        if i >= 2:
            for k, t0, t1 in zip(PHASES, marks, marks[1:]):
                samples[k].append(1e3 * (t1 - t0))
    return {k: statistics.median(v) for k, v in samples.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--max-len", type=int, default=50)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--items", type=int, default=12101)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", action="store_true", help="bfloat16 autocast")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    B, T = args.batch, args.max_len
    x, y = (t.to(args.device) for t in make_batch(B, T, args.items))
    cfg = TrainConfig(device=args.device)
    models, steps = {}, {}
    for name in ("psa", "sasrec", "nope", "rope"):
        torch.manual_seed(0)
        model = SeqRecModel(ModelConfig(model=name, num_items=args.items, hidden=args.hidden,
                                        num_blocks=args.blocks, num_heads=1, max_len=T,
                                        dropout=0.2)).to(args.device)
        opt = make_optimizer(model, cfg)
        models[name] = (model, opt)

        def step(model=model, opt=opt):
            with torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16, enabled=args.amp):
                loss = next_item_loss(model, x, y, cfg, args.items) / (y != 0).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()

        steps[name] = step
    # One step of each model in turn per round, so that the machine's slow spells fall on all alike.
    times = interleaved_times(steps, repeats=args.repeats, warmup=3)
    rows = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    phases = {}
    for name, (model, opt) in models.items():
        phases[name] = phase_times(model, opt, x, y, cfg, args)
        print(f"{name}: {rows[name]:.1f} ms/step; "
              + ", ".join(f"{k} {v:.1f}" for k, v in phases[name].items()), flush=True)
    info = machine_info()
    ratio = rows["psa"] / rows["sasrec"]
    md = [
        "# Training step: PSA vs baselines",
        "",
        f"Machine: {describe(info)}.",
        f"Command: `{command_line('bench_train_step.py', ap, args)}` (B={B}, T={T}, D={args.hidden}, "
        f"{args.blocks} blocks, 1 head, {args.items} items, full-catalogue CE + Adam, "
        f"device {args.device}{', bf16 autocast' if args.amp else ''}, median of {args.repeats} steps, "
        "the models taking turns step by step).",
        "",
        "| model | ms / step | vs sasrec |",
        "|---|---|---|",
        *[f"| {n} | {t:.1f} | {t / rows['sasrec']:.2f}x |" for n, t in rows.items()],
        "",
        f"psa / sasrec step-time ratio: **{ratio:.2f}** (target <= 1.10).",
        "",
        "Step-time breakdown (ms, median per phase over a separate set of steps):",
        "",
        "| model | " + " | ".join(PHASES) + " |",
        "|---|" + "---|" * len(PHASES),
        *[f"| {n} | " + " | ".join(f"{p[k]:.1f}" for k in PHASES) + " |" for n, p in phases.items()],
    ]
    write_results(f"train_step_{args.device.split(':')[0]}{'_amp' if args.amp else ''}",
                  {"machine": info, "args": vars(args), "ms_per_step": rows, "psa_over_sasrec": ratio,
                   "phase_ms": phases},
                  "\n".join(md) + "\n", args.out)
    print("\n".join(md))


if __name__ == "__main__":
    main()
