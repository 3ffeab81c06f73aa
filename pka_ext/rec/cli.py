"""``pka-rec``: train, evaluate, recommend, plot-kernels, demo.

Multi-process training: ``torchrun --nproc_per_node N -m pka_ext.rec train ...`` (gloo on CPU,
nccl on CUDA, where ``--device cuda`` gives each rank the GPU of its LOCAL_RANK); the global batch
is split across ranks and rank 0 evaluates and writes files.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import sys

import torch
import torch.distributed as dist

from pka_ext.rec.config import (BLOCKS, KERNELS, LOSSES, MODELS, PROTOCOLS, DataConfig,
                                ModelConfig, RunConfig, TrainConfig, device_problem)
from pka_ext.rec.data import FORMATS, DataError
from pka_ext.rec.recommender import CheckpointError, Recommender, load_checkpoint
from pka_ext.rec.runner import evaluate_split, load_interactions, make_split, train_run
from pka_ext.rec.train import TrainingDiverged


def rank_device(device: str, env=os.environ) -> str:
    """The device one process trains on: under torchrun, ``cuda`` means the GPU of the process's
    LOCAL_RANK (every rank on GPU 0 would make NCCL fail); anything else as given."""
    if device == "cuda" and int(env.get("WORLD_SIZE", "1")) > 1:
        return f"cuda:{int(env.get('LOCAL_RANK', '0'))}"
    return device


def _init_distributed(device: str) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")


# train's defaults are the configs': repeated as literals here, they had only to drift apart for
# `pka-rec train` and train_run to train different models from the same "defaults".
_MODEL_DEFAULTS, _TRAIN_DEFAULTS, _DATA_DEFAULTS = ModelConfig(), TrainConfig(), DataConfig()
# Flags that apply to one loss, protocol or kind of data only: given for another, they would
# change nothing while the run's recorded config said otherwise. Their parser defaults are None
# (or False), so that given can be told from not given; the config's defaults, last here, stand
# in for them.
_ONLY_FOR = (
    ("negatives", "--negatives", lambda a: a.loss == "sampled", "--loss sampled",
     _TRAIN_DEFAULTS.num_negatives),
    ("val_start", "--val-start", lambda a: a.protocol == "temporal", "--protocol temporal",
     _DATA_DEFAULTS.val_start),
    ("test_start", "--test-start", lambda a: a.protocol == "temporal", "--protocol temporal",
     _DATA_DEFAULTS.test_start),
    ("skip_bad", "--skip-bad", lambda a: a.data is not None, "a data file (--data)",
     _DATA_DEFAULTS.skip_bad),
)


def _run_config(args) -> RunConfig:
    for name, flag, applies, needs, default in _ONLY_FOR:
        if getattr(args, name) not in (None, False) and not applies(args):
            raise ValueError(f"{flag} applies to {needs} only")
        if getattr(args, name) is None:
            setattr(args, name, default)
    return RunConfig(
        ModelConfig(model=args.model, hidden=args.hidden, num_blocks=args.blocks,
                    num_heads=args.heads, max_len=args.max_len, dropout=args.dropout,
                    block=args.block, key_kernel=args.key_kernel,
                    value_kernel=args.value_kernel, share_key_kernel=args.share_key_kernel,
                    share_value_kernel=not args.per_layer_value_kernel,
                    normalize_kernels=not args.no_normalize_kernels,
                    add_positional_embedding=args.add_positional_embedding),
        TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                    patience=args.patience, seed=args.seed, loss=args.loss,
                    num_negatives=args.negatives, device=args.device, amp=args.amp,
                    report_ks=args.report_k),
        DataConfig(path=args.data, format=_train_format(args.data, args.format),
                   protocol=args.protocol,
                   val_start=args.val_start, test_start=args.test_start,
                   max_eval_events=args.max_eval_events, name=args.name,
                   columns=args.columns.split(",") if args.columns is not None else None,
                   sep=_separator(args.sep), skip_bad=args.skip_bad),
    )


def _cutoffs(text: str) -> list[int]:
    """--report-k: comma-separated positive integers."""
    try:
        ks = [int(part) for part in text.split(",")]
    except ValueError:
        ks = []
    if not ks or min(ks) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers such as 5,10,20, got {text!r}")
    return ks


def _checked(convert, ok, expected: str):
    """An argparse type: ``convert`` the text, then require ``ok`` of the value, so that a bad
    number is a usage error naming its flag rather than a traceback from deep in training."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value
    return parse


_positive_int = _checked(int, lambda v: v >= 1, "a positive integer")
_positive_float = _checked(float, lambda v: math.isfinite(v) and v > 0, "a positive number")
_probability = _checked(float, lambda v: 0.0 <= v < 1.0, "a number in [0, 1)")
_quantile = _checked(float, lambda v: 0.0 < v < 1.0, "a number in (0, 1)")
# torch.manual_seed takes at most 2**64 - 1: a larger seed failed with a traceback once the data
# had been read and split.
_seed = _checked(int, lambda v: 0 <= v < 2**64, "a non-negative integer below 2**64")
_path = _checked(str, bool, "a path")  # an empty one (an unset shell variable) is no path


_SUFFIX_FORMATS = {".inter": "recbole", ".csv": "csv", ".tsv": "csv"}


def _train_format(data: str | None, fmt: str | None) -> str:
    """train's --format: as given; else the one --data's suffix names, or the synthetic data."""
    if fmt is not None:
        return fmt
    if data is None:
        return "synthetic"
    suffix = os.path.splitext(data)[1].lower()
    if suffix not in _SUFFIX_FORMATS:
        raise ValueError(f"--format is needed for {data}: s3rec ('user item item ...' lines), "
                         f"sasrec ('user item' lines), recbole or csv")
    return _SUFFIX_FORMATS[suffix]


def _device(text: str) -> str:
    """--device: cpu, cuda or cuda:N that this machine has (checked before any work is done)."""
    problem = device_problem(text)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return text


def _separator(sep: str | None) -> str | None:
    """--sep as typed: a shell passes a tab as the two characters backslash and t, or as 'tab'."""
    return "\t" if sep in ("\\t", "tab") else sep


def cmd_train(args) -> None:
    args.device = rank_device(args.device)
    try:
        cfg = _run_config(args)
    except ValueError as e:  # a bad combination of flags: a message, not a traceback
        raise SystemExit(f"pka-rec train: {e}") from None
    _init_distributed(args.device)
    try:
        train_run(cfg, args.out, resume=args.resume, progress=not args.no_progress)
        if dist.is_initialized():
            # Ranks that finished reach the teardown together: one tearing down gloo while its peer
            # was still connected could abort the process (seen in tests/ddp_worker.py). Not after
            # an error, where the other ranks may never arrive.
            dist.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _data_config(args, dc: DataConfig) -> DataConfig:
    """The training run's data config with evaluate's, recommend's or plot-kernels' --data,
    --format, ... applied."""
    if args.format is not None and args.format != dc.format:
        # The training run's csv columns and separator describe its file, not this one.
        dc = dataclasses.replace(dc, format=args.format, columns=None, sep=None)
    changes = {}
    if args.data is not None:
        changes["path"] = args.data
        named = _SUFFIX_FORMATS.get(os.path.splitext(args.data)[1].lower())
        if args.format is None and named is not None and named != dc.format:
            # The suffix names this file's format (as in train): the training run's csv columns
            # and separator described another file, as with a --format that differs.
            dc = dataclasses.replace(dc, format=named, columns=None, sep=None)
        elif args.format is None and dc.format in ("synthetic", "events"):
            try:  # no file format to inherit and none named: train's error, asking for --format
                changes["format"] = _train_format(args.data, None)
            except ValueError as e:
                raise SystemExit(f"pka-rec {args.command}: {e}") from None
    if args.columns is not None:
        changes["columns"] = args.columns.split(",")
    if args.sep is not None:
        changes["sep"] = _separator(args.sep)
    if args.skip_bad:
        changes["skip_bad"] = True
    try:
        return dataclasses.replace(dc, **changes)
    except ValueError as e:
        raise SystemExit(f"pka-rec {args.command}: {e}") from None


def cmd_evaluate(args) -> None:
    ckpt = load_checkpoint(args.checkpoint, args.device)
    cfg = RunConfig.from_dict(ckpt["config"])
    dc = _data_config(args, cfg.data)
    data = load_interactions(dc, cfg.train.seed)
    if data.item_ids != ckpt["id_maps"]["items"]:
        raise SystemExit(f"{args.checkpoint}: its item id map does not match the data")
    rec = Recommender.from_checkpoint(ckpt, args.device)  # the file is read once
    split = make_split(data, dc)
    if args.report_k is not None:
        cfg.train = dataclasses.replace(cfg.train, report_ks=args.report_k)
    print(json.dumps(evaluate_split(rec.model, split, cfg.train, args.device), indent=2))


def _check_csv_out(out: str, inputs: dict) -> None:
    """recommend's --out, checked before the data is read and every user scored: not a folder,
    in a folder that exists, and not one of the command's own input files (it would be
    overwritten)."""
    if os.path.isdir(out):
        raise SystemExit(f"pka-rec recommend: --out {out} is a folder; name a CSV file, such as "
                         f"{os.path.join(out, 'recs.csv')}")
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise SystemExit(f"pka-rec recommend: --out {out}: its folder {folder} does not exist")
    for flag, path in inputs.items():
        if path and os.path.exists(out) and os.path.exists(path) and os.path.samefile(out, path):
            raise SystemExit(f"pka-rec recommend: --out {out} is the {flag} file")


def cmd_recommend(args) -> None:
    rec = Recommender.load(args.checkpoint, args.device)
    if not 1 <= args.k <= len(rec.vocab):
        raise SystemExit(f"pka-rec recommend: -k must be in [1, {len(rec.vocab)}], got {args.k}")
    exclude_seen = not args.include_seen
    if args.history is not None:
        given = [flag for flag, value in (("--format", args.format), ("--columns", args.columns),
                                          ("--sep", args.sep), ("--skip-bad", args.skip_bad),
                                          ("--out", args.out != "-")) if value]
        if given:
            raise SystemExit(f"pka-rec recommend: {', '.join(given)} apply to --data, not --history")
        history = args.history.split()
        top = rec.recommend(history, args.k, exclude_seen=exclude_seen)
        if not top:  # not an empty line and success
            if any(item in rec.vocab.index for item in history):
                # Known items, all of them left out as seen: a different cause, a different fix.
                raise SystemExit("pka-rec recommend: every item the model knows is in --history "
                                 "and left out as seen; --include-seen allows them")
            raise SystemExit("pka-rec recommend: no item of --history is known to the model")
        print(" ".join(top))
        return
    if args.out != "-":
        _check_csv_out(args.out, {"--data": args.data, "--checkpoint": args.checkpoint})
    data = load_interactions(_data_config(args, rec.config.data), rec.config.train.seed)
    histories = [data.vocab.decode(s) for s in data.sequences]
    recs = rec.recommend(histories, args.k, exclude_seen=exclude_seen, with_scores=True)
    f = sys.stdout if args.out == "-" else open(args.out, "w", newline="")
    try:
        w = csv.writer(f)
        w.writerow(["user", "rank", "item", "score"])
        for user, top in zip(data.user_ids, recs):
            w.writerows((user, r, item, f"{score:.6g}") for r, (item, score) in enumerate(top, 1))
    finally:
        if f is not sys.stdout:
            f.close()
    if args.out != "-":
        print(f"wrote top-{args.k} items for {sum(map(bool, recs))} of {len(recs)} users to "
              f"{args.out}", file=sys.stderr)


def cmd_plot(args) -> None:
    from pka_ext.rec.plots import check_image_path, plot_kernels

    try:  # a bad --out, nothing to plot or no history long enough: one line, no traceback
        check_image_path(args.out)
        rec = Recommender.load(args.checkpoint, args.device)
        contexts = None
        if args.data or rec.config.data.format == "synthetic":
            data = load_interactions(_data_config(args, rec.config.data), rec.config.train.seed)
            # The file's own numbering to the model's; items the model never saw are left out.
            contexts = [rec.vocab.encode(data.vocab.decode(s), unknown="skip")
                        for s in data.sequences]
        plot_kernels(rec.model, args.out, contexts)
    except ValueError as e:
        raise SystemExit(f"pka-rec plot-kernels: {e}") from None
    print(f"wrote {args.out}")


def cmd_demo(args) -> None:
    """PSA vs SASRec on the embedded synthetic data: small models, a few epochs, a table."""
    rows = []
    for model in ("psa", "sasrec"):
        cfg = RunConfig(
            ModelConfig(model=model, hidden=64, num_blocks=2, num_heads=1, max_len=40, dropout=0.1),
            TrainConfig(epochs=args.epochs, batch_size=128, lr=2e-3, patience=3, seed=args.seed),
            DataConfig(format="synthetic", protocol="loo"),
        )
        print(f"--- training {model} ---", flush=True)
        rows.append(train_run(cfg, os.path.join(args.out, model), progress=False))
    print("\nPSA vs SASRec on the embedded synthetic data (leave-one-out, full ranking)")
    print("| model | val NDCG@10 | test NDCG@10 | test HR@10 | test COV@10 | best epoch | train s |")
    print("|---|---|---|---|---|---|---|")
    for m in rows:
        t = m["test"]
        print(f"| {m['model']} | {m['val']['ndcg@10']:.4f} | {t['ndcg@10']:.4f} | {t['hr@10']:.4f} | "
              f"{t['cov@10']:.4f} | {m['best_epoch']} | {m['train_seconds']:.1f} |")


def _option(parser, *flags, help: str, **kw) -> None:
    """add_argument, with the default (where there is one to state) written after the help."""
    if kw.get("default") is not None and kw.get("action") != "store_true":
        help += " (default: %(default)s)"
    parser.add_argument(*flags, help=help, **kw)


def _data_options(parser, *, data: bool = True) -> None:
    """evaluate's, recommend's and plot-kernels' data file options; each defaults to the training
    run's."""
    if data:
        _option(parser, "--data", default=None, help="data file (default: the one it was trained on)")
    _option(parser, "--format", default=None, choices=sorted(FORMATS) + ["synthetic"],
            help="its format (default: the training run's)")
    _option(parser, "--columns", default=None, metavar="USER,ITEM[,TIME]",
            help="csv: user, item and time column names (default: the training run's)")
    _option(parser, "--sep", default=None,
            help="csv: the field separator, one character or 'tab' (default: the training run's)")
    _option(parser, "--skip-bad", action="store_true",
            help="skip malformed data lines with one warning (default: the training run's choice)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pka-rec", description=__doc__.replace("``", ""),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model, write metrics.json and checkpoint.pt")
    _option(t, "--data", default=None, help="data file (not needed for --format synthetic)")
    _option(t, "--format", default=None, choices=sorted(FORMATS) + ["synthetic"],
            help="s3rec: 'user item item ...' lines; sasrec: 'user item' lines in time order; "
            "recbole: an atomic .inter file; csv: a CSV/TSV with a header row (see --columns); "
            "synthetic: the embedded generated data (default: recbole for a .inter file, csv for "
            ".csv and .tsv, required for other files; synthetic without --data)")
    _option(t, "--columns", default=None, metavar="USER,ITEM[,TIME]",
            help="csv: the header names of the user, item and time columns; name two for a file "
            "without times, whose rows are then in time order per user (default: "
            "user_id,item_id,timestamp)")
    _option(t, "--sep", default=None,
            help="csv: the field separator, one character or 'tab' (default: tab for .tsv, else "
            "comma)")
    _option(t, "--skip-bad", action="store_true",
            help="skip malformed data lines with one warning that counts them and shows the first "
            "(default: stop at the first, naming file:line)")
    _option(t, "--protocol", default=_DATA_DEFAULTS.protocol, choices=PROTOCOLS,
            help="leave-one-out, or the global temporal split (needs timestamps)")
    _option(t, "--model", default=_MODEL_DEFAULTS.model, choices=MODELS,
            help="PSA, or a baseline: learned absolute positions, none, rotary")
    _option(t, "--epochs", type=_positive_int, default=_TRAIN_DEFAULTS.epochs,
            help="most epochs (early stopping may end sooner)")
    _option(t, "--seed", type=_seed, default=_TRAIN_DEFAULTS.seed,
            help="weights, batch order, dropout, negatives, synthetic data")
    _option(t, "--max-len", type=_positive_int, default=_MODEL_DEFAULTS.max_len,
            help="context length T (the most recent items)")
    _option(t, "--hidden", type=_positive_int, default=_MODEL_DEFAULTS.hidden,
            help="embedding and hidden size D")
    _option(t, "--blocks", type=_positive_int, default=_MODEL_DEFAULTS.num_blocks,
            help="transformer blocks")
    _option(t, "--heads", type=_positive_int, default=_MODEL_DEFAULTS.num_heads,
            help="attention heads")
    _option(t, "--dropout", type=_probability, default=_MODEL_DEFAULTS.dropout,
            help="embedding, attention and residual dropout")
    _option(t, "--block", default=_MODEL_DEFAULTS.block, choices=BLOCKS,
            help="pre-LN blocks, or the authors' (attention residual from LayerNorm(X))")
    k = t.add_argument_group("psa kernels (ablations; defaults are the paper's best setting)")
    _option(k, "--key-kernel", default=_MODEL_DEFAULTS.key_kernel, choices=KERNELS,
            help="A_k's form")
    _option(k, "--value-kernel", default=_MODEL_DEFAULTS.value_kernel, choices=KERNELS,
            help="A_v's form")
    _option(k, "--share-key-kernel", action="store_true", help="one key kernel for all layers")
    _option(k, "--per-layer-value-kernel", action="store_true",
            help="one value kernel per layer instead of one shared by all layers")
    _option(k, "--no-normalize-kernels", action="store_true",
            help="train the kernels unnormalised (L2 for Toeplitz, Frobenius for full)")
    _option(k, "--add-positional-embedding", action="store_true",
            help="psa plus learned absolute positional embeddings")
    _option(t, "--batch-size", type=_positive_int, default=_TRAIN_DEFAULTS.batch_size,
            help="sequences per step (global, under DDP)")
    _option(t, "--lr", type=_positive_float, default=_TRAIN_DEFAULTS.lr, help="Adam learning rate")
    _option(t, "--patience", type=_positive_int, default=_TRAIN_DEFAULTS.patience,
            help=f"epochs without a better validation NDCG@{_TRAIN_DEFAULTS.eval_k} before "
            "stopping")
    _option(t, "--loss", default=_TRAIN_DEFAULTS.loss, choices=LOSSES,
            help="full-catalogue cross-entropy, or sampled softmax with uniform negatives")
    _option(t, "--negatives", type=_positive_int, default=None,
            help=f"negatives for --loss sampled (default: {_TRAIN_DEFAULTS.num_negatives})")
    _option(t, "--val-start", type=_quantile, default=None,
            help=f"temporal: validation quantile (default: {_DATA_DEFAULTS.val_start})")
    _option(t, "--test-start", type=_quantile, default=None,
            help=f"temporal: test quantile (default: {_DATA_DEFAULTS.test_start})")
    _option(t, "--max-eval-events", type=_positive_int, default=_DATA_DEFAULTS.max_eval_events,
            help="temporal: evaluate the first N validation and test events in time order "
                 "(default: all of them)")
    _option(t, "--report-k", type=_cutoffs, metavar="K[,K...]",
            default=",".join(map(str, _TRAIN_DEFAULTS.report_ks)),
            help=f"cutoffs of the NDCG, HR and COV in metrics.json (early stopping uses "
            f"NDCG@{_TRAIN_DEFAULTS.eval_k})")
    _option(t, "--device", type=_device, default=_TRAIN_DEFAULTS.device, help="cpu, cuda or cuda:N")
    _option(t, "--amp", action="store_true",
            help="bfloat16 autocast for training (evaluation stays float32)")
    _option(t, "--name", default=None,
            help="data set name for metrics.json (default: the data file's name)")
    _option(t, "--resume", type=_path, default=None, help="checkpoint.pt to resume from")
    _option(t, "--no-progress", action="store_true", help="no progress bar (one line per epoch)")
    _option(t, "--out", type=_path, required=True,
            help="folder for metrics.json and checkpoint.pt")
    t.set_defaults(fn=cmd_train)

    e = sub.add_parser("evaluate", help="recompute val/test metrics of a checkpoint")
    _option(e, "--checkpoint", required=True, help="a checkpoint.pt written by train")
    _data_options(e)
    _option(e, "--report-k", type=_cutoffs, default=None, metavar="K[,K...]",
            help="cutoffs of the metrics (default: the training run's)")
    _option(e, "--device", type=_device, default="cpu", help="cpu, cuda or cuda:N")
    e.set_defaults(fn=cmd_evaluate)

    r = sub.add_parser("recommend", help="top-k items for a history, or for every user of a file")
    _option(r, "--checkpoint", required=True, help="a checkpoint.pt written by train")
    which = r.add_mutually_exclusive_group(required=True)
    _option(which, "--history", default=None,
            help='space-separated item ids, oldest first, e.g. "12 7 99"; prints the top k')
    _option(which, "--data", default=None,
            help="a data file: recommends for each of its users from their whole history and writes "
            "CSV rows user,rank,item,score (see --out)")
    _data_options(r, data=False)
    _option(r, "-k", type=_positive_int, default=10, help="how many items")
    _option(r, "--include-seen", action="store_true",
            help="allow items of the history in the recommendations (default: leave them out)")
    _option(r, "--out", default="-", help="--data: the CSV file, '-' for standard output")
    _option(r, "--device", type=_device, default="cpu", help="cpu, cuda or cuda:N")
    r.set_defaults(fn=cmd_recommend)

    pk = sub.add_parser("plot-kernels", help="draw learned kernels (psa) and mean attention (PNG)")
    _option(pk, "--checkpoint", required=True, help="a checkpoint.pt written by train")
    _option(pk, "--data", default=None,
            help="data for the attention heatmap (default: the built-in data for a run trained on "
            "it, else no heatmap)")
    _data_options(pk, data=False)
    _option(pk, "--out", required=True, help="PNG file")
    _option(pk, "--device", type=_device, default="cpu", help="cpu, cuda or cuda:N")
    pk.set_defaults(fn=cmd_plot)

    d = sub.add_parser("demo", help="PSA vs SASRec on the embedded synthetic data")
    _option(d, "--epochs", type=_positive_int, default=8, help="most epochs per model")
    _option(d, "--seed", type=_seed, default=0, help="data, weights and training")
    _option(d, "--out", default="runs/demo", help="folder for both runs")
    d.set_defaults(fn=cmd_demo)
    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except BrokenPipeError:
        # The reader of stdout stopped early (`| head`): as with any filter, no message. stdout goes
        # to /dev/null so that the interpreter's flush at exit does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(1) from None
    # The user's files (named, with the line for data) or a diverged run, not our code: a
    # message, no traceback.
    except (DataError, CheckpointError, OSError, TrainingDiverged) as e:
        raise SystemExit(f"pka-rec {args.command}: {e}") from None


if __name__ == "__main__":
    main(sys.argv[1:])
