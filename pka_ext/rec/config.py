"""Run configuration: dataclasses that round-trip through dict / JSON and travel with checkpoints."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from pka_ext.modules import BACKENDS, int_at_least
from pka_ext.rec.data import FORMATS

MODELS = ("psa", "sasrec", "nope", "rope")
BLOCKS = ("pre_ln", "authors")
KERNELS = ("toeplitz", "full")
LOSSES = ("ce", "sampled")
PROTOCOLS = ("loo", "temporal")


def _require(cfg, name: str, ok, expected: str) -> None:
    """Raises a ValueError naming field ``name`` of ``cfg`` unless ``ok(value)``."""
    value = getattr(cfg, name)
    if not ok(value):
        raise ValueError(f"{name} must be {expected}, got {value!r}")


def _flag(v) -> bool:
    """True or False (numpy's too); any other value, a string such as "false" above all, would
    be taken for its truth value."""
    return isinstance(v, (bool, np.bool_))


def _optional_str(v) -> bool:
    return v is None or isinstance(v, str)


def _plain(cfg, kind, names) -> None:
    """Stores fields ``names`` of ``cfg`` (checked already) as Python ``kind`` values.

    Numpy scalars pass the checks (a sweep over ``np.arange``, say), but json cannot write them
    and the checkpoint loader (``torch.load`` with ``weights_only``) refuses them: the run would
    fail writing metrics.json once training had finished, leaving a checkpoint nothing can load.
    """
    for name in names:
        value = getattr(cfg, name)
        if value is not None:
            setattr(cfg, name, kind(value))


def cuda_device_count() -> int:
    """The CUDA devices this process can use (device_count alone can count GPUs that no usable
    driver serves)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def device_problem(device, *, here: bool = True) -> str | None:
    """None if ``device`` is a string naming a CPU or CUDA device (the kinds this code runs on)
    and, with ``here``, one this machine has; else what is wrong, as pka-rec's --device says it.

    The one device check: TrainConfig.device (the name only, as configs travel in checkpoints to
    other machines), pka-rec's --device and train_run, which checks before any work is done.
    """
    try:
        dev = torch.device(device) if isinstance(device, str) else None
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        return f"expected cpu, cuda or cuda:N, got {device!r}"
    if not here or dev.type != "cuda":
        return None
    count = cuda_device_count()
    if count == 0:
        return f"{device!r}: no CUDA device is available here"
    if (dev.index or 0) >= count:
        return f"{device!r}: this machine has {count} CUDA device(s)"
    return None


def _number(ok):
    return lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) \
        and ok(v)


# ModelConfig's fields that only psa reads; the other models accept only their defaults.
_PSA_ONLY = ("key_kernel", "value_kernel", "share_key_kernel", "share_value_kernel",
             "normalize_kernels", "add_positional_embedding")


@dataclass
class ModelConfig:
    """The sequential recommender's architecture.

    ``model`` picks the positional scheme: ``psa`` (positional kernels, no positional embedding),
    ``sasrec`` (learned absolute positional embeddings), ``nope`` (none), ``rope`` (rotary
    embeddings on queries and keys). The kernel fields and ``add_positional_embedding`` apply to
    ``psa`` only; another model refuses values other than their defaults.
    """

    model: str = "psa"
    num_items: int = 0
    hidden: int = 64
    num_blocks: int = 2
    num_heads: int = 1
    max_len: int = 50
    dropout: float = 0.2
    block: str = "pre_ln"  # "pre_ln" or "authors" (residual from LayerNorm(X), as the authors' code)
    key_kernel: str = "toeplitz"
    value_kernel: str = "full"
    share_key_kernel: bool = False
    share_value_kernel: bool = True
    normalize_kernels: bool = True
    add_positional_embedding: bool = False  # psa ablation: kernels plus absolute embeddings
    backend: str = "auto"

    def __post_init__(self):
        for name in ("hidden", "num_blocks", "num_heads", "max_len"):
            _require(self, name, int_at_least, "a positive integer")
        _require(self, "num_items", lambda v: int_at_least(v, 0),
                 "a non-negative integer (0: from the data)")
        _require(self, "dropout", _number(lambda v: 0 <= v < 1), "a number in [0, 1)")
        for name, allowed in (("model", MODELS), ("block", BLOCKS), ("key_kernel", KERNELS),
                              ("value_kernel", KERNELS), ("backend", BACKENDS)):
            _require(self, name, allowed.__contains__, f"one of {allowed}")
        for name in ("share_key_kernel", "share_value_kernel", "normalize_kernels",
                     "add_positional_embedding"):
            _require(self, name, _flag, "True or False")
        _plain(self, int, ("num_items", "hidden", "num_blocks", "num_heads", "max_len"))
        _plain(self, float, ("dropout",))
        _plain(self, bool, ("share_key_kernel", "share_value_kernel", "normalize_kernels",
                            "add_positional_embedding"))
        _plain(self, str, ("model", "block", "key_kernel", "value_kernel", "backend"))
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        psa_only = {name: getattr(self, name) for name in _PSA_ONLY
                    if getattr(self, name) != defaults[name]}
        if self.model != "psa" and psa_only:
            # Accepted silently, they would change nothing while the run's config said otherwise.
            raise ValueError(f"the PSA kernel settings apply to model 'psa' only, not "
                             f"{self.model!r}: got {psa_only}")
        if self.hidden % self.num_heads:
            raise ValueError(f"hidden={self.hidden} must be divisible by num_heads={self.num_heads}")
        if self.model == "rope" and self.hidden // self.num_heads % 2:
            # Checked here, not only by the model: that is built after the data is read and split.
            raise ValueError(f"model 'rope' rotates pairs of dimensions, so hidden / num_heads "
                             f"must be even, got hidden={self.hidden}, num_heads={self.num_heads}")


@dataclass
class TrainConfig:
    """Optimisation and evaluation settings."""

    epochs: int = 50
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    patience: int = 5
    seed: int = 0
    loss: str = "ce"  # "ce": full-catalogue cross-entropy; "sampled": sampled softmax
    num_negatives: int = 256
    eval_k: int = 10  # early stopping on validation NDCG at this cutoff
    # Cutoffs reported in metrics.json besides eval_k; 5, 10, 20 as in the S3-Rec line of work.
    report_ks: list[int] = field(default_factory=lambda: [5, 10, 20])
    eval_batch_size: int = 512
    device: str = "cpu"
    amp: bool = False  # bfloat16 autocast in the training steps; evaluation stays float32

    def __post_init__(self):
        for name in ("epochs", "batch_size", "patience", "num_negatives", "eval_batch_size"):
            _require(self, name, int_at_least, "a positive integer")
        _require(self, "lr", _number(lambda v: v > 0), "a positive number")
        _require(self, "weight_decay", _number(lambda v: v >= 0), "a non-negative number")
        _require(self, "loss", LOSSES.__contains__, "'ce' or 'sampled'")
        # numpy's seed sequences, which order the batches, take non-negative integers only.
        _require(self, "seed", lambda v: int_at_least(v, 0), "a non-negative integer")
        _require(self, "device", lambda v: device_problem(v, here=False) is None,
                 "'cpu', 'cuda' or 'cuda:N'")
        ks = self.report_ks
        self.report_ks = list(ks) if isinstance(ks, (list, tuple)) else ks
        if not isinstance(self.report_ks, list) or not all(
                int_at_least(c) for c in [self.eval_k, *self.report_ks]):
            raise ValueError(f"eval_k must be a positive integer and report_ks a list of them, "
                             f"got {self.eval_k!r} and {ks!r}")
        _require(self, "amp", _flag, "True or False")
        _plain(self, int, ("epochs", "batch_size", "patience", "seed", "num_negatives", "eval_k",
                           "eval_batch_size"))
        _plain(self, float, ("lr", "weight_decay"))
        _plain(self, bool, ("amp",))
        _plain(self, str, ("loss", "device"))
        self.report_ks = [int(k) for k in self.report_ks]

    @property
    def metric_ks(self) -> list[int]:
        """Every reported cutoff: ``report_ks`` and ``eval_k``, ascending."""
        return sorted({self.eval_k, *self.report_ks})


@dataclass
class DataConfig:
    """Where the interactions come from and how they are split."""

    path: str | None = None
    # s3rec, sasrec, recbole, csv (files); synthetic (the built-in data); events (passed from
    # Python to train_run, which sets it: such a run's data must be given again to evaluate it).
    format: str = "synthetic"
    protocol: str = "loo"  # loo or temporal
    val_start: float = 0.95
    test_start: float = 0.97
    max_eval_events: int | None = None
    name: str | None = None
    # csv only: the header names of the user, item and (optional) time columns, and the separator;
    # None: the reader's defaults (user_id, item_id, timestamp; tab for .tsv, else comma).
    columns: list[str] | None = None
    sep: str | None = None
    skip_bad: bool = False  # skip malformed data lines with one warning instead of failing

    def __post_init__(self):
        if isinstance(self.path, os.PathLike):
            self.path = os.fspath(self.path)  # a pathlib.Path, say: stored as the string it is
        _require(self, "path", _optional_str, "a file path or None")
        _require(self, "name", _optional_str, "a string or None")
        _require(self, "skip_bad", _flag, "True or False")
        _require(self, "format", (*FORMATS, "synthetic", "events").__contains__,
                 f"one of {(*FORMATS, 'synthetic', 'events')}")
        _require(self, "protocol", PROTOCOLS.__contains__, "'loo' or 'temporal'")
        for name in ("val_start", "test_start"):
            _require(self, name, _number(lambda v: 0 < v < 1), "a number in (0, 1)")
        if self.val_start > self.test_start:
            raise ValueError(f"val_start={self.val_start} must be <= test_start={self.test_start}: "
                             f"the validation period comes before the test period")
        _require(self, "max_eval_events", lambda v: v is None or int_at_least(v),
                 "a positive integer or None (all events)")
        if self.max_eval_events is not None and self.protocol != "temporal":
            # Leave-one-out scores every user; the cap, accepted, would change nothing while the
            # run's recorded config said the metrics came from that many events.
            raise ValueError(f"max_eval_events applies to the temporal protocol only, not "
                             f"{self.protocol!r}, which scores every user with at least 3 items")
        if self.format == "events" and self.path is not None:
            raise ValueError(f"format 'events' stands for events passed from Python, not a file "
                             f"({self.path}); name the file's format: {', '.join(FORMATS)}")
        if self.format == "synthetic" and self.path is not None:
            # The synthetic data ignores any file: training on it under the file's name would
            # report numbers for data the run never read.
            raise ValueError(f"a data file ({self.path}) is given with format 'synthetic', the "
                             f"built-in data; name the file's format: {', '.join(FORMATS)}")
        if self.format != "csv" and (self.columns is not None or self.sep is not None):
            raise ValueError(f"columns and sep apply to the csv format only, not {self.format!r}")
        if self.columns is not None:
            # A string would be taken for a list of one-letter names.
            _require(self, "columns", lambda v: isinstance(v, (list, tuple)) and all(
                isinstance(c, str) for c in v), "a list of column names")
            self.columns = [str(c) for c in self.columns]
            if len(self.columns) not in (2, 3) or not all(c.strip() for c in self.columns):
                raise ValueError(f"columns must name user, item and optionally time (2 or 3 "
                                 f"non-empty names), got {self.columns}")
            if len(set(self.columns)) != len(self.columns):
                raise ValueError(f"columns must be distinct (one column per role), got "
                                 f"{self.columns}")
        _require(self, "sep", lambda v: v is None or isinstance(v, str) and len(v) == 1,
                 "one character")
        _plain(self, float, ("val_start", "test_start"))
        _plain(self, int, ("max_eval_events",))
        _plain(self, bool, ("skip_bad",))
        _plain(self, str, ("path", "format", "protocol", "name", "sep"))

    def reader_options(self) -> dict:
        """Keyword arguments for :func:`pka_ext.rec.data.load`."""
        kw: dict = {"skip_bad": self.skip_bad}
        if self.columns is not None:
            kw.update(user_col=self.columns[0], item_col=self.columns[1],
                      time_col=self.columns[2] if len(self.columns) == 3 else None)
        if self.sep is not None:
            kw["sep"] = self.sep
        return kw

    @property
    def dataset_name(self) -> str:
        """``name``, else the data file's name without its suffix, else ``format``."""
        if self.name:
            return self.name
        if self.path:
            return os.path.splitext(os.path.basename(self.path.rstrip("/")))[0]
        return self.format


@dataclass
class RunConfig:
    """One run's settings, the sections in the order ``model``, ``train``, ``data``.

    ``to_dict`` / ``from_dict`` (and the JSON pair) round-trip it; checkpoints and metrics.json
    store the dict, and ``from_dict`` fills fields added since with their defaults.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def __post_init__(self):
        # RunConfig(ModelConfig(...), DataConfig(...)) would otherwise fail deep in train_run.
        for name, kind in (("model", ModelConfig), ("train", TrainConfig), ("data", DataConfig)):
            if not isinstance(getattr(self, name), kind):
                raise ValueError(f"{name} must be a {kind.__name__}, got "
                                 f"{type(getattr(self, name)).__name__} (the sections are "
                                 f"model, train, data, in that order)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        return cls(ModelConfig(**d["model"]), TrainConfig(**d["train"]), DataConfig(**d["data"]))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, s: str) -> "RunConfig":
        return cls.from_dict(json.loads(s))
