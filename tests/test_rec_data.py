"""Readers, id maps and the synthetic generator of pka_ext.rec."""

from __future__ import annotations

import math
import os
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest

from pka_ext.rec.data import (
    DataError,
    DataWarning,
    Interactions,
    ItemVocab,
    load,
    read_csv,
    read_recbole_inter,
    read_s3rec,
    read_sasrec_pairs,
)
from pka_ext.rec.synthetic import ChainProcess, make_synthetic

SHARED_DATA = Path(__file__).parents[2] / "shared" / "data"


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def seqs(data: Interactions) -> list[list[int]]:
    return [s.tolist() for s in data.sequences]


def raw_seqs(data: Interactions) -> list[list[str]]:
    return [data.vocab.decode(s) for s in data.sequences]


# --- S3-Rec -------------------------------------------------------------------------------------

def test_s3rec_remaps_in_first_appearance_order(tmp_path):
    path = write(tmp_path, "d.txt", "10 5 7 5\n3 7 9\n11 42\n")
    data = read_s3rec(path)
    assert data.user_ids == ["10", "3", "11"]
    assert data.item_ids == ["5", "7", "9", "42"]
    assert seqs(data) == [[1, 2, 1], [2, 3], [4]]
    assert all(s.dtype == np.int64 for s in data.sequences)
    assert data.timestamps is None
    assert (data.num_users, data.num_items, data.num_events) == (3, 4, 6)
    assert raw_seqs(data) == [["5", "7", "5"], ["7", "9"], ["42"]]


@pytest.mark.parametrize("text, line, words", [
    ("1 2 3\n2 4 x5\n", 2, ["'x5'", "integer"]),
    ("1 2 3\n2 4 5\n\n3 6\n", 3, ["blank"]),
    ("1 2 3\n2\n", 2, ["no items"]),
    ("1 2 3\n2 4\n1 6\n", 3, ["'1'", "already", ":1)"]),
    ("u1 2 3\n", 1, ["'u1'"]),
    ("1 2 -3\n", 1, ["'-3'"]),
])
def test_s3rec_bad_lines_name_file_and_line(tmp_path, text, line, words):
    path = write(tmp_path, "bad.txt", text)
    with pytest.raises(DataError) as exc:
        read_s3rec(path)
    msg = str(exc.value)
    assert msg.startswith(f"{path}:{line}: ")
    for w in words:
        assert w in msg


def test_s3rec_skip_bad_warns_once_with_count(tmp_path):
    path = write(tmp_path, "bad.txt", "1 2 3\n\n2 x\n3 4 5\n3 9\n4\n5 6\n")
    with pytest.warns(DataWarning) as record:
        data = read_s3rec(path, skip_bad=True)
    assert len(record) == 1
    msg = str(record[0].message)
    assert "skipped 4 bad line(s)" in msg
    assert f"first: {path}:2: blank line" in msg
    assert data.user_ids == ["1", "3", "5"]
    assert raw_seqs(data) == [["2", "3"], ["4", "5"], ["6"]]


def test_no_warning_without_bad_lines(tmp_path):
    path = write(tmp_path, "d.txt", "1 2 3\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_s3rec(path, skip_bad=True)


# --- SASRec pairs -------------------------------------------------------------------------------

def test_sasrec_pairs_interleaved_users(tmp_path):
    path = write(tmp_path, "d.txt", "1 100\n2 200\n1 300\n2 100\n1 200\n")
    data = read_sasrec_pairs(path)
    assert data.user_ids == ["1", "2"]
    assert data.item_ids == ["100", "200", "300"]
    assert seqs(data) == [[1, 3, 2], [2, 1]]
    assert data.timestamps is None


@pytest.mark.parametrize("text, line, words", [
    ("1 2\n1 2 3\n", 2, ["2 columns", "got 3"]),
    ("1 2\n2 3\n1\n", 3, ["got 1"]),
    ("1 2\n\n", 2, ["got 0"]),
    ("1 2\n1 b\n", 2, ["'b'", "integer"]),
])
def test_sasrec_pairs_bad_lines(tmp_path, text, line, words):
    path = write(tmp_path, "bad.txt", text)
    with pytest.raises(DataError) as exc:
        read_sasrec_pairs(path)
    assert str(exc.value).startswith(f"{path}:{line}: ")
    for w in words:
        assert w in str(exc.value)


def test_sasrec_pairs_skip_bad(tmp_path):
    path = write(tmp_path, "bad.txt", "1 2\n1 2 3\n1 4\nx 5\n")
    with pytest.warns(DataWarning, match=r"skipped 2 bad line\(s\); first: .*bad.txt:2: "):
        data = read_sasrec_pairs(path, skip_bad=True)
    assert raw_seqs(data) == [["2", "4"]]


# --- RecBole ------------------------------------------------------------------------------------

HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"


def test_recbole_stable_sort_by_timestamp(tmp_path):
    rows = [
        ("u1", "a", 5, 30),
        ("u2", "b", 3, 10),
        ("u1", "b", 4, 10),
        ("u1", "c", 1, 20),
        ("u1", "d", 2, 10),  # ties with u1's "b" at 10: file order keeps b before d
        ("u2", "a", 3, 5),
    ]
    text = HEADER + "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in rows)
    data = read_recbole_inter(write(tmp_path, "d.inter", text))
    assert data.user_ids == ["u1", "u2"]
    assert data.item_ids == ["a", "b", "c", "d"]
    assert raw_seqs(data) == [["b", "d", "c", "a"], ["a", "b"]]
    assert [t.tolist() for t in data.timestamps] == [[10, 10, 20, 30], [5, 10]]
    assert all(t.dtype == np.float64 for t in data.timestamps)


def test_recbole_stable_sort_many_ties(tmp_path):
    # Long enough that numpy's default (unstable) sort would reorder ties.
    times = [(7 * k) % 3 for k in range(60)]
    text = HEADER + "".join(f"u\t{k}\t1\t{t}\n" for k, t in enumerate(times))
    data = read_recbole_inter(write(tmp_path, "d.inter", text))
    expected = sorted(range(60), key=lambda k: times[k])  # Python's sort is stable
    assert raw_seqs(data) == [[str(k) for k in expected]]


def test_recbole_field_order_and_no_timestamp(tmp_path):
    text = "rating:float\titem_id:token\tuser_id:token\n1\tx\tA\n2\ty\tB\n3\tz\tA\n"
    data = read_recbole_inter(write(tmp_path, "d.inter", text))
    assert data.timestamps is None
    assert data.user_ids == ["A", "B"]
    assert raw_seqs(data) == [["x", "z"], ["y"]]


@pytest.mark.parametrize("header, words", [
    ("user_id:token\trating:float\ttimestamp:float\n", ["no item_id field", "rating"]),
    ("item_id:token\ttimestamp:float\n", ["no user_id field"]),
    ("user_id:token\titem_id\ttimestamp:float\n", ["'item_id'", "name:type"]),
    ("user_id:token item_id:token\n", ["name:type"]),
    ("user_id:token\titem_id:token\titem_id:token\n", ["repeats"]),
    ("user_id:token\titem_id:token_seq\ttimestamp:float\n", ["item_id is of type 'token_seq'"]),
    ("user_id:float\titem_id:token\ttimestamp:float\n", ["user_id is of type 'float'"]),
])
def test_recbole_bad_header_names_line_1(tmp_path, header, words):
    path = write(tmp_path, "d.inter", header + "1\t2\t3\n")
    with pytest.raises(DataError) as exc:
        read_recbole_inter(path, skip_bad=True)  # a bad header is never skipped
    assert str(exc.value).startswith(f"{path}:1: ")
    for w in words:
        assert w in str(exc.value)


@pytest.mark.parametrize("body, line, words", [
    ("1\t2\t3\t4\n1\t2\t3\n", 3, ["expected 4", "got 3"]),
    ("1\t2\t3\t4\n1\t2\t3\t4\t5\n", 3, ["got 5"]),
    ("1\t2\t3\t4\n1\t2\t3\tyesterday\n", 3, ["'yesterday'", "timestamp"]),
    ("1\t2\t3\tnan\n", 2, ["'nan'"]),
    ("1\t\t3\t4\n", 2, ["empty"]),
])
def test_recbole_bad_rows(tmp_path, body, line, words):
    path = write(tmp_path, "d.inter", HEADER + body)
    with pytest.raises(DataError) as exc:
        read_recbole_inter(path)
    assert str(exc.value).startswith(f"{path}:{line}: ")
    for w in words:
        assert w in str(exc.value)


def test_recbole_skip_bad(tmp_path):
    body = "1\t2\t3\t4\n1\t3\t3\n1\t4\t3\tlater\n1\t5\t3\t1\n"
    path = write(tmp_path, "d.inter", HEADER + body)
    with pytest.warns(DataWarning, match=r"skipped 2 bad line\(s\); first: .*d.inter:3: "):
        data = read_recbole_inter(path, skip_bad=True)
    assert raw_seqs(data) == [["5", "2"]]


# --- in-memory events ---------------------------------------------------------------------------

def test_from_events_numbers_and_orders_like_the_csv_reader(tmp_path):
    text = "timestamp,item_id,user_id\n3,i1,u1\n1,i2,u1\n2,i1,u2\n1,i3,u1\n"
    from_file = read_csv(write(tmp_path, "d.csv", text))
    data = Interactions.from_events(np.array(["u1", "u1", "u2", "u1"]), ["i1", "i2", "i1", "i3"],
                                    times=np.array([3, 1, 2, 1]))
    assert (data.user_ids, data.item_ids) == (from_file.user_ids, from_file.item_ids)
    assert raw_seqs(data) == raw_seqs(from_file) == [["i2", "i3", "i1"], ["i1"]]
    assert [t.tolist() for t in data.timestamps] == [[1, 1, 3], [2]]
    untimed = Interactions.from_events([7, "7", 8], [1, 2, 1.0])  # ids are str(id)
    assert untimed.timestamps is None and untimed.user_ids == ["7", "8"]
    assert raw_seqs(untimed) == [["1", "2"], ["1.0"]]


@pytest.mark.parametrize("users,items,times,match", [
    (["u1", "u2"], ["i1"], None, "users has 2 events but items has 1"),
    (["u1", "u2"], ["i1", "i2"], [1.0, float("nan")], r"times\[1\] is nan, not a finite number"),
    (["u1", "u2"], ["i1", "i2"], [1.0], r"times has shape \(1,\), expected \(2,\)"),
    (["u1", ""], ["i1", "i2"], None, r"users\[1\] is an empty id"),
    ([], [], None, "events: empty: no data rows"),
    # Each of these used to be taken silently: a string as one event per character, a missing
    # value (what a DataFrame holds for one) as the id "None" or "nan".
    ("abc", "xyz", None, "users must be a column of values .*not a string"),
    (["u1", "u2"], ["i1", "i2"], "12", "times must be a column of values"),
    (["u1", None], ["i1", "i2"], None, r"users\[1\] is missing \(None\)"),
    (["u1", "u2"], [float("nan"), "i2"], None, r"items\[0\] is missing \(nan\)"),
    (["u1", "u2"], np.array([1.0, np.nan]), None, r"items\[1\] is missing"),
    (["u1", "u2"], ["i1", "i2"], [1.0, "noon"], r"times\[1\] is 'noon', not a finite number"),
    (["u1", "u2"], ["i1", "i2"], [None, 2.0], r"times\[0\] is None, not a finite number"),
    # Numbers too large for a float or a string escaped as a bare OverflowError / ValueError.
    (["u1", "u2"], ["i1", "i2"], [1.0, 10**400], r"times\[1\] is 1000.*, not a finite number"),
    (["u1", 10**5000], ["i1", "i2"], None, r"users\[1\] .*4300 digits"),
    ([b"u1", b"\xe9"], ["i1", "i2"], None, r"users\[1\] is bytes that are not UTF-8"),
])
def test_from_events_rejects_bad_columns(users, items, times, match):
    with pytest.raises(DataError, match=match):
        Interactions.from_events(users, items, times)


def test_from_events_decodes_bytes_ids():
    # numpy 'S' arrays and h5py give ids as bytes, whose str() made the item b"A" the id "b'A'".
    data = Interactions.from_events(np.array([b"u1", b"u1", b"u2"]), [b"A", "A", bytearray(b"7")])
    assert (data.user_ids, data.item_ids) == (["u1", "u2"], ["A", "7"])
    assert seqs(data) == [[1, 1], [2]]


@pytest.mark.parametrize("users, items, match", [
    (np.array([[1], [2]]), np.array([[5], [6]]),
     r"users must be one-dimensional, got shape \(2, 1\)"),
    ({"u1": 1}, ["i1"], "users must be a column of values .*not a dict"),
])
def test_from_events_rejects_non_columns(users, items, match):
    with pytest.raises(DataError, match=match):
        Interactions.from_events(users, items)


# --- CSV ----------------------------------------------------------------------------------------

def test_csv_comma_with_time(tmp_path):
    text = "timestamp,item_id,user_id,extra\n3,i1,u1,x\n1,i2,u1,x\n2,i1,u2,x\n1,i3,u1,x\n"
    data = read_csv(write(tmp_path, "d.csv", text))
    assert data.user_ids == ["u1", "u2"]
    assert data.item_ids == ["i1", "i2", "i3"]
    assert raw_seqs(data) == [["i2", "i3", "i1"], ["i1"]]
    assert [t.tolist() for t in data.timestamps] == [[1, 1, 3], [2]]


def test_csv_tsv_extension_custom_columns_no_time(tmp_path):
    text = "who\twhat\n7\ta,b\n8\tc\n7\td\n"
    data = read_csv(write(tmp_path, "d.tsv", text), user_col="who", item_col="what",
                    time_col=None)
    assert data.timestamps is None
    assert raw_seqs(data) == [["a,b", "d"], ["c"]]


def test_csv_explicit_sep(tmp_path):
    data = read_csv(write(tmp_path, "d.txt", "user_id;item_id\n1;2\n"), time_col=None, sep=";")
    assert raw_seqs(data) == [["2"]]


def test_csv_missing_column_names_header_and_columns(tmp_path):
    path = write(tmp_path, "d.csv", "user,item_id,timestamp\n1,2,3\n")
    with pytest.raises(DataError) as exc:
        read_csv(path)
    msg = str(exc.value)
    assert msg.startswith(f"{path}:1: ")
    assert "['user_id']" in msg and "['user', 'item_id', 'timestamp']" in msg


def test_csv_missing_time_column_hints_time_col_none(tmp_path):
    path = write(tmp_path, "d.csv", "user_id,item_id\n1,2\n")
    with pytest.raises(DataError, match="time_col=None"):
        read_csv(path)


@pytest.mark.parametrize("body, line, words", [
    ("1,2,3\n1,2\n", 3, ["expected 3 fields, got 2"]),
    ("1,2,3\n1,2,3\n\n", 4, ["blank"]),
    # An id spanning lines: most likely an open quote that swallowed the lines after it.
    ('1,"long\nitem",3\n1,2,4\n', 2, ["an id or time spans lines 2-3", "unclosed quote"]),
    ('1,2,3\n1,"a\n1,b,4\n1,c,5\n', 3, ["got 2 in a row spanning lines 3-5", "unclosed quote"]),
])
def test_csv_bad_rows(tmp_path, body, line, words):
    path = write(tmp_path, "d.csv", "user_id,item_id,timestamp\n" + body)
    with pytest.raises(DataError) as exc:
        read_csv(path)
    assert str(exc.value).startswith(f"{path}:{line}: ")
    for w in words:
        assert w in str(exc.value)


def test_csv_free_text_may_span_lines_and_later_rows_keep_their_line_numbers(tmp_path):
    path = write(tmp_path, "d.csv", 'user_id,item_id,timestamp,review\n1,2,3,"good\nvalue"\n'
                                    '1,2,soon,x\n')
    with pytest.raises(DataError, match=rf"{path}:4: timestamp 'soon'"):
        read_csv(path)


def test_csv_columns_must_be_unambiguous(tmp_path):
    path = write(tmp_path, "d.csv", "user_id,item_id,timestamp,item_id\n1,A,3,B\n")
    with pytest.raises(DataError, match=rf"{path}:1: header has column\(s\) \['item_id'\] more "
                                        r"than once"):
        read_csv(path)
    with pytest.raises(DataError, match="one column named for two roles"):
        read_csv(path, user_col="user_id", item_col="user_id", time_col=None)


def test_csv_parser_errors_name_the_line(tmp_path):
    # An open quote in a large file runs into the csv module's field-size limit.
    rows = "".join(f"1,i{n},{n}\n" for n in range(20000))
    path = write(tmp_path, "d.csv", 'user_id,item_id,timestamp\n1,"x,1\n' + rows)
    with pytest.raises(DataError, match=rf"{path}:2: field larger than field limit .*unclosed "
                                        r"quote"):
        read_csv(path, skip_bad=True)


@pytest.mark.parametrize("content, match", [
    (b"1 2 3\n2 \xe9\n", r":2: not UTF-8 text \(byte 0xe9\)"),
    (b"\x1f\x8b\x08\x00rest", "gzip-compressed, not text: decompress it first"),
])
@pytest.mark.parametrize("fmt", ["s3rec", "sasrec", "recbole", "csv"])
def test_files_that_are_not_utf8_are_data_errors(tmp_path, fmt, content, match):
    path = tmp_path / "d.txt"
    path.write_bytes(content)
    with pytest.raises(DataError, match=rf"{path}{match}" if match.startswith(":") else match):
        load(path, fmt)


def test_csv_skip_bad(tmp_path):
    path = write(tmp_path, "d.csv", "user_id,item_id,timestamp\n1,2,3\n1,2\n1,4,x\n1,5,1\n")
    with pytest.warns(DataWarning, match=r"skipped 2 bad line\(s\); first: .*d.csv:3: "):
        data = read_csv(path, skip_bad=True)
    assert raw_seqs(data) == [["5", "2"]]


# --- all formats --------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt, text", [
    ("s3rec", ""),
    ("sasrec", ""),
    ("recbole", ""),
    ("recbole", HEADER),
    ("csv", ""),
    ("csv", "user_id,item_id,timestamp\n"),
])
def test_empty_file(tmp_path, fmt, text):
    path = write(tmp_path, "empty.dat", text)
    with pytest.raises(DataError, match=f"^{path}: empty"):
        load(path, fmt)


def test_all_lines_bad_is_empty_even_with_skip_bad(tmp_path):
    path = write(tmp_path, "d.txt", "x 1\n")
    with pytest.warns(DataWarning), pytest.raises(DataError, match="empty.*1 bad line"):
        read_s3rec(path, skip_bad=True)


@pytest.mark.parametrize("fmt", ["s3rec", "sasrec", "recbole", "csv"])
def test_missing_file(tmp_path, fmt):
    path = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load(path, fmt)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
@pytest.mark.parametrize("content, result", [
    (b"1 2 3\n2 3\n", [["2", "3"], ["3"]]),
    (b"\x1f\x8b\x08\x00rest", "not UTF-8 text"),  # the pipe cannot be read again for the line
])
def test_named_pipe_is_read(tmp_path, content, result):
    # Process substitution (--data <(zcat Beauty.txt.gz)) passes a pipe, which was refused as
    # "no such data file".
    path = tmp_path / "pipe"
    os.mkfifo(path)
    writer = threading.Thread(target=path.write_bytes, args=(content,))
    writer.start()
    try:
        if isinstance(result, str):
            with pytest.raises(DataError, match=rf"^{path}: {result}"):
                read_s3rec(path)
        else:
            assert raw_seqs(read_s3rec(path)) == result
    finally:
        if writer.is_alive():  # the reader failed before opening: let the writer finish
            path.read_bytes()
        writer.join()


def test_load_dispatch_and_unknown_format(tmp_path):
    path = write(tmp_path, "d.txt", "1 2\n1 3\n")
    assert seqs(load(path, "sasrec")) == [[1, 2]]
    with pytest.warns(DataWarning, match="already has a line"):
        assert seqs(load(path, "s3rec", skip_bad=True)) == [[1]]
    path = write(tmp_path, "d.csv", "user_id,item_id\n1,2\n")
    assert seqs(load(path, "csv", time_col=None)) == [[1]]
    with pytest.raises(ValueError, match="'parquet'.*csv"):
        load(path, "parquet")


def test_crlf_and_byte_order_mark(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b"\xef\xbb\xbfuser_id,item_id\r\n1,2\r\n1,3\r\n")
    assert raw_seqs(read_csv(path, time_col=None)) == [["2", "3"]]
    path = tmp_path / "d.inter"
    path.write_bytes(b"user_id:token\titem_id:token\r\n1\t2\r\n")
    assert raw_seqs(read_recbole_inter(path)) == [["2"]]


# --- id maps ------------------------------------------------------------------------------------

def test_vocab_round_trip(tmp_path):
    data = read_s3rec(write(tmp_path, "d.txt", "1 30 10 20\n2 20 40\n"))
    vocab = data.vocab
    assert vocab.encode(["10", "40", "30"]).tolist() == [2, 4, 1]
    assert vocab.encode(["10", "40", "30"]).dtype == np.int64
    assert vocab.decode(np.array([2, 4, 1])) == ["10", "40", "30"]
    for s in data.sequences:
        assert np.array_equal(vocab.encode(vocab.decode(s)), s)

    maps = data.id_maps()
    assert maps == {"items": ["30", "10", "20", "40"], "users": ["1", "2"]}
    restored = ItemVocab.from_dict(maps)
    assert restored == vocab and restored.to_dict() == {"items": maps["items"]}
    maps["items"].append("99")  # id_maps returns copies
    assert data.num_items == 4


def test_vocab_unknown_and_out_of_range():
    vocab = ItemVocab(["a", "b"])
    with pytest.raises(KeyError, match="'zz'"):
        vocab.encode(["a", "zz"])
    assert vocab.encode(["a", "zz", "b"], unknown="skip").tolist() == [1, 2]
    assert vocab.encode([], unknown="skip").dtype == np.int64
    with pytest.raises(ValueError, match="unknown"):
        vocab.encode(["a"], unknown="ignore")
    for bad in (0, 3):
        with pytest.raises(KeyError, match=f"{bad} is outside 1..2"):
            vocab.decode([1, bad])
    with pytest.raises(DataError, match="'a' occurs twice"):
        ItemVocab(["a", "b", "a"])
    with pytest.raises(KeyError, match="items"):
        ItemVocab.from_dict({"users": []})


def test_vocab_add_is_first_appearance():
    vocab = ItemVocab()
    assert [vocab.add(x) for x in ["q", "r", "q", "s"]] == [1, 2, 1, 3]
    assert vocab.ids == ["q", "r", "s"] and len(vocab) == 3


def test_interactions_validates():
    with pytest.raises(DataError, match="1 sequences but 2 user ids"):
        Interactions([np.array([1])], None, ["a"], ["u", "v"])
    with pytest.raises(DataError, match=r"user 0 \('u'\).*1\.\.1, got range 1\.\.2"):
        Interactions([np.array([1, 2])], None, ["a"], ["u"])
    with pytest.raises(DataError, match="integer"):
        Interactions([np.array([1.0])], None, ["a"], ["u"])
    with pytest.raises(DataError, match="1 timestamps for 2 events"):
        Interactions([np.array([1, 1])], [np.array([0.0])], ["a"], ["u"])
    data = Interactions([[1, 1], []], [[0, 1], []], ["a"], ["u", "v"])
    assert data.sequences[1].dtype == np.int64 and data.timestamps[0].dtype == np.float64


# --- synthetic ----------------------------------------------------------------------------------

def test_synthetic_is_deterministic():
    a, b = make_synthetic(seed=3), make_synthetic(seed=3)
    c = make_synthetic(seed=4)
    assert seqs(a) == seqs(b)
    assert [t.tolist() for t in a.timestamps] == [t.tolist() for t in b.timestamps]
    assert seqs(a) != seqs(c)


def test_synthetic_shapes_ids_and_times():
    data = make_synthetic(num_users=300, num_items=120, min_len=5, max_len=12, seed=1)
    assert data.num_users == 300 and data.num_items == 120
    assert data.item_ids == [str(i) for i in range(1, 121)]
    assert data.user_ids == [str(u) for u in range(1, 301)]
    lengths = np.array([len(s) for s in data.sequences])
    assert lengths.min() == 5 and lengths.max() == 12
    for s, t in zip(data.sequences, data.timestamps):
        assert s.min() >= 1 and s.max() <= 120
        assert np.array_equal(np.diff(t), np.ones(len(t) - 1))  # one event per time step
        assert 0 <= t[0] < 2 * 12 and t[0] == int(t[0])


def test_chain_process_structure():
    proc = ChainProcess.draw(100, seed=0, num_chains=7)
    assert len(proc.chains) == 7 and sorted(np.concatenate(proc.chains)) == list(range(1, 101))
    assert {len(c) for c in proc.chains} <= {14, 15}
    for chain in proc.chains:
        assert proc.successor[chain].tolist() == np.roll(chain, -1).tolist()
    # succ2 is a single cycle through all items.
    i, visited = 1, set()
    while i not in visited:
        visited.add(i)
        i = int(proc.lag2_successor[i])
    assert len(visited) == 100 and i == 1
    assert proc.popularity[0] == 0 and np.isclose(proc.popularity.sum(), 1)
    ranks = np.sort(proc.popularity[1:])[::-1]
    assert np.allclose(ranks / ranks[0], 1 / np.arange(1, 101))  # Zipf with a = 1


def test_synthetic_follows_documented_transition_rates():
    data = make_synthetic(seed=0)  # defaults: p_next 0.7, p_lag2 0.15, jumps 0.15
    proc = ChainProcess.draw(data.num_items, seed=0)
    prev2 = np.concatenate([s[:-2] for s in data.sequences])
    prev = np.concatenate([s[1:-1] for s in data.sequences])
    nxt = np.concatenate([s[2:] for s in data.sequences])
    chain_step = np.mean(nxt == proc.successor[prev])
    lag2_step = np.mean(nxt == proc.lag2_successor[prev2])
    assert len(nxt) > 40_000
    assert abs(chain_step - 0.70) < 0.01
    assert abs(lag2_step - 0.15) < 0.01
    # What is neither is a jump, drawn from the popularity: the top item leads those.
    jumps = nxt[(nxt != proc.successor[prev]) & (nxt != proc.lag2_successor[prev2])]
    assert abs(len(jumps) / len(nxt) - 0.15) < 0.01
    assert np.bincount(jumps).argmax() == proc.popularity.argmax()
    # Step 2 has no lag-2 item and follows the chain with p_next + p_lag2.
    first, second = (np.array([s[k] for s in data.sequences]) for k in (0, 1))
    assert abs(np.mean(second == proc.successor[first]) - 0.85) < 0.03
    # First items are chain positions drawn uniformly: no popularity bias.
    assert np.bincount(first, minlength=501).max() < 20


def test_synthetic_needs_order_to_predict():
    """The last item predicts the next far better than an item from elsewhere in the history."""
    data = make_synthetic(seed=0)
    proc = ChainProcess.draw(data.num_items, seed=0)
    rng = np.random.default_rng(0)
    last_hits = any_hits = 0
    for s in data.sequences:
        for t in range(2, len(s)):
            last_hits += proc.successor[s[t - 1]] == s[t]
            any_hits += proc.successor[s[rng.integers(t)]] == s[t]
    assert last_hits > 3 * any_hits


def test_synthetic_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_chains"):
        make_synthetic(num_items=10, num_chains=6)
    with pytest.raises(ValueError, match="p_next"):
        make_synthetic(p_next=0.9, p_lag2=0.2)
    with pytest.raises(ValueError, match="min_len"):
        make_synthetic(min_len=5, max_len=4)
    with pytest.raises(ValueError, match="num_users"):
        make_synthetic(num_users=0)
    # NaN fails every comparison: p_next=nan used to give sequences of jumps only.
    for kw, name in ((dict(p_next=math.nan), "p_next"), (dict(p_lag2=math.nan), "p_lag2"),
                     (dict(zipf_a=math.nan), "zipf_a")):
        with pytest.raises(ValueError, match=name):
            make_synthetic(num_users=10, num_items=20, **kw)


# --- real data (optional) -----------------------------------------------------------------------

def real(name: str, fmt: str, users: int, items: int, events: int):
    path = SHARED_DATA / name
    return pytest.param(path, fmt, users, items, events, id=name, marks=pytest.mark.skipif(
        not path.is_file(), reason=f"{path} is not available"))


@pytest.mark.slow
@pytest.mark.parametrize("path, fmt, users, items, events", [
    real("Beauty.txt", "s3rec", 22_363, 12_101, 198_502),
    real("ml-100k/ml-100k.inter", "recbole", 943, 1_682, 100_000),
])
def test_real_data_counts(path, fmt, users, items, events):
    data = load(path, fmt)
    assert (data.num_users, data.num_items, data.num_events) == (users, items, events)
    assert (data.timestamps is not None) == (fmt == "recbole")
    if data.timestamps is not None:
        assert all(np.all(np.diff(t) >= 0) for t in data.timestamps)
