"""Fuzzed loaders: whatever the bytes, the BEIR loader, the qrels reader and the TREC run reader either load
the data correctly or raise the library's DataError with a short message naming the file; nothing else escapes.

Bounded by the `default` hypothesis profile (tests/conftest.py); `pytest tests/test_fuzz.py
--hypothesis-profile=long --hypothesis-show-statistics` tries many more cases and prints how many.
"""

from __future__ import annotations

import json
import math
import os
import string
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from imrnn.data import load_beir, read_qrels
from imrnn.errors import DataError, IMRNNError
from imrnn.evaluate import read_run

pytestmark = pytest.mark.filterwarnings(r"ignore:.*Dropped\.:UserWarning")  # drop_unknown=True warns by design

MAX_MESSAGE = 1500  # error messages stay short, whatever the input (huge lines are clipped)


@contextmanager
def scratch() -> Iterator[Path]:
    """A fresh folder per hypothesis example (function-scoped fixtures are shared between examples)."""
    with tempfile.TemporaryDirectory(prefix="imrnn-fuzz-") as tmp:
        yield Path(tmp)


def ok_or_data_error(load: Callable[[], object], where: Path) -> object | None:
    """The loaded value, or None after checking the DataError is short and names the file (or folder)."""
    try:
        return load()
    except DataError as err:
        message = str(err)
        assert isinstance(err, IMRNNError) and isinstance(err, ValueError)
        assert 0 < len(message) <= MAX_MESSAGE + len(str(where)), message[:300]
        assert str(where) in message, message[:300]
        return None


def check_dataset_invariants(data) -> None:
    """What every successfully loaded dataset guarantees to the rest of the library."""
    ids = data.corpus.ids.tolist()
    assert len(ids) == len(set(ids)) == len(data.corpus.titles) == len(data.corpus.texts) > 0
    for value in ids + list(data.queries):
        assert isinstance(value, str) and value.split() == [value]
    for text in data.corpus.passages() + list(data.queries.values()):
        text.encode("utf-8")  # no lone surrogates: every text can be tokenised and written back
    known = set(ids)
    for name, qrels in data.qrels.items():
        for qid, docs in qrels.items():
            assert qid in data.queries and set(docs) <= known
            assert all(isinstance(r, int) for r in docs.values())
        split = data.split(name)
        assert len(split.ids) == len(split.texts)
    data.corpus.fingerprint()


def check_qrels(qrels) -> None:
    assert qrels and all(isinstance(q, str) and q.split() == [q] for q in qrels)
    assert all(isinstance(r, int) and abs(r) < 2**31 for docs in qrels.values() for r in docs.values())


def check_run(run) -> None:
    assert run and all(math.isfinite(s) for docs in run.values() for s in docs.values())


# --------------------------------------------------------------------------- strategies

ID_CHARS = string.ascii_letters + string.digits + "-_.:/#"
ids = st.text(alphabet=ID_CHARS, min_size=1, max_size=10)
any_text = st.text(max_size=30)  # any unicode scalar value (no surrogates), incl. \r, \n, U+2028, U+0085
ENDINGS = ["\n", "\r\n", "\r"]
# tokens that make line-level fuzz reach deep into each parser
TOKENS = ["q1", "d1", "0", "1", "-1", "2", "Q0", "run", "0.5", "nan", "inf", "1e999", "query-id", "qid", "x y",
          '{"_id": "d1", "text": "t"}', '{"_id": 1}', '{"_id": true}', '{"_id": NaN}', "[1, 2]", '{"_id": ""}',
          '{"_id": "a b"}', '{"_id": "\\u0000"}', '{"text": "\\ud800"}', "\\ud800", "\ufeff", "\u2028", "\x85",
          "\t", " ", "\x0b", "\x0c", "é", "€", "🙂", "9" * 60, "{", "}", '"', "\\", "[" * 3000, '{"_id": ' + "7" * 4400 + "}"]
token_lines = st.lists(st.lists(st.sampled_from(TOKENS), max_size=7).map(" ".join), max_size=12)


@st.composite
def text_file(draw, lines: list[str] | None = None) -> bytes:
    """Lines joined with random (mixed) line endings, in a random encoding, optionally damaged."""
    lines = draw(token_lines) if lines is None else lines
    endings = [draw(st.sampled_from(ENDINGS)) for _ in lines]
    if endings and draw(st.booleans()):
        endings[-1] = ""  # no line end after the last line
    text = "".join(line + end for line, end in zip(lines, endings))
    codec = draw(st.sampled_from(["utf-8", "utf-8-sig", "latin-1", "cp1252", "utf-16", "utf-16-le", "utf-32"]))
    raw = text.encode(codec, errors="replace")
    return draw(damage(raw))


@st.composite
def damage(draw, raw: bytes) -> bytes:
    """Nothing, a truncation, flipped bytes, an inserted NUL/CR/huge line, or a prefix/suffix of random bytes."""
    kind = draw(st.sampled_from(["none", "none", "truncate", "flip", "insert", "wrap"]))
    if kind == "truncate" and raw:
        return raw[: draw(st.integers(0, len(raw) - 1))]
    if kind == "flip" and raw:
        data = bytearray(raw)
        for _ in range(draw(st.integers(1, 4))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        return bytes(data)
    if kind == "insert":
        at = draw(st.integers(0, len(raw)))
        piece = draw(st.sampled_from([b"\x00", b"\r", b"\n", b"\xff", b"\xed\xa0\x80", b"\xef\xbb\xbf", b"x" * 70_000]))
        return raw[:at] + piece + raw[at:]
    if kind == "wrap":
        return draw(st.binary(max_size=8)) + raw + draw(st.binary(max_size=8))
    return raw


@st.composite
def beir_content(draw):
    """A valid small BEIR dataset as Python values: docs, queries and qrels that only name known ids."""
    doc_ids = draw(st.lists(ids, min_size=1, max_size=6, unique=True))
    docs = {d: (draw(any_text), draw(any_text)) for d in doc_ids}
    query_ids = draw(st.lists(ids, min_size=1, max_size=4, unique=True))
    queries = {q: draw(any_text) for q in query_ids}
    judged = draw(st.lists(st.tuples(st.sampled_from(query_ids), st.sampled_from(doc_ids), st.integers(-1, 3)), min_size=1, max_size=8))
    qrels: dict[str, dict[str, int]] = {}
    for q, d, r in judged:
        qrels.setdefault(q, {})[d] = r
    return docs, queries, qrels


def write_lines(path: Path, lines: list[str], endings: list[str], bom: bool, trailing: bool) -> None:
    text = "".join(line + endings[i % len(endings)] for i, line in enumerate(lines))
    if not trailing and text.endswith("\r\n"):
        text = text[:-2]
    elif not trailing:
        text = text[:-1]
    path.write_bytes(("\ufeff" if bom else "").encode() + text.encode("utf-8"))


def beir_files(docs, queries, qrels, ascii_only: bool) -> tuple[list[str], list[str], list[str]]:
    corpus = [json.dumps({"_id": d, "title": t, "text": x}, ensure_ascii=ascii_only) for d, (t, x) in docs.items()]
    query_lines = [json.dumps({"_id": q, "text": t}, ensure_ascii=ascii_only) for q, t in queries.items()]
    qrel_lines = ["query-id\tcorpus-id\tscore"] + [f"{q}\t{d}\t{r}" for q, ds in qrels.items() for d, r in ds.items()]
    return corpus, query_lines, qrel_lines


# --------------------------------------------------------------------------- random bytes


@given(raw=st.binary(max_size=3000))
def test_read_qrels_random_bytes(raw):
    with scratch() as tmp:
        (tmp / "q.tsv").write_bytes(raw)
        qrels = ok_or_data_error(lambda: read_qrels(tmp / "q.tsv"), tmp / "q.tsv")
        if qrels is not None:
            check_qrels(qrels)


@given(raw=st.binary(max_size=3000))
def test_read_run_random_bytes(raw):
    with scratch() as tmp:
        (tmp / "r.run").write_bytes(raw)
        run = ok_or_data_error(lambda: read_run(tmp / "r.run"), tmp / "r.run")
        if run is not None:
            check_run(run)


@given(corpus=st.binary(max_size=1500), queries=st.binary(max_size=1500), qrels=st.binary(max_size=1500), drop=st.booleans())
def test_load_beir_random_bytes(corpus, queries, qrels, drop):
    with scratch() as tmp:
        (tmp / "qrels").mkdir()
        (tmp / "corpus.jsonl").write_bytes(corpus)
        (tmp / "queries.jsonl").write_bytes(queries)
        (tmp / "qrels" / "test.tsv").write_bytes(qrels)
        data = ok_or_data_error(lambda: load_beir(tmp, drop_unknown=drop), tmp)
        if data is not None:
            check_dataset_invariants(data)


# --------------------------------------------------------------------------- text-like files with damage


@given(raw=text_file())
def test_read_qrels_token_soup(raw):
    with scratch() as tmp:
        (tmp / "q.tsv").write_bytes(raw)
        qrels = ok_or_data_error(lambda: read_qrels(tmp / "q.tsv"), tmp / "q.tsv")
        if qrels is not None:
            check_qrels(qrels)


@given(raw=text_file())
def test_read_run_token_soup(raw):
    with scratch() as tmp:
        (tmp / "r.run").write_bytes(raw)
        run = ok_or_data_error(lambda: read_run(tmp / "r.run"), tmp / "r.run")
        if run is not None:
            check_run(run)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
    | st.sampled_from([10**200, -(10**300), "\ud800", "a\udfffb", "\x00", "a b", "", "\u2028"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["_id", "title", "text", "x"]), inner, max_size=4),
    max_leaves=8,
)


@given(records=st.lists(st.dictionaries(st.sampled_from(["_id", "title", "text", "metadata"]), json_values, max_size=4), min_size=1, max_size=5),
       ascii_only=st.booleans())
def test_load_beir_json_values(records, ascii_only):
    """Records whose fields hold any JSON value: NaN, Infinity, huge integers, nesting, lone surrogates, NUL."""
    with scratch() as tmp:
        (tmp / "qrels").mkdir()
        (tmp / "corpus.jsonl").write_bytes(
            "\n".join(json.dumps(r, ensure_ascii=ascii_only) for r in records).encode("utf-8", "surrogatepass")
        )
        (tmp / "queries.jsonl").write_text('{"_id": "q1", "text": "a query"}\n')
        (tmp / "qrels" / "test.tsv").write_text("q1\td1\t1\n")
        data = ok_or_data_error(lambda: load_beir(tmp, drop_unknown=True), tmp)
        if data is not None:
            check_dataset_invariants(data)


@given(corpus=text_file(), queries=text_file(), qrels=text_file(), drop=st.booleans())
def test_load_beir_token_soup(corpus, queries, qrels, drop):
    with scratch() as tmp:
        (tmp / "qrels").mkdir()
        (tmp / "corpus.jsonl").write_bytes(corpus)
        (tmp / "queries.jsonl").write_bytes(queries)
        (tmp / "qrels" / "test.tsv").write_bytes(qrels)
        data = ok_or_data_error(lambda: load_beir(tmp, drop_unknown=drop), tmp)
        if data is not None:
            check_dataset_invariants(data)


# --------------------------------------------------------------------------- valid data survives harmless changes


@given(content=beir_content(), ascii_only=st.booleans(), endings=st.lists(st.sampled_from(ENDINGS), min_size=1, max_size=3),
       bom=st.booleans(), trailing=st.booleans(), blank=st.booleans())
def test_beir_round_trip_under_line_endings_bom_and_blank_lines(content, ascii_only, endings, bom, trailing, blank):
    docs, queries, qrels = content
    with scratch() as tmp:
        (tmp / "qrels").mkdir()
        corpus, query_lines, qrel_lines = beir_files(docs, queries, qrels, ascii_only)
        if blank:
            corpus, query_lines = [""] + corpus + ["   "], query_lines + [""]
        write_lines(tmp / "corpus.jsonl", corpus, endings, bom, trailing)
        write_lines(tmp / "queries.jsonl", query_lines, endings, bom, trailing)
        write_lines(tmp / "qrels" / "test.tsv", qrel_lines, endings, bom, trailing)
        data = load_beir(tmp)
        check_dataset_invariants(data)
        assert data.corpus.ids.tolist() == list(docs)
        assert data.corpus.titles == [t for t, _ in docs.values()] and data.corpus.texts == [x for _, x in docs.values()]
        assert data.queries == queries and data.qrels == {"test": qrels}


@given(content=beir_content(), codec=st.sampled_from(["latin-1", "cp1252", "utf-16", "utf-16-le", "utf-16-be", "utf-32"]),
       which=st.sampled_from(["corpus.jsonl", "queries.jsonl", "qrels/test.tsv"]))
def test_beir_in_a_wrong_encoding_loads_identically_or_fails_clearly(content, codec, which):
    docs, queries, qrels = content
    with scratch() as tmp:
        (tmp / "qrels").mkdir()
        files = dict(zip(["corpus.jsonl", "queries.jsonl", "qrels/test.tsv"], beir_files(docs, queries, qrels, False)))
        for name, lines in files.items():
            text = "\n".join(lines) + "\n"
            (tmp / name).write_bytes(text.encode(codec, errors="replace") if name == which else text.encode("utf-8"))
        try:
            data = load_beir(tmp)
        except DataError as err:
            message = str(err)
            assert which.split("/")[-1] in message and len(message) < MAX_MESSAGE + len(str(tmp))
            assert "UTF-8" in message or "utf-8" in message or "JSON" in message or "columns" in message, message
            return
        check_dataset_invariants(data)
        text = "\n".join(files[which]) + "\n"
        if text.encode(codec, errors="replace") == text.encode("utf-8"):  # e.g. ASCII-only text in latin-1
            assert (data.queries, data.qrels["test"]) == (queries, qrels)
            assert data.corpus.ids.tolist() == list(docs) and data.corpus.texts == [x for _, x in docs.values()]


@given(content=beir_content(), ascii_only=st.booleans(), which=st.sampled_from(["corpus.jsonl", "queries.jsonl", "qrels/test.tsv"]),
       data=st.data())
def test_damaged_beir_file_loads_or_fails_clearly(content, ascii_only, which, data):
    docs, queries, qrels = content
    with scratch() as tmp:
        (tmp / "qrels").mkdir()
        files = dict(zip(["corpus.jsonl", "queries.jsonl", "qrels/test.tsv"], beir_files(docs, queries, qrels, ascii_only)))
        for name, lines in files.items():
            raw = ("\n".join(lines) + "\n").encode("utf-8")
            (tmp / name).write_bytes(data.draw(damage(raw)) if name == which else raw)
        drop = data.draw(st.booleans())
        loaded = ok_or_data_error(lambda: load_beir(tmp, drop_unknown=drop), tmp)
        if loaded is not None:
            check_dataset_invariants(loaded)


@given(rows=st.lists(st.tuples(ids, ids, st.integers(-(2**31) + 1, 2**31 - 1)), min_size=1, max_size=12),
       trec=st.booleans(), header=st.booleans(), sep=st.sampled_from(["\t", " ", " \t  "]),
       endings=st.lists(st.sampled_from(ENDINGS), min_size=1, max_size=3), bom=st.booleans(), trailing=st.booleans())
def test_qrels_round_trip(rows, trec, header, sep, endings, bom, trailing):
    lines = (["query-id\tcorpus-id\tscore"] if header and not trec else [])
    lines += [sep.join([q, "0", d, str(r)] if trec else [q, d, str(r)]) for q, d, r in rows]
    expected: dict[str, dict[str, int]] = {}
    for q, d, r in rows:
        expected.setdefault(q, {})[d] = r  # a repeated judgement: the last one wins
    assume(rows[0][0].lower() not in ("query-id", "query_id", "qid"))  # would read as a header line
    with scratch() as tmp:
        write_lines(tmp / "q.tsv", lines, endings, bom, trailing)
        assert read_qrels(tmp / "q.tsv") == expected


@given(run=st.dictionaries(ids, st.dictionaries(ids, st.floats(allow_nan=False, allow_infinity=False), min_size=1, max_size=5),
                           min_size=1, max_size=5),
       endings=st.lists(st.sampled_from(ENDINGS), min_size=1, max_size=3), bom=st.booleans(), trailing=st.booleans())
def test_run_round_trip(run, endings, bom, trailing):
    lines = [f"{q} Q0 {d} {i + 1} {s!r} tag" for q, docs in run.items() for i, (d, s) in enumerate(docs.items())]
    with scratch() as tmp:
        write_lines(tmp / "r.run", lines, endings, bom, trailing)
        assert read_run(tmp / "r.run") == run


# --------------------------------------------------------------------------- deterministic edge cases


def beir_folder(root: Path, corpus: bytes, queries: bytes = b'{"_id": "q1", "text": "q"}\n',
                qrels: bytes = b"q1\td1\t1\n") -> Path:
    (root / "qrels").mkdir(parents=True, exist_ok=True)
    (root / "corpus.jsonl").write_bytes(corpus)
    (root / "queries.jsonl").write_bytes(queries)
    (root / "qrels" / "test.tsv").write_bytes(qrels)
    return root


@pytest.mark.parametrize("corpus, fragment", [
    (b"", "no corpus records"),
    (b"\n\r\n   \r\n", "no corpus records"),
    (b"\xef\xbb\xbf", "no corpus records"),
    ('{"_id": "d1", "text": "caf\u00e9"}\n'.encode("latin-1"), "not UTF-8"),
    ('{"_id": "d1", "text": "x"}\n'.encode("utf-16"), "UTF-16"),
    ('{"_id": "d1", "text": "x"}\n'.encode("utf-32"), "UTF-32"),
    ('{"_id": "d1", "text": "x"}\n'.encode("utf-16-le"), "NUL byte"),
    (b'{"_id": "d1", "text": "x"}\n{"_id": "d2", "te', "malformed JSON"),
    (b"[" * 200_000 + b"]" * 200_000 + b"\n", "nested too deeply"),
    (b'{"_id": ' + b"9" * 5000 + b"}\n", "unreadable JSON"),
    (b'{"_id": NaN, "text": "x"}\n', "missing or empty"),
    (b'{"_id": true, "text": "x"}\n', "missing or empty"),
    (b'{"_id": "d 1", "text": "x"}\n', "whitespace or control"),
    (b'{"_id": "d\\u0000", "text": "x"}\n', "whitespace or control"),
    (b'{"_id": "d\\ud800", "text": "x"}\n', "whitespace or control"),
    (b'{"_id": "d1", "text": NaN}\n', '"text" must be a string'),
    (b'{"_id": "d1", "text": "x"}\x00\n', "NUL byte"),
    (b'{"_id": "d1", "text": "' + b"\xff" * 3_000_000 + b'"}\n', "not UTF-8"),
    (b"[" + b"1," * 3_000_000 + b"1]\n", "expected a JSON object"),
    ((b'{"_id": "' + b"x" * 3_000_000 + b'"}\n') * 2, "duplicate _id"),
])
def test_bad_corpus_gives_a_short_located_error(tmp_path, corpus, fragment):
    folder = beir_folder(tmp_path / "ds", corpus)
    start = time.perf_counter()
    with pytest.raises(DataError) as info:
        load_beir(folder)
    message = str(info.value)
    assert fragment in message and "corpus.jsonl" in message and len(message) < MAX_MESSAGE, message[:400]
    assert time.perf_counter() - start < 20  # linear in the input, never stuck


def test_huge_line_loads(tmp_path):
    text = "word " * 1_000_000
    corpus = (json.dumps({"_id": "d1", "title": "t", "text": text}) + "\r\n" + '{"_id": "d2", "text": "y"}').encode()
    data = load_beir(beir_folder(tmp_path / "ds", corpus))
    assert data.corpus.texts == [text, "y"] and data.corpus.ids.tolist() == ["d1", "d2"]


def test_carriage_return_only_and_mixed_line_endings_load(tmp_path):
    corpus = b'{"_id": "d1", "text": "a"}\r{"_id": "d2", "text": "b"}\r\n{"_id": "d3", "text": "c"}\n\r'
    qrels = b"query-id\tcorpus-id\tscore\rq1\td1\t1\r\nq1\td3\t2\r"
    data = load_beir(beir_folder(tmp_path / "ds", corpus, qrels=qrels))
    assert data.corpus.ids.tolist() == ["d1", "d2", "d3"] and data.qrels == {"test": {"q1": {"d1": 1, "d3": 2}}}


def test_unicode_line_separators_inside_json_strings_are_kept(tmp_path):
    text = "one\u2028two\x85three\x0bfour\x0cfive\x1cend"
    corpus = (json.dumps({"_id": "d1", "text": text}, ensure_ascii=False) + "\n").encode()
    assert load_beir(beir_folder(tmp_path / "ds", corpus)).corpus.texts == [text]


def test_lone_surrogate_escapes_in_text_become_replacement_characters(tmp_path):
    corpus = b'{"_id": "d1", "title": "\\udc80", "text": "a\\ud800b \\ud83d\\ude00"}\n'
    data = load_beir(beir_folder(tmp_path / "ds", corpus))
    assert data.corpus.titles == ["\ufffd"] and data.corpus.texts == ["a\ufffdb \U0001F600"]


def test_nul_escape_inside_text_is_kept(tmp_path):
    data = load_beir(beir_folder(tmp_path / "ds", b'{"_id": "d1", "text": "a\\u0000b"}\n'))
    assert data.corpus.texts == ["a\x00b"]


@pytest.mark.parametrize("qrels, fragment", [
    (b"q1\td1\t1000000000000\n", "out of range"),
    (b"q1\td1\t" + b"9" * 100_000 + b"\n", "not an integer"),
    (b"q1\td\x00\t1\n", "NUL byte"),
    ("q1\td1\t1\n".encode("utf-16"), "UTF-16"),
    (b"q1 d1\n", "expected 3 columns"),
])
def test_bad_qrels_refused(tmp_path, qrels, fragment):
    (tmp_path / "q.tsv").write_bytes(qrels)
    with pytest.raises(DataError, match=fragment) as info:
        read_qrels(tmp_path / "q.tsv")
    assert "q.tsv" in str(info.value) and len(str(info.value)) < MAX_MESSAGE


@pytest.mark.parametrize("run, fragment", [
    (b"q1 Q0 d1 1 " + b"9" * 400 + b" t\n", "not finite"),
    (b"q1 Q0 d1 1 0.5 t\nq1 Q0 d1 2 0.4 t\n", "appears twice"),
    (b"q1 Q0 " + b"d" * 1_000_000 + b" 1 x t\n", "not a number"),
    (b"q\x001 Q0 d1 1 0.5 t\n", "NUL byte"),
    (b"q1 Q0 d1 1 0.5\n", "expected 6 columns"),
    (b"\r\n\r\n", "empty"),
])
def test_bad_runs_refused(tmp_path, run, fragment):
    (tmp_path / "r.run").write_bytes(run)
    with pytest.raises(DataError, match=fragment) as info:
        read_run(tmp_path / "r.run")
    assert "r.run" in str(info.value) and len(str(info.value)) < MAX_MESSAGE


def test_directories_and_unreadable_files_are_data_errors(tmp_path):
    (tmp_path / "dir.tsv").mkdir()
    with pytest.raises(DataError, match="Missing qrels file"):
        read_qrels(tmp_path / "dir.tsv")
    with pytest.raises(DataError, match="Missing run file"):
        read_run(tmp_path / "dir.tsv")
    folder = beir_folder(tmp_path / "ds", b'{"_id": "d1", "text": "x"}\n')
    (folder / "qrels" / "dev.tsv").mkdir()
    with pytest.raises(DataError, match="dev.tsv"):
        load_beir(folder)
    if os.geteuid() != 0:  # root reads anything
        locked = tmp_path / "locked.tsv"
        locked.write_text("q1 d1 1\n")
        locked.chmod(0)
        with pytest.raises(DataError, match="Cannot read"):
            read_qrels(locked)
