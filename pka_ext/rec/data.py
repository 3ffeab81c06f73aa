"""Interaction data: the in-memory container, the item vocabulary and readers for file formats.

Every reader returns an :class:`Interactions`: one chronological sequence of remapped item ids per
user. Remapped ids run from 1 to ``num_items``; 0 is reserved for padding. Users keep the order in
which they first appear in the file, items are numbered in the order in which they first appear in
the file (for timestamped formats: file order, not time order), and the original ids are kept as the
strings found in the file, so ``"007"`` and ``"7"`` are different items.

Errors in a file raise :class:`DataError` with a message that starts with ``path:line:``. With
``skip_bad=True`` a reader skips bad data lines instead, and warns once (:class:`DataWarning`) with
the number of skipped lines and the first one; a bad header is always an error.

Formats (``load(path, fmt)``):

``"s3rec"``
    One line per user: ``user item_1 ... item_n``, whitespace separated, non-negative decimal
    integers, items in chronological order (S3-Rec / FMLP-Rec / BSARec Amazon files).
``"sasrec"``
    One ``user item`` pair per line, integers, chronological within each user; lines of different
    users may be interleaved (SASRec files).
``"recbole"``
    RecBole atomic ``.inter`` file: a tab-separated header of ``name:type`` fields that must include
    ``user_id`` and ``item_id`` and may include ``timestamp``, then tab-separated rows.
``"csv"``
    Comma- or tab-separated file with a header row naming the columns.
"""

from __future__ import annotations

import csv
import errno
import functools
import numbers
import re
import sys
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

__all__ = [
    "DataError",
    "DataWarning",
    "ItemVocab",
    "Interactions",
    "read_s3rec",
    "read_sasrec_pairs",
    "read_recbole_inter",
    "read_csv",
    "load",
    "FORMATS",
]

_INTEGER = re.compile(r"[0-9]+")


class DataError(ValueError):
    """A data file or an :class:`Interactions` object is malformed."""


class DataWarning(UserWarning):
    """A reader skipped bad lines because ``skip_bad=True``."""


@dataclass
class ItemVocab:
    """Bijection between original item ids (strings) and remapped ids ``1..len(ids)``.

    Parameters
    ----------
    ids : list of str
        ``ids[i - 1]`` is the original id of remapped item ``i``. The list is copied.

    Raises
    ------
    DataError
        If an original id occurs twice.
    """

    ids: list[str] = field(default_factory=list)
    index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.ids = list(self.ids)
        self.index = {}
        for i, raw in enumerate(self.ids, start=1):
            if raw in self.index:
                raise DataError(f"item id {raw!r} occurs twice in the vocabulary "
                                f"(remapped ids {self.index[raw]} and {i})")
            self.index[raw] = i

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, raw: str) -> int:
        """Return the remapped id of ``raw``, giving it the next free id if it is new."""
        i = self.index.get(raw)
        if i is None:
            self.ids.append(raw)
            i = self.index[raw] = len(self.ids)
        return i

    def encode(self, raw: Iterable[str], unknown: str = "error") -> np.ndarray:
        """Map original ids to remapped ids.

        Parameters
        ----------
        raw : iterable of str
            Original ids.
        unknown : {"error", "skip"}
            What to do with an id that is not in the vocabulary: raise, or leave it out of the
            result.

        Returns
        -------
        np.ndarray
            int64 remapped ids, in the order of ``raw``.

        Raises
        ------
        KeyError
            If ``unknown="error"`` and an id is not in the vocabulary; the message names the id.
        """
        if unknown not in ("error", "skip"):
            raise ValueError(f"unknown must be 'error' or 'skip', got {unknown!r}")
        out = []
        for r in raw:
            i = self.index.get(r)
            if i is not None:
                out.append(i)
            elif unknown == "error":
                raise KeyError(f"item id {r!r} is not in the vocabulary ({len(self)} items)")
        return np.asarray(out, dtype=np.int64)

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Map remapped ids back to original ids.

        Raises
        ------
        KeyError
            If an id is outside ``1..len(self)`` (0, the padding id, included).
        """
        out = []
        for i in np.asarray(ids, dtype=np.int64).ravel().tolist():
            if not 1 <= i <= len(self.ids):
                raise KeyError(f"remapped item id {i} is outside 1..{len(self.ids)}")
            out.append(self.ids[i - 1])
        return out

    def to_dict(self) -> dict[str, list[str]]:
        """``{"items": ids}``, the same layout as :meth:`Interactions.id_maps`."""
        return {"items": list(self.ids)}

    @classmethod
    def from_dict(cls, maps: dict[str, list[str]]) -> ItemVocab:
        """Rebuild from :meth:`to_dict` or :meth:`Interactions.id_maps` output."""
        if "items" not in maps:
            raise KeyError(f"id maps have no 'items' entry (keys: {sorted(maps)})")
        return cls(list(maps["items"]))


def _column(name: str, values: Iterable) -> list:
    if isinstance(values, (str, bytes, dict)):
        # Iterating a string would make each character an event, a dict its keys.
        kind = "dict" if isinstance(values, dict) else "string"
        raise DataError(f"{name} must be a column of values (a list, array or Series), not a "
                        f"{kind}")
    if getattr(values, "ndim", 1) != 1:
        raise DataError(f"{name} must be one-dimensional, got shape {tuple(values.shape)}")
    return list(values)


def _missing(value) -> bool:
    """None, a NaN or pandas' NA / NaT: what a DataFrame holds where a value is missing."""
    if value is None or type(value).__name__ in ("NAType", "NaTType"):
        return True
    return isinstance(value, numbers.Real) and value != value


def _id_column(name: str, values: Iterable) -> list[str]:
    """``str`` of each id; a missing or empty one is an error naming its index, not an id."""
    out = _column(name, values)
    for n, value in enumerate(out):
        if _missing(value):
            raise DataError(f"{name}[{n}] is missing ({value!r})")
        if isinstance(value, (bytes, bytearray)):
            # numpy 'S' arrays and h5py hold ids as bytes, whose str() would make b"A" the id
            # "b'A'"; decoded like the files, so b"A" and "A" are the same id.
            try:
                value = bytes(value).decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{name}[{n}] is bytes that are not UTF-8 ({value!r})") from None
        try:
            out[n] = str(value)
        except ValueError as e:  # an int past Python's digit limit for str()
            raise DataError(f"{name}[{n}] cannot be made an id: {e}") from None
        if not out[n]:
            raise DataError(f"{name}[{n}] is an empty id")
    return out


def _time_column(values: Iterable) -> np.ndarray:
    """float64 times; one that is not a finite number is an error naming its index."""
    values = _column("times", values)
    t = np.empty(len(values), dtype=np.float64)
    for n, value in enumerate(values):
        try:
            t[n] = float(value)
        except (TypeError, ValueError, OverflowError):  # OverflowError: an int beyond float
            t[n] = np.nan
        if not np.isfinite(t[n]):
            raise DataError(f"times[{n}] is {value!r}, not a finite number")
    return t


@dataclass
class Interactions:
    """User-item interaction sequences with their id maps.

    Parameters
    ----------
    sequences : list of np.ndarray
        One int64 array per user of remapped item ids in ``1..num_items``, oldest first.
    timestamps : list of np.ndarray or None
        float64 event times aligned with ``sequences``; None when the source has no times.
    item_ids : list of str
        Original id of remapped item ``i`` is ``item_ids[i - 1]``.
    user_ids : list of str
        Original id of user ``u`` (the index into ``sequences``) is ``user_ids[u]``.

    Raises
    ------
    DataError
        If the fields disagree in length, a sequence is not integer, or an id is out of range.
    """

    sequences: list[np.ndarray]
    timestamps: list[np.ndarray] | None
    item_ids: list[str]
    user_ids: list[str]

    def __post_init__(self) -> None:
        if len(self.sequences) != len(self.user_ids):
            raise DataError(f"{len(self.sequences)} sequences but {len(self.user_ids)} user ids")
        if self.timestamps is not None and len(self.timestamps) != len(self.sequences):
            raise DataError(f"{len(self.timestamps)} timestamp arrays but "
                            f"{len(self.sequences)} sequences")
        seqs = []
        for u, s in enumerate(self.sequences):
            s = np.asarray(s)
            if s.ndim != 1 or (s.size and s.dtype.kind not in "iu"):
                raise DataError(f"user {u} ({self.user_ids[u]!r}): sequence must be a 1-d integer "
                                f"array, got dtype {s.dtype} and shape {s.shape}")
            if s.size and (s.min() < 1 or s.max() > len(self.item_ids)):
                raise DataError(f"user {u} ({self.user_ids[u]!r}): item ids must lie in "
                                f"1..{len(self.item_ids)}, got range {s.min()}..{s.max()}")
            seqs.append(s.astype(np.int64, copy=False))
        self.sequences = seqs
        if self.timestamps is not None:
            times = []
            for u, (s, t) in enumerate(zip(self.sequences, self.timestamps)):
                t = np.asarray(t, dtype=np.float64)
                if t.shape != s.shape:
                    raise DataError(f"user {u} ({self.user_ids[u]!r}): {t.size} timestamps for "
                                    f"{s.size} events")
                times.append(t)
            self.timestamps = times

    @classmethod
    def from_events(cls, users: Iterable, items: Iterable,
                    times: Iterable[float] | None = None) -> Interactions:
        """Build from parallel event columns (a DataFrame's, say), numbered like the file readers.

        Parameters
        ----------
        users, items : iterable
            One user id and one item id per event. Ids are kept as ``str(id)``, so ``7`` and
            ``"7"`` are the same item (and ``7.0`` another one); bytes are decoded as UTF-8, so
            ``b"7"`` is that item too.
        times : iterable of float, optional
            Event times; each user's events are sorted by them with a stable sort, so ties keep
            their order. Without times the events are taken to be chronological per user.

        Raises
        ------
        DataError
            If a column is a string, the columns differ in length or hold no events, or an id is
            empty, missing (None, NaN, pandas' NA) or bytes that are not UTF-8, or a time is not a
            finite number (naming the column and the event's index).
        """
        users, items = _id_column("users", users), _id_column("items", items)
        if len(users) != len(items):
            raise DataError(f"users has {len(users)} events but items has {len(items)}")
        t = None
        if times is not None:
            t = _time_column(times)
            if t.shape != (len(users),):
                raise DataError(f"times has shape {t.shape}, expected ({len(users)},)")
        out = _Builder("events", timed=t is not None)
        for n, (u, i) in enumerate(zip(users, items)):
            out.add(u, i, None if t is None else float(t[n]))
        return out.build(_BadLines("events", skip=False))

    @property
    def num_items(self) -> int:
        """Number of distinct items; remapped ids run from 1 to this."""
        return len(self.item_ids)

    @property
    def num_users(self) -> int:
        """Number of users (sequences)."""
        return len(self.user_ids)

    @property
    def num_events(self) -> int:
        """Total number of interactions over all users."""
        return sum(len(s) for s in self.sequences)

    @cached_property
    def vocab(self) -> ItemVocab:
        """Item vocabulary of ``item_ids``, built on first use (so do not mutate ``item_ids``)."""
        return ItemVocab(self.item_ids)

    def id_maps(self) -> dict[str, list[str]]:
        """``{"items": item_ids, "users": user_ids}`` (copies), e.g. to store with a checkpoint."""
        return {"items": list(self.item_ids), "users": list(self.user_ids)}


class _BadLines:
    """Raises on a bad line, or with ``skip=True`` counts it for one warning at the end."""

    def __init__(self, path: Path, skip: bool):
        self.path, self.skip = path, skip
        self.count = 0
        self.first: str | None = None

    def __call__(self, lineno: int, what: str) -> None:
        where = f"{self.path}:{lineno}: {what}"
        if not self.skip:
            raise DataError(where)
        self.count += 1
        if self.first is None:
            self.first = where

    def warn(self) -> None:
        if self.count:
            # Attributed to the first caller outside this module (read_*, load, the decorator).
            level, frame = 1, sys._getframe()
            while frame is not None and frame.f_globals.get("__name__") == __name__:
                frame, level = frame.f_back, level + 1
            warnings.warn(f"{self.path}: skipped {self.count} bad line(s); first: {self.first}",
                          DataWarning, stacklevel=level)


class _Builder:
    """Collects (user, item[, time]) events in file order and assembles an :class:`Interactions`."""

    def __init__(self, path: Path, timed: bool):
        self.path, self.timed = path, timed
        self.vocab = ItemVocab()
        self.user_index: dict[str, int] = {}
        self.items: list[list[int]] = []
        self.times: list[list[float]] = []

    def user(self, raw: str) -> int:
        u = self.user_index.get(raw)
        if u is None:
            u = self.user_index[raw] = len(self.items)
            self.items.append([])
            self.times.append([])
        return u

    def add(self, user: str, item: str, time: float | None = None) -> None:
        u = self.user(user)
        self.items[u].append(self.vocab.add(item))
        if self.timed:
            self.times[u].append(time)

    def build(self, bad: _BadLines) -> Interactions:
        bad.warn()
        if not any(self.items):
            skipped = f" ({bad.count} bad line(s) skipped, first: {bad.first})" if bad.count else ""
            raise DataError(f"{self.path}: empty: no data rows{skipped}")
        seqs = [np.asarray(s, dtype=np.int64) for s in self.items]
        times = None
        if self.timed:
            times = [np.asarray(t, dtype=np.float64) for t in self.times]
            # Stable, so events with equal timestamps keep their file order.
            order = [np.argsort(t, kind="stable") for t in times]
            seqs = [s[o] for s, o in zip(seqs, order)]
            times = [t[o] for t, o in zip(times, order)]
        return Interactions(seqs, times, self.vocab.ids, list(self.user_index))


def _reader(read):
    """Reports text that is not UTF-8 as a DataError naming the file and line, for any reader."""
    @functools.wraps(read)
    def wrapped(path, *args, **kw):
        try:
            return read(path, *args, **kw)
        except UnicodeDecodeError:
            raise DataError(_not_utf8(Path(path))) from None
    return wrapped


def _not_utf8(path: Path) -> str:
    if not path.is_file():  # a pipe: what was read is gone, so neither the line nor gzip is known
        return f"{path}: not UTF-8 text (compressed?); convert or decompress it first"
    with path.open("rb") as f:
        if f.read(2) == b"\x1f\x8b":
            return f"{path}: gzip-compressed, not text: decompress it first"
        f.seek(0)
        for lineno, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return (f"{path}:{lineno}: not UTF-8 text (byte {raw[e.start]:#04x}); convert the "
                        f"file to UTF-8")
    return f"{path}: not UTF-8 text; convert the file to UTF-8"


def _open(path: str | Path, newline: str | None = None):
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "a folder, not a data file", str(path))
    if not path.exists():  # not is_file(): a pipe (--data <(zcat f.gz)) is read like a file
        raise FileNotFoundError(errno.ENOENT, "no such data file", str(path))
    # utf-8-sig drops a byte-order mark that spreadsheet exports put before the header.
    return path, path.open(encoding="utf-8-sig", newline=newline)


def _parse_time(token: str) -> float | None:
    try:
        t = float(token)
    except ValueError:
        return None
    return t if np.isfinite(t) else None


@_reader
def read_s3rec(path: str | Path, *, skip_bad: bool = False) -> Interactions:
    """Read an S3-Rec file: one ``user item_1 ... item_n`` line per user, chronological.

    Parameters
    ----------
    path : str or Path
        The file.
    skip_bad : bool
        Skip bad lines (blank, no items, non-integer token, repeated user) with one warning
        instead of raising.

    Returns
    -------
    Interactions
        Without timestamps.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    DataError
        ``path:line: ...`` for a bad line; ``path: empty`` if there are no data rows.
    """
    path, f = _open(path)
    bad = _BadLines(path, skip_bad)
    out = _Builder(path, timed=False)
    first_line: dict[str, int] = {}
    with f:
        for lineno, line in enumerate(f, start=1):
            tokens = line.split()
            if not tokens:
                bad(lineno, "blank line")
                continue
            if len(tokens) == 1:
                bad(lineno, f"user {tokens[0]!r} has no items")
                continue
            wrong = next((t for t in tokens if not _INTEGER.fullmatch(t)), None)
            if wrong is not None:
                bad(lineno, f"token {wrong!r} is not a non-negative integer (S3-Rec ids are "
                            "integers)")
                continue
            user = tokens[0]
            if user in first_line:
                bad(lineno, f"user {user!r} already has a line ({path}:{first_line[user]})")
                continue
            first_line[user] = lineno
            for item in tokens[1:]:
                out.add(user, item)
    return out.build(bad)


@_reader
def read_sasrec_pairs(path: str | Path, *, skip_bad: bool = False) -> Interactions:
    """Read a SASRec file: one ``user item`` integer pair per line, chronological per user.

    Parameters
    ----------
    path : str or Path
        The file.
    skip_bad : bool
        Skip bad lines (not exactly two integer columns) with one warning instead of raising.

    Returns
    -------
    Interactions
        Without timestamps.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    DataError
        ``path:line: ...`` for a bad line; ``path: empty`` if there are no data rows.
    """
    path, f = _open(path)
    bad = _BadLines(path, skip_bad)
    out = _Builder(path, timed=False)
    with f:
        for lineno, line in enumerate(f, start=1):
            tokens = line.split()
            if len(tokens) != 2:
                bad(lineno, f"expected 2 columns 'user item', got {len(tokens)}")
                continue
            wrong = next((t for t in tokens if not _INTEGER.fullmatch(t)), None)
            if wrong is not None:
                bad(lineno, f"token {wrong!r} is not a non-negative integer")
                continue
            out.add(tokens[0], tokens[1])
    return out.build(bad)


@_reader
def read_recbole_inter(path: str | Path, *, skip_bad: bool = False) -> Interactions:
    """Read a RecBole atomic ``.inter`` file.

    The first line is a tab-separated header of ``name:type`` fields (e.g.
    ``user_id:token	item_id:token	rating:float	timestamp:float``); ``user_id`` and ``item_id`` are
    required, ``timestamp`` is optional, other fields are ignored. Each user's events are sorted by
    timestamp with a stable sort, so ties keep their file order.

    Parameters
    ----------
    path : str or Path
        The file.
    skip_bad : bool
        Skip bad rows (wrong number of fields, empty id, non-numeric timestamp) with one warning
        instead of raising. A bad header always raises.

    Returns
    -------
    Interactions
        With timestamps if the header has a ``timestamp`` field.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    DataError
        ``path:1: ...`` for a bad header, ``path:line: ...`` for a bad row; ``path: empty`` if there
        are no data rows.
    """
    path, f = _open(path)
    bad = _BadLines(path, skip_bad)
    with f:
        header = f.readline().rstrip("\r\n")
        if not header.strip():
            raise DataError(f"{path}: empty: no header")
        names, types = [], []
        for spec in header.split("\t"):
            name, colon, typ = spec.strip().partition(":")
            if not colon or not name or not typ or any(c.isspace() for c in spec.strip()):
                raise DataError(f"{path}:1: header field {spec!r} is not of the form name:type "
                                f"(fields are tab-separated; header: {header!r})")
            names.append(name)
            types.append(typ)
        for required in ("user_id", "item_id"):
            if required not in names:
                raise DataError(f"{path}:1: header has no {required} field (fields: {names})")
        if len(set(names)) != len(names):
            raise DataError(f"{path}:1: header repeats a field name (fields: {names})")
        for required in ("user_id", "item_id"):
            typ = types[names.index(required)]
            if typ != "token":
                raise DataError(f"{path}:1: {required} is of type {typ!r}; one id per row (type "
                                f"'token') is read")
        ui, ii = names.index("user_id"), names.index("item_id")
        ti = names.index("timestamp") if "timestamp" in names else None
        out = _Builder(path, timed=ti is not None)
        for lineno, line in enumerate(f, start=2):
            fields = [x.strip() for x in line.rstrip("\r\n").split("\t")]
            if len(fields) != len(names):
                bad(lineno, f"expected {len(names)} tab-separated fields, got {len(fields)}")
                continue
            user, item = fields[ui], fields[ii]
            if not user or not item:
                bad(lineno, "empty user_id or item_id")
                continue
            t = None
            if ti is not None:
                t = _parse_time(fields[ti])
                if t is None:
                    bad(lineno, f"timestamp {fields[ti]!r} is not a finite number")
                    continue
            out.add(user, item, t)
    return out.build(bad)


@_reader
def read_csv(path: str | Path, user_col: str = "user_id", item_col: str = "item_id",
             time_col: str | None = "timestamp", sep: str | None = None, *,
             skip_bad: bool = False) -> Interactions:
    """Read a delimited file whose header row names the columns.

    Parameters
    ----------
    path : str or Path
        The file.
    user_col, item_col : str
        Header names of the user and item columns.
    time_col : str or None
        Header name of the timestamp column; None when the file has none (rows are then taken to be
        chronological per user). With a time column each user's events are sorted by it with a
        stable sort, so ties keep their file order.
    sep : str, optional
        Field separator; by default a tab for a ``.tsv`` file and a comma otherwise.
    skip_bad : bool
        Skip bad rows (wrong number of fields, empty id, non-numeric timestamp) with one warning
        instead of raising. A bad header always raises.

    Returns
    -------
    Interactions
        With timestamps if ``time_col`` is given.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    DataError
        ``path:1: ...`` if a column is missing, ``path:line: ...`` for a bad row; ``path: empty`` if
        there are no data rows.
    """
    path, f = _open(path, newline="")
    if sep is None:
        sep = "\t" if path.suffix.lower() == ".tsv" else ","
    bad = _BadLines(path, skip_bad)
    with f:
        reader = csv.reader(f, delimiter=sep)
        header = next(reader, None)
        if header is None or not any(h.strip() for h in header):
            raise DataError(f"{path}: empty: no header")
        header = [h.strip() for h in header]
        wanted = [c for c in (user_col, item_col, time_col) if c is not None]
        if len(set(wanted)) != len(wanted):
            raise DataError(f"{path}: one column named for two roles (user {user_col!r}, item "
                            f"{item_col!r}, time {time_col!r})")
        repeated = [c for c in wanted if header.count(c) > 1]
        if repeated:
            raise DataError(f"{path}:1: header has column(s) {repeated} more than once, so which "
                            f"to read is ambiguous; header: {header}")
        missing = [c for c in wanted if c not in header]
        if missing:
            hint = (" (for a file without times: time_col=None, or two names in pka-rec's "
                    "--columns)") if time_col in missing else ""
            raise DataError(f"{path}:1: header has no column(s) {missing}; available columns: "
                            f"{header}{hint}")
        ui, ii = header.index(user_col), header.index(item_col)
        ti = None if time_col is None else header.index(time_col)
        out = _Builder(path, timed=ti is not None)
        lineno = reader.line_num
        while True:
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as e:  # the parser cannot go on: not skippable
                raise DataError(f"{path}:{lineno + 1}: {e} (an unclosed quote?)") from None
            # A quoted field may span lines; a row is reported at the line where it starts.
            lineno, start = reader.line_num, lineno + 1
            if not row:
                bad(start, "blank line")
                continue
            if len(row) != len(header):
                span = (f" in a row spanning lines {start}-{lineno} (an unclosed quote?)"
                        if lineno > start else "")
                bad(start, f"expected {len(header)} fields, got {len(row)}{span}")
                continue
            if any("\n" in row[c] or "\r" in row[c] for c in (ui, ii, ti) if c is not None):
                # Legal CSV in a free-text column, never in an id or a time: most likely a quote
                # left open, which swallowed the lines after it into this field.
                bad(start, f"an id or time spans lines {start}-{lineno} (an unclosed quote?)")
                continue
            user, item = row[ui].strip(), row[ii].strip()
            if not user or not item:
                bad(start, f"empty {user_col} or {item_col}")
                continue
            t = None
            if ti is not None:
                t = _parse_time(row[ti])
                if t is None:
                    bad(start, f"{time_col} {row[ti]!r} is not a finite number")
                    continue
            out.add(user, item, t)
    return out.build(bad)


FORMATS: dict[str, Callable[..., Interactions]] = {
    "s3rec": read_s3rec,
    "sasrec": read_sasrec_pairs,
    "recbole": read_recbole_inter,
    "csv": read_csv,
}


def load(path: str | Path, fmt: str, **kw) -> Interactions:
    """Read ``path`` with the reader for ``fmt`` (a key of :data:`FORMATS`), passing ``kw`` on."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown data format {fmt!r}; expected one of {sorted(FORMATS)}")
    return FORMATS[fmt](path, **kw)
