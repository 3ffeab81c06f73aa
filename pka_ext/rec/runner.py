"""One training run: load the data, split it, train with early stopping, evaluate, save.

``pka-rec train`` and ``pka-rec demo`` call :func:`train_run`; so can Python code, with the data
in memory if it likes (``data=``).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import tempfile
import time

import torch

from pka_ext.rec.config import (DataConfig, RunConfig, TrainConfig, cuda_device_count,
                                device_problem)
from pka_ext.rec.data import DataError, Interactions, load
from pka_ext.rec.evaluate import evaluate
from pka_ext.rec.models import SeqRecModel
from pka_ext.rec.protocols import Split, leave_one_out, temporal
from pka_ext.rec.recommender import CheckpointError, load_checkpoint, save_checkpoint
from pka_ext.rec.synthetic import make_synthetic
from pka_ext.rec.train import TrainState, fit, world_and_rank


def load_interactions(dc: DataConfig, seed: int = 0) -> Interactions:
    """The interactions ``dc`` names: its file read with its options, or the synthetic data."""
    if dc.format == "synthetic":
        return make_synthetic(seed=seed)
    if dc.format == "events":
        raise DataError("this run was trained on events passed from Python (train_run's data=); "
                        "give them again, as a file: --data FILE, with --format unless its "
                        "suffix names it")
    if not dc.path:
        raise DataError(f"a data file is required for format {dc.format!r} (pka-rec: --data)")
    return load(dc.path, dc.format, **dc.reader_options())


def make_split(data: Interactions, dc: DataConfig) -> Split:
    """``dc``'s protocol applied to ``data``: leave-one-out or the global temporal split."""
    if dc.protocol == "loo":
        return leave_one_out(data)
    return temporal(data, dc.val_start, dc.test_start, max_eval_events=dc.max_eval_events)


def evaluate_split(model, split: Split, cfg: TrainConfig, device=None) -> dict:
    """``{"val": ..., "test": ...}``: NDCG, HR and COV at ``cfg.metric_ks`` (no event counts)."""
    kw = dict(k=cfg.metric_ks, batch_size=cfg.eval_batch_size, device=device or cfg.device)
    return {name: {key: value for key, value in evaluate(model, es, split.num_items, **kw).items()
                   if key != "events"}
            for name, es in (("val", split.val), ("test", split.test))}


# What a resumed run may set anew: where it stops, where it runs and what it reports. Any other
# change would make it something other than the continuation of the checkpoint's run.
RESUMABLE = ("train.epochs", "train.patience", "train.device", "train.report_ks",
             "train.eval_batch_size", "model.backend", "data.path", "data.name")


def resume_changes(saved: dict, current: dict) -> list[str]:
    """``"section.field: saved -> current"`` for each setting outside RESUMABLE that differs."""
    return [f"{section}.{key}: {saved[section][key]!r} -> {value!r}"
            for section in ("model", "train", "data") for key, value in current[section].items()
            if f"{section}.{key}" not in RESUMABLE and saved[section][key] != value]


def check_device(device: str) -> None:
    """Raises a ValueError naming TrainConfig's ``device`` unless this machine has it (by
    :func:`~pka_ext.rec.config.device_problem`, as pka-rec's --device is checked).

    TrainConfig checks only the name; without this a missing GPU surfaced from torch once the data
    had been read and split and the output folder made.
    """
    not_a_device = device_problem(device, here=False)
    if not_a_device is not None:  # a config whose device was set after it was checked
        raise ValueError(f"TrainConfig.device: {not_a_device}")
    if device_problem(device) is not None:
        raise ValueError(f"device {device!r} is not available here: this machine has "
                         f"{cuda_device_count()} CUDA device(s) (TrainConfig.device)")


def train_run(cfg: RunConfig, out_dir: str, *, data: Interactions | None = None,
              resume: str | None = None, log=print, progress: bool = True) -> dict:
    """Loads data, trains with early stopping, evaluates, writes metrics.json and checkpoint.pt.

    ``data`` (e.g. from :meth:`Interactions.from_events`) is used instead of reading
    ``cfg.data``'s file; ``cfg.data`` still gives the protocol and the data set's name, and is
    recorded with format ``"events"`` (evaluating the checkpoint then needs the data again).
    Returns the metrics also written to ``metrics.json``.
    """
    world, rank = world_and_rank()
    # Checked now, not when the first epoch ends: an out_dir that cannot be a folder fails at once.
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise NotADirectoryError(errno.ENOTDIR, "the output folder is a file", out_dir)
    if os.path.isdir(out_dir):
        # A folder that cannot be written to failed only when the first epoch's checkpoint was
        # saved, with a traceback from torch.save: a file made and removed at once says so now.
        try:
            with tempfile.TemporaryFile(dir=out_dir):
                pass
        except OSError as e:
            raise OSError(e.errno, "the output folder cannot be written to", out_dir) from e
    check_device(cfg.train.device)
    # Read now, not once the data is read and split: a mistyped --resume or a file that is not a
    # checkpoint is an error before any work, as README promises (its settings and id map are
    # compared with the run's once the data has given the catalogue).
    ckpt = load_checkpoint(resume, cfg.train.device) if resume is not None else None
    done = (ckpt.get("train_state") or {}).get("epoch", 0) if ckpt is not None else 0
    if cfg.train.epochs < done:
        # It would train nothing, and metrics.json would report more epochs than its config.
        raise CheckpointError(f"{resume} has trained {done} epochs already; resuming it takes "
                              f"epochs >= {done}, got {cfg.train.epochs}")
    if data is None:
        data = load_interactions(cfg.data, cfg.train.seed)
    else:
        # Recorded as such, so that the checkpoint is not taken for one of the built-in data.
        named = cfg.data.name or (cfg.data.dataset_name if cfg.data.path else None)
        cfg.data = dataclasses.replace(cfg.data, format="events", path=None, columns=None,
                                       sep=None, name=named)
    name = cfg.data.dataset_name
    split = make_split(data, cfg.data)
    cfg.model.num_items = split.num_items
    state = None
    if ckpt is not None:
        if ckpt["id_maps"]["items"] != data.item_ids:
            raise DataError(f"{resume}: its item id map does not match the data")
        # Through RunConfig, so that fields added since the checkpoint was written get defaults.
        changed = resume_changes(RunConfig.from_dict(ckpt["config"]).to_dict(), cfg.to_dict())
        if changed:
            raise CheckpointError(f"{resume} was trained with other settings; a resumed run "
                                  f"continues that run, so only {', '.join(RESUMABLE)} may "
                                  f"change: " + "; ".join(changed))
        state = TrainState(**ckpt["train_state"])
        log(f"resuming from {resume} after epoch {state.epoch}")
    # After the data, its split and the checkpoint, which may be refused.
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(cfg.train.seed)
    model = SeqRecModel(cfg.model).to(cfg.train.device)
    ckpt_path = os.path.join(out_dir, "checkpoint.pt")
    metrics_path = os.path.join(out_dir, "metrics.json")

    def on_epoch_end(st: TrainState):
        # The folder's metrics.json, if any, is another run's (or the resumed one's, ended)
        # once this checkpoint replaces that run's: left there, an interrupted or failed run
        # paired it with a checkpoint it does not describe.
        if os.path.exists(metrics_path):
            os.remove(metrics_path)
        save_checkpoint(ckpt_path, model, cfg, data.id_maps(), train_state=vars(st))

    if rank == 0:
        log(f"{name}: {data.num_users} users, {split.num_items} items, "
            f"{len(split.train)} training sequences, {len(split.val)} val / {len(split.test)} test "
            f"events ({cfg.data.protocol}); model {cfg.model.model}; {world} process(es)")
    t0 = time.perf_counter()
    state = fit(model, split, cfg.train, state=state, log=log if rank == 0 else (lambda *_: None),
                on_epoch_end=on_epoch_end, progress=progress)
    if rank != 0:
        return {}
    metrics = {
        "model": cfg.model.model,
        "dataset": name,
        "protocol": cfg.data.protocol,
        **evaluate_split(model, split, cfg.train),
        "best_epoch": state.best_epoch,
        "epochs_run": state.epoch,
        "train_seconds": state.train_seconds,
        "history": state.history,  # one row per epoch: loss, validation metrics, seconds
        "config": cfg.to_dict(),
    }
    save_checkpoint(ckpt_path, model, cfg, data.id_maps(), metrics=metrics, train_state=vars(state))
    with open(metrics_path, "w") as f:
        json.dump(metrics, f, indent=2)
    log(f"test: {json.dumps(metrics['test'])}  (best epoch {state.best_epoch}, "
        f"{time.perf_counter() - t0:.1f} s)")
    return metrics
