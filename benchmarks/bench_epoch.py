"""Epoch time of PSA and SASRec on a real data set (default ../shared/data/Beauty.txt).

    python benchmarks/bench_epoch.py [--data PATH] [--epochs 2]

Leave-one-out, max-len 50, D=128, 2 blocks, 1 head, batch 128, full-catalogue CE (the recommender
issue's setting), all torch threads of this process. Reports, per model, the training seconds of each
epoch and the seconds of the validation pass that follows it (full ranking over all items).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import command_line, describe, machine_info, write_results  # noqa: E402

from pka_ext.rec.config import ModelConfig, TrainConfig  # noqa: E402
from pka_ext.rec.data import load  # noqa: E402
from pka_ext.rec.models import SeqRecModel  # noqa: E402
from pka_ext.rec.protocols import leave_one_out  # noqa: E402
from pka_ext.rec.train import fit  # noqa: E402

DEFAULT_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data",
                            "Beauty.txt")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    split = leave_one_out(load(args.data, "s3rec"))
    rows = {}
    for name in ("psa", "sasrec"):
        torch.manual_seed(0)
        model = SeqRecModel(ModelConfig(model=name, num_items=split.num_items, hidden=128,
                                        num_blocks=2, num_heads=1, max_len=50, dropout=0.2))
        state = fit(model, split, TrainConfig(epochs=args.epochs, batch_size=128, lr=1e-3,
                                              patience=args.epochs), log=print, progress=False)
        rows[name] = [{"epoch": h["epoch"], "train_s": h["seconds"], "val_s": h["eval_seconds"]}
                      for h in state.history]
    info = machine_info()
    n_train = len(split.train)
    name = os.path.splitext(os.path.basename(args.data))[0]
    command = command_line("bench_epoch.py", ap, args)
    md = [f"# Epoch time on {name}: PSA vs SASRec", "",
          f"Machine: {describe(info)}. Command: `{command}` ({n_train} training "
          "sequences, leave-one-out, max-len 50, D=128, 2 blocks, batch 128, full CE, Adam).", "",
          "| model | epoch | train s | validation s | train + validation s |", "|---|---|---|---|---|"]
    for name, hist in rows.items():
        md += [f"| {name} | {h['epoch']} | {h['train_s']:.1f} | {h['val_s']:.1f} | "
               f"{h['train_s'] + h['val_s']:.1f} |" for h in hist]
    worst = max(h["train_s"] + h["val_s"] for h in rows["psa"])
    md += ["", f"Slowest psa epoch including validation: **{worst:.1f} s** (target < 60 s)."]
    write_results("epoch_cpu", {"machine": info, "command": command, "data": os.path.basename(args.data),
                                "epochs": rows},
                  "\n".join(md) + "\n", args.out)
    print("\n".join(md))


if __name__ == "__main__":
    main()
