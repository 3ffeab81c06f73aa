"""Training: next-item cross-entropy at every real position, Adam, early stopping, checkpoints, DDP.

Each training sequence contributes its last ``max_len + 1`` items: inputs are items ``0..n-2``,
targets items ``1..n-1``, both left-padded to ``max_len``.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from pka_ext.rec.config import TrainConfig
from pka_ext.rec.data import DataError
from pka_ext.rec.evaluate import evaluate, pad_left


def training_arrays(train_seqs, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and targets [U, max_len] for every training sequence with at least two items."""
    seqs = [np.asarray(s, dtype=np.int64)[-(max_len + 1):] for s in train_seqs if len(s) >= 2]
    return pad_left([s[:-1] for s in seqs], max_len), pad_left([s[1:] for s in seqs], max_len)


def next_item_loss(net, inputs: torch.Tensor, targets: torch.Tensor, cfg: TrainConfig,
                   num_items: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Summed cross-entropy over the real (target != 0) positions: backbone, then :func:`head_loss`."""
    h = net(inputs)  # [B, T, D]; through DDP's forward so that its gradient hooks are armed
    return head_loss(getattr(net, "module", net), h, targets, cfg, num_items, generator)


def head_loss(model, h: torch.Tensor, targets: torch.Tensor, cfg: TrainConfig, num_items: int,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """Summed cross-entropy of the backbone states ``h`` [B, T, D] at the real positions.

    Logits are computed only at those positions ([n_real, N + 1], never [B, T, N + 1]).
    ``cfg.loss == "sampled"``: softmax over the target and ``cfg.num_negatives`` items drawn
    uniformly (shared by the batch); a negative equal to the target is masked out.
    """
    real = targets != 0
    hs, y = h[real], targets[real]  # [n, D], [n]
    emb = model.item_emb.weight
    if cfg.loss == "ce":
        logits = model.scores(hs)  # [n, N + 1]
        logits[:, 0] = -math.inf
        return F.cross_entropy(logits, y, reduction="sum")
    neg = torch.randint(1, num_items + 1, (cfg.num_negatives,), generator=generator).to(hs.device)
    pos_logit = (hs * emb[y]).sum(-1, keepdim=True)  # [n, 1]
    neg_logit = (hs @ emb[neg].t()).masked_fill(neg[None, :] == y[:, None], -math.inf)
    logits = torch.cat([pos_logit, neg_logit], dim=1)
    return F.cross_entropy(logits, torch.zeros_like(y), reduction="sum")


@dataclass
class TrainState:
    """Everything needed to resume: restored by :func:`fit` when passed back in."""

    epoch: int = 0  # epochs completed
    best_epoch: int = 0
    best_metric: float = -math.inf
    best_state: dict | None = None
    bad_epochs: int = 0
    history: list = field(default_factory=list)
    train_seconds: float = 0.0
    optimizer_state: dict | None = None
    model_state: dict | None = None
    rng_state: dict | None = None  # torch's generators after the last epoch (dropout masks)


class TrainingDiverged(FloatingPointError):
    """The training loss became NaN or infinite."""


def _empty_val_reason(split) -> str:
    if split.protocol == "temporal":
        info = split.info
        return (f"temporal cuts at times {info['t_val']:g} and {info['t_test']:g}: "
                f"{info['val_events']} events fall between them, "
                f"{info['val_dropped_unseen_items']} of them items unseen in training, "
                f"{info['val_skipped_empty_context']} with no earlier event; when many events "
                f"share the time at a cut, both cuts can fall on it, so move --val-start lower")
    return "leave-one-out scores users with at least 3 items; give users more history"


def world_and_rank() -> tuple[int, int]:
    """The process group's world size and this process's rank; (1, 0) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def batch_order(num_examples: int, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """The global batches of one epoch: the same on every rank (seeded by seed and epoch)."""
    perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
    return [perm[i:i + batch_size] for i in range(0, num_examples, batch_size)]


def train_steps(model, optimizer, inputs: np.ndarray, targets: np.ndarray, batches, cfg: TrainConfig,
                num_items: int, device, progress=None, epoch: int = 1) -> tuple[float, int]:
    """Runs one optimiser step per global batch; returns (summed loss, positions) of this rank.

    ``--loss sampled`` draws its negatives from a generator seeded by (seed, epoch): fresh
    negatives every epoch, the same on every rank and after a resume.

    Under DDP each rank takes a contiguous share of every global batch. The loss is normalised by
    the number of real positions in the whole global batch (every rank can count them) times the
    world size that DDP's gradient averaging divides by, so the update equals the single-process
    update on the same global batch.
    """
    world, rank = world_and_rank()
    gen = torch.Generator().manual_seed(int(np.random.SeedSequence([cfg.seed, epoch]).generate_state(1)[0]))
    total, count = 0.0, 0
    device_type = torch.device(device).type
    model.train()
    for idx in batches:
        global_positions = int((targets[idx] != 0).sum())
        mine = np.array_split(idx, world)[rank]
        x = torch.from_numpy(inputs[mine]).to(device)
        y = torch.from_numpy(targets[mine]).to(device)
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=cfg.amp):
            loss_sum = next_item_loss(model, x, y, cfg, num_items, gen)
        optimizer.zero_grad(set_to_none=True)
        (loss_sum * (world / max(global_positions, 1))).backward()
        optimizer.step()
        total += loss_sum.item()
        count += int((y != 0).sum())
        if progress is not None:
            progress.update(len(idx))
            progress.set_postfix(loss=f"{loss_sum.item() / max(int((y != 0).sum()), 1):.4f}")
    return total, count


def _rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def make_optimizer(model, cfg: TrainConfig):
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98),
                            weight_decay=cfg.weight_decay)


def fit(model, split, cfg: TrainConfig, *, state: TrainState | None = None, log=print,
        on_epoch_end=None, progress: bool = True) -> TrainState:
    """Trains with early stopping on validation NDCG@k and restores the best weights.

    Parameters
    ----------
    model : SeqRecModel
        Already on ``cfg.device``.
    split : Split
        From :mod:`pka_ext.rec.protocols`.
    state : TrainState, optional
        Resume from here (weights, optimiser, counters).
    on_epoch_end : callable(state), optional
        Called on rank 0 after every epoch (checkpointing).

    Returns
    -------
    TrainState
        With ``best_state`` loaded into ``model``.
    """
    from tqdm.auto import tqdm

    world, rank = world_and_rank()
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    state = state or TrainState()
    if state.model_state is not None:
        model.load_state_dict(state.model_state)
    if state.rng_state is not None:  # a resumed run draws the dropout masks it would have drawn
        _set_rng_state(state.rng_state, device)
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = make_optimizer(model, cfg)
    if state.optimizer_state is not None:
        optimizer.load_state_dict(state.optimizer_state)
    inputs, targets = training_arrays(split.train, model.cfg.max_len)
    if len(inputs) == 0:
        raise ValueError("no training sequence has two or more items")
    if len(split.val.targets) == 0:
        raise DataError(f"the validation split has no events to score, so early stopping could "
                        f"not select an epoch ({_empty_val_reason(split)})")
    key = f"ndcg@{cfg.eval_k}"
    # A run that had already stopped early stays stopped when resumed.
    first = cfg.epochs + 1 if state.bad_epochs >= cfg.patience else state.epoch + 1
    for epoch in range(first, cfg.epochs + 1):
        batches = batch_order(len(inputs), cfg.batch_size, cfg.seed, epoch)
        bar = tqdm(total=len(inputs), desc=f"epoch {epoch}", unit="seq", leave=False,
                   disable=None if (progress and rank == 0) else True)
        t0 = time.perf_counter()
        loss, positions = train_steps(net, optimizer, inputs, targets, batches, cfg,
                                      split.num_items, device, bar, epoch=epoch)
        seconds = time.perf_counter() - t0
        bar.close()
        # Every rank decides together: a rank that raised alone would leave its peers waiting.
        diverged = torch.tensor([0.0 if math.isfinite(loss) else 1.0], device=device)
        if world > 1:
            dist.all_reduce(diverged, op=dist.ReduceOp.MAX)
        if diverged.item():
            kept = (f"the last epoch to finish was {state.epoch} (the best: {state.best_epoch}), "
                    f"which is what pka-rec train's checkpoint holds" if state.epoch
                    else "no epoch had finished")
            raise TrainingDiverged(
                f"epoch {epoch}: the training loss is not finite; {kept}. Try a lower learning "
                f"rate{' or training without --amp' if cfg.amp else ''}")
        state.train_seconds += seconds
        # On the training device: NCCL broadcasts only CUDA tensors (gloo takes the CPU one).
        metric = torch.zeros(1, dtype=torch.float64, device=device)
        t_eval = time.perf_counter()
        if rank == 0:
            val = evaluate(model, split.val, split.num_items, k=cfg.eval_k,
                           batch_size=cfg.eval_batch_size, device=device)
            metric[0] = val[key]
        if world > 1:
            dist.broadcast(metric, src=0)  # every rank takes the same early-stopping decision
        metric = metric.item()
        improved = metric > state.best_metric
        if improved:
            state.best_metric, state.best_epoch, state.bad_epochs = metric, epoch, 0
            state.best_state = copy.deepcopy(model.state_dict())
        else:
            state.bad_epochs += 1
        state.epoch = epoch
        if rank == 0:
            row = {"epoch": epoch, "loss": loss / max(positions, 1), "seconds": seconds,
                   "eval_seconds": time.perf_counter() - t_eval,
                   "seq_per_s": len(inputs) / seconds, **{f"val_{k}": v for k, v in val.items()}}
            state.history.append(row)
            log(f"epoch {epoch:3d}  loss {row['loss']:.4f}  {row['seq_per_s']:.0f} seq/s  "
                f"train {seconds:.1f} s  val {row['eval_seconds']:.1f} s  "
                f"val {key} {metric:.4f}{'  *' if improved else ''}")
            if on_epoch_end is not None:
                state.model_state = model.state_dict()
                state.optimizer_state = optimizer.state_dict()
                state.rng_state = _rng_state(device)
                on_epoch_end(state)
        if state.bad_epochs >= cfg.patience:
            if rank == 0:
                log(f"early stop: no improvement for {cfg.patience} epochs; best epoch {state.best_epoch}")
            break
    if state.model_state is not None:
        # The last epoch's weights, for a resume: model_state holds the model's own tensors, which
        # loading the best weights below overwrites in place (a finished run's checkpoint then
        # resumed from the best epoch's weights with the last epoch's optimiser state).
        state.model_state = copy.deepcopy(state.model_state)
    if state.best_state is not None:
        model.load_state_dict(state.best_state)
    return state
