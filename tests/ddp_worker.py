"""Run under torchrun by test_rec_train.py: a few DDP training steps, then each rank saves its
parameters. Also importable for the single-process reference run (same data, same init)."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

from pka_ext.rec.config import ModelConfig, TrainConfig
from pka_ext.rec.models import SeqRecModel
from pka_ext.rec.synthetic import make_synthetic
from pka_ext.rec.train import batch_order, training_arrays, train_steps


def run(model_name: str, steps: int = 3):
    data = make_synthetic(num_users=96, num_items=40, min_len=3, max_len=12, seed=1)
    inputs, targets = training_arrays(data.sequences, 10)
    torch.manual_seed(0)
    model = SeqRecModel(ModelConfig(model=model_name, num_items=40, hidden=16, num_blocks=2,
                                    num_heads=2, max_len=10, dropout=0.0))
    cfg = TrainConfig(batch_size=32, lr=0.5, seed=0)
    net = model
    if dist.is_initialized():
        net = torch.nn.parallel.DistributedDataParallel(model)
    batches = batch_order(len(inputs), cfg.batch_size, cfg.seed, 1)[:steps]
    # Plain SGD: Adam's normalisation would magnify float-rounding differences in gradients that
    # are zero in exact arithmetic (e.g. the key bias of softmax attention) into O(lr) updates.
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    train_steps(net, optimizer, inputs, targets, batches, cfg, 40, "cpu")
    return model


if __name__ == "__main__":
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    model = run(sys.argv[1])
    torch.save(model.state_dict(), os.path.join(sys.argv[2], f"rank{dist.get_rank()}.pt"))
    # Both ranks reach the teardown together: a rank that tore down gloo while its peer was still
    # connected aborted about once in 15 runs (std::terminate in gloo, after both had saved). It
    # still happened once since (a CI run, 2026-11-29), so the tests rerun a run that ended so.
    dist.barrier()
    dist.destroy_process_group()
