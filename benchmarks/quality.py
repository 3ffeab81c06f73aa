"""Quality study: PSA vs SASRec / NoPE / RoPE on real data, several seeds, plus PSA ablations.

Every cell is one ``pka-rec train`` command (recorded in the results); cells run as separate
processes, ``--jobs`` at a time with one torch thread each. A runner holds a lock on the cell's
``claimed`` file while it runs, so several runners can work on one study and a finished cell is never
rerun. A cell whose runner died (a session's end, say) is continued from its last epoch's checkpoint
by ``run --resume-stale`` (resuming is exact: weights, optimiser, batch order and dropout masks);
stopping a runner (SIGTERM, Ctrl-C) stops its cells' training too and leaves them to be continued
the same way. Delete the folder of a failed cell to run it from scratch.

    python benchmarks/quality.py run --table small --jobs 2          # LastFM (LOO) + ml-100k (temporal)
    python benchmarks/quality.py run --table amazon --seeds 0        # Beauty, Toys_and_Games, Yelp (LOO)
    python benchmarks/quality.py run --table small --max-len 128     # the paper's context length
    python benchmarks/quality.py run --table tune --datasets LastFM --max-len 128 --seeds 0   # its grid
    python benchmarks/quality.py run --table amazon --datasets Yelp --loss sampled            # cheaper loss
    python benchmarks/quality.py run ... --resume-stale              # continue cells whose runner died
    python benchmarks/quality.py run --table ablation                # PSA variants on ml-100k
    python benchmarks/quality.py run --table tune --seeds 0          # the other learning rate(s) on ml-100k
    python benchmarks/quality.py run --table tune --seeds 1 2 --models psa --grid-lr 3e-3   # selected: more seeds
    python benchmarks/quality.py adopt --table small ...             # record cells whose runner was stopped
    python benchmarks/quality.py report                              # -> benchmarks/results/quality.{md,json}

Hyperparameters are the paper's published best configurations for Beauty (blocks, hidden size, batch
size, learning rate per model; one head, dropout 0.3, full cross-entropy), used unchanged on every
data set. ``--lr`` overrides the learning rate of every model (stated in the report when used);
``--max-len`` overrides the data sets' context length (50 by default), ``--loss sampled`` trains
with sampled softmax instead of full cross-entropy and ``--block authors`` gives every model the
authors' blocks (attention residual from LayerNorm(X)) instead of pre-LN ones; such cells form their
own tables (folders ``main/<data set>-len<N>``, ``main/<data set>-sampled``,
``main/<data set>-authors``; the same suffixes under ``tune/``). The
``tune`` table is the learning-rate grid (``TUNE_LRS``) for data sets without published
configurations: its cells hold the learning rates the main table did not run, and the report picks
each model's learning rate by seed-0 validation NDCG@10 only (same grid for every model; never test).
"""

from __future__ import annotations

import argparse
import fcntl
import itertools
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import machine_info  # noqa: E402

DATA = os.environ.get("PKA_DATA", os.path.join(HERE, "..", "..", "shared", "data"))
MODELS = ("psa", "sasrec", "nope", "rope")

# The paper's best Beauty configurations (Table "hyperparameters" of arXiv 2602.21052).
PAPER = {
    "psa": dict(blocks=2, hidden=128, batch_size=128, lr=3e-4),
    "sasrec": dict(blocks=3, hidden=128, batch_size=256, lr=3e-4),
    "nope": dict(blocks=2, hidden=256, batch_size=128, lr=3e-4),
    "rope": dict(blocks=2, hidden=64, batch_size=256, lr=1e-3),
}
DATASETS = {
    # name: (file, format, protocol, max_len)
    "Beauty": ("Beauty.txt", "s3rec", "loo", 50),
    "Toys_and_Games": ("Toys_and_Games.txt", "s3rec", "loo", 50),
    "Yelp": ("Yelp.txt", "s3rec", "loo", 50),
    "LastFM": ("LastFM.txt", "s3rec", "loo", 50),
    "ml-100k": ("ml-100k/ml-100k.inter", "recbole", "temporal", 50),
}
TABLES = {
    "small": (["LastFM", "ml-100k"], MODELS),
    "amazon": (["Beauty", "Toys_and_Games", "Yelp"], MODELS),
    "beauty": (["Beauty"], MODELS),
}
# Ablations of the PSA kernels: (name, extra pka-rec flags). "paper" is the best setting.
ABLATIONS = [
    ("paper (A_k Toeplitz per layer, A_v full shared, normalised)", []),
    ("A_k full", ["--key-kernel", "full"]),
    ("A_v Toeplitz", ["--value-kernel", "toeplitz"]),
    ("A_k shared across layers", ["--share-key-kernel"]),
    ("A_v per layer", ["--per-layer-value-kernel"]),
    ("no normalisation", ["--no-normalize-kernels"]),
    ("+ absolute positional embeddings", ["--add-positional-embedding"]),
    ("authors' block (attention residual from LayerNorm(X))", ["--block", "authors"]),
]
ABLATION_DATASET = "ml-100k"
# Learning-rate grid of the "tune" table (the main table's runs supply the rate they used).
TUNE_LRS = (3e-4, 1e-3, 3e-3)
NEGATIVES = 256  # sampled-softmax negatives of --loss sampled


def cell_max_len(dataset: str, args) -> int:
    return args.max_len or DATASETS[dataset][3]


def setting_suffix(dataset: str, max_len: int, loss: str, block: str) -> str:
    """How a main-table cell departs from the data set's default setting (max-len, full CE,
    pre-LN blocks)."""
    return (f"-len{max_len}" if max_len != DATASETS[dataset][3] else "") + \
        ("-sampled" if loss == "sampled" else "") + ("-authors" if block == "authors" else "")


def setting_text(max_len: int, loss: str, block: str, negatives: bool = True) -> str:
    """The setting as a report heading (or, without the negatives, a chart title) says it."""
    sampled = f"sampled softmax ({NEGATIVES} uniform negatives)" if negatives else "sampled softmax"
    return (f"max-len {max_len}" + (f", {sampled}" if loss == "sampled" else "")
            + (", authors' blocks" if block == "authors" else ""))


def cell_command(dataset: str, model: str, seed: int, out: str, args, extra=(), lr=None) -> list[str]:
    file, fmt, protocol, _ = DATASETS[dataset]
    max_len = cell_max_len(dataset, args)
    hp = dict(PAPER[model])
    if lr is not None or args.lr is not None:
        hp["lr"] = lr if lr is not None else args.lr
    return [sys.executable, "-m", "pka_ext.rec", "train", "--data", os.path.join(DATA, file),
            "--format", fmt, "--protocol", protocol, "--name", dataset, "--model", model,
            "--seed", str(seed), "--max-len", str(max_len), "--hidden", str(hp["hidden"]),
            "--blocks", str(hp["blocks"]), "--heads", "1", "--dropout", "0.3",
            "--batch-size", str(hp["batch_size"]), "--lr", str(hp["lr"]),
            "--epochs", str(args.epochs), "--patience", str(args.patience), "--no-progress",
            *(["--loss", "sampled", "--negatives", str(NEGATIVES)] if args.loss == "sampled" else []),
            *(["--block", args.block] if args.block != "pre_ln" else []),
            "--out", out, *extra]


def cells(args) -> list[dict]:
    if (args.max_len is not None or args.loss != "ce" or args.block != "pre_ln") and args.table == "ablation":
        raise SystemExit("--max-len, --loss and --block apply to the main and tune tables, not to "
                         "--table ablation")
    if args.variants is not None and args.table != "ablation":
        raise SystemExit("--variants applies to --table ablation only")
    out = []
    if args.table == "ablation":
        for i, (name, extra) in enumerate(ABLATIONS):
            if args.variants is not None and i not in args.variants:
                continue
            for seed in args.seeds:
                d = os.path.join(args.out, "ablation", f"v{i}", f"seed{seed}")
                out.append(dict(table="ablation", dataset=ABLATION_DATASET, model="psa", variant=name,
                                seed=seed, dir=d,
                                cmd=cell_command(ABLATION_DATASET, "psa", seed, d, args, extra)))
        return out
    if args.table == "tune":
        models = [m for m in MODELS if m in (args.models or MODELS)]
        for dataset, model, lr, seed in itertools.product(args.datasets or [ABLATION_DATASET], models,
                                                          TUNE_LRS, args.seeds):
            main_lr = args.lr if args.lr is not None else PAPER[model]["lr"]
            if math.isclose(lr, main_lr):  # the main table's cells hold it
                continue
            if args.grid_lr and not any(math.isclose(lr, g) for g in args.grid_lr):
                continue
            folder = dataset + setting_suffix(dataset, cell_max_len(dataset, args), args.loss, args.block)
            d = os.path.join(args.out, "tune", folder, model, f"lr{lr:g}", f"seed{seed}")
            out.append(dict(table="tune", dataset=dataset, model=model, variant=f"lr {lr:g}", seed=seed,
                            dir=d, cmd=cell_command(dataset, model, seed, d, args, lr=lr)))
        return out
    datasets, models = TABLES[args.table]
    models = [m for m in models if m in (args.models or models)]
    datasets = [d for d in datasets if d in (args.datasets or datasets)]
    for dataset in datasets:
        folder = dataset + setting_suffix(dataset, cell_max_len(dataset, args), args.loss, args.block)
        for model in models:
            for seed in args.seeds:
                d = os.path.join(args.out, "main", folder, model, f"seed{seed}")
                out.append(dict(table="main", dataset=dataset, model=model, variant=None, seed=seed,
                                dir=d, cmd=cell_command(dataset, model, seed, d, args)))
    return out


def write_cell_json(cell: dict, wall_seconds: float | None, rc: int) -> None:
    with open(os.path.join(cell["dir"], "cell.json"), "w") as f:
        json.dump({k: cell[k] for k in ("table", "dataset", "model", "variant", "seed")}
                  | {"command": recorded_command(cell["cmd"]), "wall_seconds": wall_seconds, "rc": rc,
                     "machine": machine_info() | {"torch_threads": 1}}, f, indent=2)


def recorded_command(cmd: list[str]) -> str:
    """The cell's command as the report lists it: `pka-rec ...`, the data file under ../shared/data
    (the layout of this repository's checkout) wherever PKA_DATA pointed."""
    args = list(cmd[3:])
    if "--data" in args:
        i = args.index("--data") + 1
        args[i] = os.path.join("..", "shared", "data", os.path.relpath(args[i], DATA))
    return "pka-rec " + shlex.join(args)


# The pka-rec flags of a cell's command and where its run's config (metrics.json) holds them.
CONFIG_OF_FLAG = {"--model": ("model", "model"), "--seed": ("train", "seed"),
                  "--max-len": ("model", "max_len"), "--hidden": ("model", "hidden"),
                  "--blocks": ("model", "num_blocks"), "--batch-size": ("train", "batch_size"),
                  "--lr": ("train", "lr"), "--epochs": ("train", "epochs"),
                  "--patience": ("train", "patience"), "--loss": ("train", "loss"),
                  "--block": ("model", "block")}
FLAG_DEFAULTS = {"--loss": "ce", "--block": "pre_ln"}


def config_mismatch(cell: dict, config: dict) -> list[str]:
    """The settings in which a finished run (its metrics.json config) differs from the cell asked
    for: a folder reused with another --lr or --epochs must not pass for the cell."""
    flags = FLAG_DEFAULTS | dict(zip(cell["cmd"], cell["cmd"][1:]))
    diffs = []
    for flag, (section, key) in CONFIG_OF_FLAG.items():
        if flag not in flags:
            continue
        want, have = flags[flag], config[section][key]
        same = math.isclose(float(want), float(have)) if isinstance(have, (int, float)) else want == have
        if not same:
            diffs.append(f"{flag} {have} (asked: {want})")
    return diffs


def finished_elsewise(cell: dict) -> list[str]:
    """config_mismatch of the cell's finished run; [] when it has none."""
    path = os.path.join(cell["dir"], "metrics.json")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return config_mismatch(cell, json.load(f)["config"])


def run_cell(cell: dict, resume_stale: bool = False) -> bool:
    """Runs one cell unless another runner holds it or it is finished; False when its folder holds
    a finished run with other settings (said, and left alone).

    The runner holds an flock on the cell's ``claimed`` file (with its pid in it) while the cell
    runs, and so does the training process it starts: the lock goes when both have. A claim that
    nobody holds and that has no ``cell.json`` beside it is a cell whose runner died (or a machine
    that stopped): it is left alone unless ``resume_stale``, which continues it from its last
    epoch's checkpoint.
    """
    diffs = finished_elsewise(cell)
    if diffs:
        print(f"not run: {cell['dir']} holds a finished run with other settings: {'; '.join(diffs)}"
              " (use another --out)", flush=True)
        return False
    os.makedirs(cell["dir"], exist_ok=True)
    claim = os.path.join(cell["dir"], "claimed")
    existed = os.path.exists(claim)
    fd = os.open(claim, os.O_CREAT | os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:  # another runner is on it
        os.close(fd)
        return True
    try:
        if os.path.exists(os.path.join(cell["dir"], "cell.json")):
            return True
        if os.path.exists(os.path.join(cell["dir"], "metrics.json")):  # finished, runner stopped
            write_cell_json(cell, None, 0)
            return True
        stale = existed or os.fstat(fd).st_size > 0
        if stale and not resume_stale:
            print(f"interrupted, not resumed (pass --resume-stale): {cell['dir']}", flush=True)
            return True
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        cmd = list(cell["cmd"])
        ckpt = os.path.join(cell["dir"], "checkpoint.pt")
        if stale and os.path.exists(ckpt):
            cmd += ["--resume", ckpt]
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        t0 = time.perf_counter()
        with open(os.path.join(cell["dir"], "train.log"), "a" if stale else "w") as log:
            with _children_lock:
                if _stopping.is_set():
                    return True
                # The child shares the lock: a runner killed outright (SIGKILL) leaves a training
                # that still holds its cell, so that no --resume-stale runner starts a second one.
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                        pass_fds=(fd,))
                _children.add(proc)
            rc = proc.wait()
            with _children_lock:
                _children.discard(proc)
        if _stopping.is_set():  # stopped by its runner: left stale, to be resumed
            return True
        status = ("ok" if rc == 0 else f"FAILED rc={rc}") + (" (resumed)" if "--resume" in cmd else "")
        print(f"[{time.strftime('%H:%M:%S')}] {status} {time.perf_counter() - t0:7.1f} s  {cell['dir']}",
              flush=True)
        write_cell_json(cell, time.perf_counter() - t0, rc)
        return True
    finally:
        os.close(fd)  # releases the lock


# The training processes of this runner's cells. A runner that is stopped (SIGTERM, Ctrl-C) stops
# them too: an orphaned `pka-rec train` would go on without the cell's lock, and a second runner
# with --resume-stale could then train the same cell from the same checkpoint beside it.
_children: set[subprocess.Popen] = set()
_children_lock = threading.Lock()
_stopping = threading.Event()


def _stop_children() -> None:
    with _children_lock:
        _stopping.set()
        procs = list(_children)
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def run_cells(todo: list[dict], jobs: int, resume_stale: bool) -> int:
    """Runs cells ``jobs`` at a time; if the runner is stopped, its cells' processes stop with it
    (their checkpoints keep the last finished epoch; ``--resume-stale`` continues them). Returns
    how many cells were not run because their folders hold runs with other settings."""
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        with ThreadPoolExecutor(jobs) as pool:
            try:
                return sum(not ok for ok in pool.map(lambda c: run_cell(c, resume_stale), todo))
            except BaseException:
                pool.shutdown(wait=False, cancel_futures=True)
                _stop_children()
                raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def cmd_run(args) -> None:
    todo = cells(args)
    print(f"{len(todo)} cells, {args.jobs} at a time", flush=True)
    if run_cells(todo, args.jobs, args.resume_stale):
        raise SystemExit("some cells were not run (above): their folders hold runs with other settings")


def cmd_adopt(args) -> None:
    """Records finished cells whose runner was stopped before it wrote cell.json; a run whose
    settings differ from the arguments is refused (its command would be recorded wrongly)."""
    refused = 0
    for cell in cells(args):
        if os.path.exists(os.path.join(cell["dir"], "metrics.json")) and \
                not os.path.exists(os.path.join(cell["dir"], "cell.json")):
            diffs = finished_elsewise(cell)
            if diffs:
                print(f"not adopted: {cell['dir']} ran with other settings: {'; '.join(diffs)}")
                refused += 1
                continue
            write_cell_json(cell, None, 0)
            print(f"adopted {cell['dir']}")
    if refused:
        raise SystemExit("some cells were not adopted (above): pass the arguments they ran with")


def _collect(root: str) -> list[dict]:
    rows = []
    for dirpath, _, files in os.walk(root):
        if "metrics.json" in files and "cell.json" in files:
            with open(os.path.join(dirpath, "cell.json")) as f:
                cell = json.load(f)
            with open(os.path.join(dirpath, "metrics.json")) as f:
                m = json.load(f)
            history = m.get("history")
            ckpt = os.path.join(dirpath, "checkpoint.pt")
            if history is None and os.path.exists(ckpt):
                # Cells finished before metrics.json carried the learning curve keep it here.
                import torch

                history = torch.load(ckpt, map_location="cpu", weights_only=True)["train_state"]["history"]
            rows.append(cell | {"test": m["test"], "val": m["val"], "best_epoch": m["best_epoch"],
                                "epochs_run": m["epochs_run"], "train_seconds": m["train_seconds"],
                                "max_epochs": m["config"]["train"]["epochs"],
                                "lr": m["config"]["train"]["lr"],
                                "max_len": m["config"]["model"]["max_len"],
                                "loss": m["config"]["train"]["loss"],
                                "block": m["config"]["model"]["block"],
                                "val_curve": [h["val_ndcg@10"] for h in history or []]})
    return rows


def _setting(r: dict) -> tuple[str, int, str, str]:
    return r["dataset"], r["max_len"], r["loss"], r["block"]


def _mean_std(xs) -> str:
    xs = np.asarray(xs, dtype=float)
    if len(xs) == 1:
        return f"{xs[0]:.4f}"
    return f"{xs.mean():.4f} ± {xs.std(ddof=1):.4f}"


def _group(rows, key):
    groups: dict = {}
    for r in rows:
        groups.setdefault(key(r), []).append(r)
    return groups


def _table(rows, label) -> list[str]:
    """One row per value of ``label`` (model or variant) and learning rate."""
    lines = [f"| {label} | lr | seeds | NDCG@10 | HR@10 | COV@10 | best epoch | epochs run |",
             "|---|---|---|---|---|---|---|---|"]
    for (name, lr), rs in _group(rows, lambda r: (r[label], r["lr"])).items():
        capped = any(r["best_epoch"] == r["max_epochs"] for r in rs)
        lines.append(
            f"| {name} | {lr:g} | {len(rs)} | "
            f"{_mean_std([r['test']['ndcg@10'] for r in rs])} | {_mean_std([r['test']['hr@10'] for r in rs])} | "
            f"{_mean_std([r['test']['cov@10'] for r in rs])} | "
            f"{', '.join(str(r['best_epoch']) for r in rs)}{' (cap)' if capped else ''} | "
            f"{', '.join(str(r['epochs_run']) for r in rs)} |")
    return lines


def _tune_section(main: list[dict], tune: list[dict]) -> list[str]:
    """Per data set and model: each learning rate's seed-0 validation NDCG@10, the rate it selects
    and the test metrics of every seed run at each rate."""
    md = ["## Learning-rate selection (validation only)", "",
          f"Grid {', '.join(f'{lr:g}' for lr in TUNE_LRS)} for every model, the rest of the "
          "configuration as in the main table. Each model's rate is the one with the highest "
          "validation NDCG@10 of its seed-0 run (the epoch early stopping chose); test numbers are "
          "shown for every rate but never used to choose.", ""]
    for setting in dict.fromkeys(_setting(r) for r in tune):
        dataset, max_len, loss, block = setting
        md += [f"### {dataset} ({setting_text(max_len, loss, block, negatives=False)})", "",
               "| model | lr | seeds | val NDCG@10 (seed 0) | test NDCG@10 | test HR@10 | selected |",
               "|---|---|---|---|---|---|---|"]
        chosen = {}
        for model in MODELS:
            # A rate run in both tables (a tune run of the main table's rate) counts each seed once.
            runs = {(r["lr"], r["seed"]): r for r in reversed(main + tune)
                    if _setting(r) == setting and r["model"] == model}
            by_lr = _group(sorted(runs.values(), key=lambda r: (r["lr"], r["seed"])), lambda r: r["lr"])
            val0 = {lr: next((r["val"]["ndcg@10"] for r in rs if r["seed"] == 0), None)
                    for lr, rs in by_lr.items()}
            ranked = [lr for lr in val0 if val0[lr] is not None]
            best = max(ranked, key=lambda lr: val0[lr]) if len(ranked) == len(TUNE_LRS) else None
            for lr, rs in by_lr.items():
                md.append(f"| {model} | {lr:g} | {len(rs)} | "
                          f"{'-' if val0[lr] is None else f'{val0[lr]:.4f}'} | "
                          f"{_mean_std([r['test']['ndcg@10'] for r in rs])} | "
                          f"{_mean_std([r['test']['hr@10'] for r in rs])} | {'yes' if lr == best else ''} |")
            if best is not None:
                chosen[model] = by_lr[best]
        md += [""]
        if chosen:
            md += ["Each model at its selected rate, test NDCG@10: " + "; ".join(
                f"{m} {_mean_std([r['test']['ndcg@10'] for r in rs])} ({len(rs)} seed{'s' * (len(rs) > 1)})"
                for m, rs in chosen.items()) + ".", ""]
    return md


def _plot_curves(dataset: str, max_len: int, loss: str, block: str, rows: list[dict], results: str) -> str:
    """Validation NDCG@10 per epoch, one line per (model, seed): the paper's Figure 3."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    colors = dict(zip(MODELS, ("tab:red", "tab:blue", "tab:gray", "tab:green")))
    for r in rows:
        ax.plot(range(1, len(r["val_curve"]) + 1), r["val_curve"], color=colors[r["model"]],
                alpha=0.85, label=r["model"] if r["seed"] == min(x["seed"] for x in rows) else None)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation NDCG@10")
    # The axis labels already say what is plotted; a longer title ran past the figure's edge.
    ax.set_title(f"{dataset} ({setting_text(max_len, loss, block, negatives=False)})")
    ax.legend()
    fig.tight_layout()
    suffix = setting_suffix(dataset, max_len, loss, block).replace("-", "_")
    path = os.path.join(results, f"quality_val_curves_{dataset}{suffix}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _machines(envs, dated: str) -> str:
    """Machines (CPU, cores, torch) with their dates, for the report's first line."""
    dates: dict = {}
    for e in envs:
        dates.setdefault(f"{e['cpu']} ({e['cpu_count']} cores), torch {e['torch']}", set()).add(e["date"])
    return "; ".join(f"{m} ({dated} {', '.join(sorted(ds))})" for m, ds in dates.items())


def _legacy_machines(earlier: dict) -> list[dict]:
    """Where the cells recorded without their machine ran, from the report merged: those written
    before cells stored it give their own machine and those of the reports they merged."""
    e = earlier.get("environment", {})
    if "legacy_cell_machines" in e:
        return e["legacy_cell_machines"]
    envs = ([e] if e else []) + e.get("earlier_environments", [])
    flat = [{k: v for k, v in x.items() if k != "earlier_environments"} for x in envs]
    return [json.loads(x) for x in dict.fromkeys(json.dumps(x, sort_keys=True) for x in flat)]


def _cell_key(row: dict) -> tuple:
    """What a cell ran, wherever its folder was: a cell run again replaces its earlier row."""
    return (row["table"], row["variant"], *_setting(row), row["model"], row["lr"], row["seed"])


def cmd_report(args) -> None:
    rows = _collect(args.out)
    if args.merge:
        # Cell folders do not outlive the machine they ran on; an earlier report's rows stand in
        # for them, and a cell that ran again here replaces its old row.
        with open(args.merge) as f:
            earlier = json.load(f)
        fresh = {_cell_key(r) for r in rows}
        # Reports written before the block setting existed hold only pre-LN cells.
        rows = [r for r in ({"block": "pre_ln"} | r for r in earlier["cells"])
                if _cell_key(r) not in fresh] + rows
    if not rows:
        raise SystemExit(f"no finished cells under {args.out}")
    os.makedirs(args.results, exist_ok=True)
    env = machine_info() | {"torch_threads": 1}  # the machine writing the report
    legacy = any("machine" not in r for r in rows)
    env["legacy_cell_machines"] = (_legacy_machines(earlier) if args.merge else []) if legacy else []
    ran_on = _machines((r["machine"] for r in rows if "machine" in r), "runs finished")
    machines = "; ".join(
        ([f"cells ran on {ran_on}"] if ran_on else [])
        + ([f"cells recorded without their machine ran on {_machines(env['legacy_cell_machines'], 'reports of')}"]
           if env["legacy_cell_machines"] else [])
        + (["cells recorded without their machine ran where their folders are"]
           if legacy and not env["legacy_cell_machines"] else []))
    main = sorted((r for r in rows if r["table"] == "main"),
                  key=lambda r: (list(DATASETS).index(r["dataset"]), r["max_len"], r["loss"],
                                 r["block"] != "pre_ln", MODELS.index(r["model"]), r["seed"]))
    abl = sorted((r for r in rows if r["table"] == "ablation"),
                 key=lambda r: ([a[0] for a in ABLATIONS].index(r["variant"]), r["seed"]))
    tune = sorted((r for r in rows if r["table"] == "tune"),
                  key=lambda r: (*_setting(r), MODELS.index(r["model"]), r["lr"], r["seed"]))
    md = ["# Quality study: PSA vs positional baselines", "",
          f"Machines: {machines}. Report written {env['date']}. CPU only, one torch thread per run. Test metrics (full ranking, items already in the context excluded), mean ± sample std "
          "over seeds. `best epoch` is the epoch chosen by early stopping on validation NDCG@10 "
          "(`(cap)`: a run stopped at the epoch cap, so it may be under-trained). Runs shared the 2 cores "
          "with each other and were paused while speed benchmarks ran, so their wall times (in "
          "`quality.json`) are not speed measurements; those are in `speed.md`.", ""]
    if args.summary:
        with open(args.summary) as f:
            md += ["## Summary", "", f.read().strip(), ""]
    settings = _group(main, _setting)  # one table and one chart each
    for (dataset, max_len, loss, block), rs in settings.items():
        md += [f"## {dataset} ({rs[0]['command'].split('--protocol ')[1].split()[0]}, "
               f"{setting_text(max_len, loss, block)})", ""]
        md += _table(rs, "model") + [""]
    if abl:
        md += [f"## PSA ablations on {ABLATION_DATASET}", ""]
        md += _table(abl, "variant") + [""]
    if tune:
        md += _tune_section(main, tune)
    for (dataset, max_len, loss, block), rs in settings.items():
        png = _plot_curves(dataset, max_len, loss, block, rs, args.results)
        md += [f"![validation NDCG@10 per epoch on {dataset}]({os.path.basename(png)})", ""]
    md += ["## Commands", "", "One line per cell, run from the repository root:", ""]
    md += [f"- `{r['command']}`" for r in main + abl + tune]
    with open(os.path.join(args.results, "quality.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    with open(os.path.join(args.results, "quality.json"), "w") as f:
        json.dump({"environment": env, "cells": main + abl + tune}, f, indent=1)
    print("\n".join(md))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("--jobs", type=int, default=2)
    r.add_argument("--resume-stale", action="store_true",
                   help="continue cells whose runner died from their last checkpoint (only when no "
                        "runner of an older version, which holds no lock, is still working on them)")
    r.set_defaults(fn=cmd_run)
    a = sub.add_parser("adopt", help="write cell.json for finished cells that lack one")
    s = sub.add_parser("report")
    s.set_defaults(fn=cmd_report)
    for q in (r, a):
        q.add_argument("--table", required=True, choices=sorted(TABLES) + ["ablation", "tune"])
        q.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
        q.add_argument("--epochs", type=int, default=200, help="epoch cap (early stopping ends runs sooner)")
        q.add_argument("--patience", type=int, default=5)
        q.add_argument("--lr", type=float, default=None,
                       help="override every model's learning rate (tune: the rate the main table used, "
                             "by default each model's paper rate)")
        q.add_argument("--models", nargs="+", choices=MODELS, default=None, help="a subset of the models")
        q.add_argument("--datasets", nargs="+", choices=sorted(DATASETS), default=None,
                       help="a subset of the table's data sets")
        q.add_argument("--max-len", type=int, default=None,
                       help="main and tune tables: context length of every data set (default: 50 each)")
        q.add_argument("--loss", default="ce", choices=["ce", "sampled"],
                       help=f"main and tune tables: full cross-entropy, or sampled softmax with {NEGATIVES} "
                            "negatives (for data sets too large for the CPU budget; stated in the report)")
        q.add_argument("--block", default="pre_ln", choices=["pre_ln", "authors"],
                       help="main and tune tables: every model's transformer blocks (pka-rec --block)")
        q.add_argument("--variants", type=int, nargs="+", default=None,
                       choices=range(len(ABLATIONS)), metavar="I",
                       help="ablation: only these variants, by index (0 = the paper setting, "
                            f"{len(ABLATIONS) - 1} = {ABLATIONS[-1][0]})")
        q.add_argument("--grid-lr", type=float, nargs="+", default=None,
                       help="tune: only these learning rates of the grid (e.g. the selected ones, for more seeds)")
    a.set_defaults(fn=cmd_adopt)
    for q in (r, s, a):
        q.add_argument("--out", default="runs/quality", help="where the cells' folders live")
    s.add_argument("--results", default=os.path.join(HERE, "results"))
    s.add_argument("--summary", default=None, help="markdown file with the written conclusions")
    s.add_argument("--merge", default=None, metavar="QUALITY_JSON",
                   help="also report the cells of an earlier quality.json (a cell finished under "
                        "--out replaces its row)")
    args = p.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
