"""BEIR loading and validation, query splits, dataset resolution and download (against a local server)."""

from __future__ import annotations

import io
import json
import random
import socket
import threading
import warnings
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imrnn import data as data_mod
from imrnn.data import (
    QuerySet,
    carve_validation,
    data_search_path,
    download_beir,
    kfold,
    load_beir,
    load_dataset,
    random_splits,
    read_qrels,
    resolve_dataset,
)
from imrnn.errors import DataError


# --------------------------------------------------------------------------- helpers


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under `folder` with its bytes (None for folders): equal snapshots mean nothing was written."""
    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))
    }


def files_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


def rewrite_line(path: Path, number: int, new: bytes | str) -> None:
    """Replace line `number` (1-based) of `path` with `new` (no newline needed)."""
    lines = path.read_bytes().splitlines()
    lines[number - 1] = new.encode("utf-8") if isinstance(new, str) else new
    path.write_bytes(b"\n".join(lines) + b"\n")


def append_line(path: Path, new: bytes | str) -> int:
    """Append a line; returns its 1-based line number."""
    raw = new.encode("utf-8") if isinstance(new, str) else new
    with open(path, "ab") as out:
        out.write(raw + b"\n")
    return len(path.read_bytes().splitlines())


def load_fails(folder: Path, cache: Path, *fragments: str, drop_unknown: bool = False) -> str:
    """Load `folder` through the public entry point; it must raise a DataError holding every fragment,
    and neither the dataset folder nor the cache may change."""
    before = snapshot(folder)
    with pytest.raises(DataError) as info:
        load_dataset(folder, cache_dir=cache, download=False, drop_unknown=drop_unknown)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert snapshot(folder) == before, "a failed load changed the dataset folder"
    assert snapshot(cache) == {}, "a failed load wrote into the cache"
    return message


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


# --------------------------------------------------------------------------- loading


def test_load_tiny_folder(tiny_beir, cache):
    folder = tiny_beir()
    data = load_dataset(folder, cache_dir=cache, download=False)
    assert data.name == "tiny"
    assert len(data.corpus) == 20
    assert data.corpus.ids.tolist() == list(tiny_beir.docs)
    assert data.corpus.passages()[0] == "Paris Paris is the capital and largest city of France, on the river Seine."
    assert data.queries == tiny_beir.queries
    assert data.splits == ["test", "train"]
    assert data.qrels["train"]["q4"] == {"d16": 2, "d11": 0}
    test = data.split("test")
    assert test.ids == ["q5", "q6", "q7", "q8"]  # q9 has no relevant document
    assert test.texts == [tiny_beir.queries[q] for q in test.ids]
    assert test.qrels["q6"] == {"d6": 2, "d20": 1}
    assert data.split("train").ids == ["q1", "q2", "q3", "q4"]
    assert snapshot(cache) == {}


def test_load_accepts_bom_integer_ids_missing_title_and_trec_qrels(tmp_path):
    folder = tmp_path / "odd"
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_bytes(
        b"\xef\xbb\xbf" + b'{"_id": 1, "text": "one"}\n\n{"_id": "2", "title": null, "text": "two"}\n'
    )
    (folder / "queries.jsonl").write_text('{"_id": "7", "text": "seven"}\n')
    (folder / "qrels" / "test.tsv").write_text("7 0 1 1\n7 0 2 0\n")  # TREC format, no header
    data = load_beir(folder)
    assert data.corpus.ids.tolist() == ["1", "2"]
    assert data.corpus.passages() == ["one", "two"]
    assert data.qrels == {"test": {"7": {"1": 1, "2": 0}}}


def test_corpus_fingerprint_tracks_content(tiny_beir, tmp_path):
    a = load_beir(tiny_beir("a"))
    b = load_beir(tiny_beir("b"))
    assert a.corpus.fingerprint() == b.corpus.fingerprint()
    docs = dict(tiny_beir.docs, d5=("Honey bees", "Honey bees make honey."))
    c = load_beir(tiny_beir("c", docs=docs))
    assert c.corpus.fingerprint() != a.corpus.fingerprint()


# --------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("name", ["corpus.jsonl", "queries.jsonl"])
def test_missing_jsonl_file(tiny_beir, cache, name):
    folder = tiny_beir()
    (folder / name).unlink()
    load_fails(folder, cache, f"Missing {'corpus' if name.startswith('corpus') else 'query'} file", str(folder / name),
               "needs corpus.jsonl, queries.jsonl and qrels/<split>.tsv")


def test_missing_qrels_files(tiny_beir, cache):
    folder = tiny_beir()
    for f in (folder / "qrels").iterdir():
        f.unlink()
    load_fails(folder, cache, "Missing qrels", str(folder / "qrels"), "Add e.g. qrels/test.tsv")
    (folder / "qrels").rmdir()
    load_fails(folder, cache, "Missing qrels", str(folder / "qrels"))


def test_missing_qrels_file_given_directly(tmp_path):
    with pytest.raises(DataError, match="Missing qrels file .*nope.tsv. Pass an existing"):
        read_qrels(tmp_path / "nope.tsv")


def test_folder_that_is_not_a_directory(tmp_path, cache):
    with pytest.raises(DataError, match="is not a directory. Point at a BEIR folder"):
        load_beir(tmp_path / "absent")


def test_malformed_json_line(tiny_beir, cache):
    folder = tiny_beir()
    rewrite_line(folder / "corpus.jsonl", 5, '{"_id": "d5", "text": "unterminated}')
    load_fails(folder, cache, f"{folder / 'corpus.jsonl'}:5:", "malformed JSON", "Each line must be one JSON object")


def test_json_line_that_is_not_an_object(tiny_beir, cache):
    folder = tiny_beir()
    rewrite_line(folder / "queries.jsonl", 2, '["q2", "text"]')
    load_fails(folder, cache, f"{folder / 'queries.jsonl'}:2:", "expected a JSON object, got list")


@pytest.mark.parametrize("record", ['{"text": "no id"}', '{"_id": "", "text": "empty id"}', '{"_id": null}'])
def test_missing_id(tiny_beir, cache, record):
    folder = tiny_beir()
    rewrite_line(folder / "queries.jsonl", 7, record)
    load_fails(folder, cache, f"{folder / 'queries.jsonl'}:7:", 'missing or empty "_id" in query record',
               'Give every record a unique "_id"')


def test_non_string_text(tiny_beir, cache):
    folder = tiny_beir()
    rewrite_line(folder / "corpus.jsonl", 3, '{"_id": "d3", "title": "x", "text": 42}')
    load_fails(folder, cache, f"{folder / 'corpus.jsonl'}:3:", '"text" must be a string, got int')


@pytest.mark.parametrize("file,line", [("corpus.jsonl", 3), ("queries.jsonl", 4)])
def test_duplicate_ids(tiny_beir, cache, file, line):
    folder = tiny_beir()
    first = json.loads((folder / file).read_text().splitlines()[line - 1])
    number = append_line(folder / file, json.dumps({"_id": first["_id"], "text": "again"}))
    load_fails(folder, cache, f"{folder / file}:{number}:", f"duplicate _id {first['_id']!r}",
               f"first seen on line {line}", "remove or rename one")


def test_empty_corpus(tiny_beir, cache):
    folder = tiny_beir()
    (folder / "corpus.jsonl").write_text("\n\n")
    load_fails(folder, cache, f"{folder / 'corpus.jsonl'}: no corpus records found", "one JSON object per line")


@pytest.mark.parametrize("value", ["1.5", "high", "x1"])
def test_non_integer_relevance(tiny_beir, cache, value):
    folder = tiny_beir()
    rewrite_line(folder / "qrels" / "test.tsv", 3, f"q6\td6\t{value}")
    load_fails(folder, cache, f"{folder / 'qrels' / 'test.tsv'}:3:", f"relevance {value!r} is not an integer",
               "Use integer grades")


def test_qrels_wrong_column_count(tiny_beir, cache):
    folder = tiny_beir()
    number = append_line(folder / "qrels" / "train.tsv", "q1\td2")
    load_fails(folder, cache, f"{folder / 'qrels' / 'train.tsv'}:{number}:", "expected 3 columns", "got 2")


def test_qrels_unknown_queries_and_documents_are_counted(tiny_beir, cache):
    folder = tiny_beir()
    qrels = folder / "qrels" / "test.tsv"
    for line in ("qX\td1\t1", "qY\td2\t1", "q5\tdX\t1", "q6\tdY\t1", "q6\tdZ\t0"):
        append_line(qrels, line)
    load_fails(folder, cache, str(qrels), "2 query ids not in queries.jsonl",
               "3 judgements naming documents not in corpus.jsonl", "drop_unknown=True", "--drop-unknown")


def test_qrels_unknown_are_dropped_with_a_warning(tiny_beir, cache):
    folder = tiny_beir()
    qrels = folder / "qrels" / "test.tsv"
    for line in ("qX\td1\t1", "q5\tdX\t1", "q6\tdY\t1"):
        append_line(qrels, line)
    with pytest.warns(UserWarning, match=r"1 query ids not in queries.jsonl and 2 judgements .* Dropped"):
        data = load_dataset(folder, cache_dir=cache, download=False, drop_unknown=True)
    assert data.qrels["test"] == {"q5": {"d7": 1}, "q6": {"d6": 2, "d20": 1}, "q7": {"d20": 1}, "q8": {"d19": 1},
                                  "q9": {"d1": 0}}
    assert data.qrels["train"] == tiny_beir.qrels["train"]  # the clean split is untouched, without a warning
    assert data.split("test").ids == ["q5", "q6", "q7", "q8"]


def test_query_whose_judgements_all_name_unknown_documents_is_dropped(tiny_beir):
    folder = tiny_beir()
    append_line(folder / "qrels" / "test.tsv", "q1\tdGone\t1")
    with pytest.warns(UserWarning):
        data = load_beir(folder, drop_unknown=True)
    assert "q1" not in data.qrels["test"]


def test_split_that_does_not_exist(tiny_beir):
    data = load_beir(tiny_beir())
    with pytest.raises(DataError) as info:
        data.split("dev")
    message = str(info.value)
    assert "no split 'dev'" in message
    assert "available: test, train" in message
    assert "--split" in message


@pytest.mark.parametrize("file,line", [("corpus.jsonl", 4), ("queries.jsonl", 1), ("qrels/train.tsv", 3)])
def test_non_utf8_bytes(tiny_beir, cache, file, line):
    folder = tiny_beir()
    rewrite_line(folder / file, line, b'{"_id": "x", "text": "caf\xe9"}' if file.endswith("jsonl") else b"q1\td\xe9\t1")
    load_fails(folder, cache, f"{folder / file}:{line}:", "not UTF-8", "Re-save the file as UTF-8")


# --------------------------------------------------------------------------- splits


def make_queries(n: int, name: str = "all") -> QuerySet:
    ids = [f"q{i}" for i in range(n)]
    return QuerySet(name, ids, [f"text of {q}" for q in ids], {q: {f"d{i}": 1} for i, q in enumerate(ids)})


def shuffled_copy(queries: QuerySet, seed: int) -> QuerySet:
    ids = list(queries.ids)
    random.Random(seed).shuffle(ids)
    return queries.subset(ids)


def assert_consistent(part: QuerySet, source: QuerySet) -> None:
    """Texts and qrels travel with their query id."""
    text = dict(zip(source.ids, source.texts))
    assert part.texts == [text[q] for q in part.ids]
    assert part.qrels == {q: source.qrels[q] for q in part.ids}


def test_carve_validation():
    queries = make_queries(100, "train")
    train, val = carve_validation(queries, fraction=0.15, seed=3)
    assert (len(train), len(val)) == (85, 15)
    assert (train.name, val.name) == ("train", "validation")
    assert set(train.ids).isdisjoint(val.ids)
    assert set(train.ids) | set(val.ids) == set(queries.ids)
    assert_consistent(train, queries)
    assert_consistent(val, queries)
    again = carve_validation(shuffled_copy(queries, 1), fraction=0.15, seed=3)
    assert (again[0].ids, again[1].ids) == (train.ids, val.ids)
    assert carve_validation(queries, fraction=0.15, seed=4)[1].ids != val.ids


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_carve_validation_rejects_bad_fraction(fraction):
    with pytest.raises(DataError, match="fraction must be in"):
        carve_validation(make_queries(10), fraction=fraction)


def test_carve_validation_rejects_too_few_queries():
    with pytest.raises(DataError, match="too few"):
        carve_validation(make_queries(1))


def test_random_splits_sizes_and_order_independence():
    queries = make_queries(200)
    parts = random_splits(queries, seed=7)
    assert [len(p) for p in parts] == [140, 30, 30]
    assert [p.name for p in parts] == ["train", "validation", "test"]
    assert set().union(*(p.ids for p in parts)) == set(queries.ids)
    for p in parts:
        assert_consistent(p, queries)
    for shuffle_seed in range(3):
        again = random_splits(shuffled_copy(queries, shuffle_seed), seed=7)
        assert [p.ids for p in again] == [p.ids for p in parts]
    other = random_splits(queries, seed=8)
    assert other[2].ids != parts[2].ids


@pytest.mark.parametrize("fractions", [(0.5, 0.5), (0.7, 0.2, 0.2), (0.8, 0.2, 0.0), (1.2, -0.1, -0.1)])
def test_random_splits_rejects_bad_fractions(fractions):
    with pytest.raises(DataError, match="three positive numbers summing to 1"):
        random_splits(make_queries(20), fractions)


def test_kfold_every_query_in_exactly_one_test_fold():
    queries = make_queries(23)
    pairs = kfold(queries, k=5, seed=1)
    assert len(pairs) == 5
    seen: list[str] = []
    for train, test in pairs:
        assert set(train.ids).isdisjoint(test.ids)
        assert set(train.ids) | set(test.ids) == set(queries.ids)
        assert_consistent(train, queries)
        assert_consistent(test, queries)
        seen += test.ids
    assert sorted(seen) == sorted(queries.ids)
    assert sorted(len(t) for _, t in pairs) == [4, 4, 5, 5, 5]
    assert [t.ids for _, t in kfold(shuffled_copy(queries, 5), k=5, seed=1)] == [t.ids for _, t in pairs]


@pytest.mark.parametrize("k", [1, 24])
def test_kfold_rejects_bad_k(k):
    with pytest.raises(DataError, match="k must be between 2 and the number of queries"):
        kfold(make_queries(23), k=k)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(3, 80), seed=st.integers(0, 2**32 - 1), k=st.integers(2, 6), frac=st.floats(0.05, 0.5))
def test_splits_never_leak_a_query(n, seed, k, frac):
    queries = make_queries(n)
    everything = set(queries.ids)
    train, val = carve_validation(queries, fraction=frac, seed=seed)
    assert set(train.ids).isdisjoint(val.ids) and set(train.ids) | set(val.ids) == everything
    parts = random_splits(queries, seed=seed)
    assert sum(len(p) for p in parts) == n
    assert set().union(*(p.ids for p in parts)) == everything
    for i in range(3):
        for j in range(i + 1, 3):
            assert set(parts[i].ids).isdisjoint(parts[j].ids)
    if k <= n:
        tests = [t for _, t in kfold(queries, k=k, seed=seed)]
        assert sorted(q for t in tests for q in t.ids) == sorted(everything)


# --------------------------------------------------------------------------- resolution


def test_data_search_path(monkeypatch, tmp_path, clean_env):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert data_search_path(f"{a}:{b}", tmp_path / "cache") == [a, b, tmp_path / "cache" / "datasets"]
    monkeypatch.setenv("IMRNN_DATA_DIR", f"{a}:{b}:")
    monkeypatch.setenv("IMRNN_CACHE_DIR", str(tmp_path / "envcache"))
    assert data_search_path() == [a, b, tmp_path / "envcache" / "datasets"]
    assert data_search_path(c) == [c, tmp_path / "envcache" / "datasets"]  # an explicit data_dir wins
    monkeypatch.delenv("IMRNN_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data_search_path()[-1] == tmp_path / "xdg" / "imrnn" / "datasets"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert data_search_path()[-1] == clean_env / ".cache" / "imrnn" / "datasets"


def test_resolve_by_name_through_imrnn_data_dir(monkeypatch, tmp_path, tiny_beir, clean_env):
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    found = tiny_beir("mini", root=second)
    monkeypatch.setenv("IMRNN_DATA_DIR", f"{first}:{second}")
    assert resolve_dataset("mini", download=False) == found
    shadow = tiny_beir("mini", root=first)  # an earlier folder on the path wins
    assert resolve_dataset("mini", download=False) == shadow
    data = load_dataset("mini", download=False)
    assert data.name == "mini" and len(data.corpus) == 20
    assert not (clean_env / ".cache").exists()  # resolving by name writes nothing


def test_resolve_prefers_an_existing_path_and_finds_the_cache(tmp_path, tiny_beir, clean_env):
    folder = tiny_beir("direct")
    assert resolve_dataset(folder, data_dir=tmp_path / "elsewhere", download=False) == folder
    cached = tiny_beir("incache", root=tmp_path / "cache" / "datasets")
    assert resolve_dataset("incache", data_dir=tmp_path / "elsewhere", cache_dir=tmp_path / "cache",
                           download=False) == cached


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_missing_dataset_offline_names_the_paths_searched(tmp_path, clean_env):
    dirs, cache = [tmp_path / "x", tmp_path / "y"], tmp_path / "cache"
    with pytest.raises(DataError) as info:
        load_dataset("nosuchset", data_dir=":".join(map(str, dirs)), cache_dir=cache, download=False)
    message = str(info.value)
    assert "'nosuchset' not found in:" in message
    for folder in (*dirs, cache / "datasets"):
        assert str(folder) in message
    assert "--data-dir" in message and "IMRNN_DATA_DIR" in message
    assert not cache.exists()


def test_missing_dataset_download_fails_with_one_error(monkeypatch, tmp_path, clean_env):
    port = _closed_port()
    monkeypatch.setattr(data_mod, "BEIR_URL", f"http://127.0.0.1:{port}/{{name}}.zip")
    cache = tmp_path / "cache"
    with pytest.raises(DataError) as info:
        load_dataset("nosuchset", data_dir=tmp_path / "x", cache_dir=cache, download=True)
    message = str(info.value)
    assert "'nosuchset' not found in:" in message
    assert str(tmp_path / "x") in message and str(cache / "datasets") in message
    assert "downloading it failed too" in message
    assert f"http://127.0.0.1:{port}/nosuchset.zip" in message
    assert files_under(cache) == []
    assert not (cache / "datasets" / "nosuchset").exists()


def test_download_to_a_closed_port_directly(tmp_path):
    url = f"http://127.0.0.1:{_closed_port()}/x.zip"
    with pytest.raises(DataError, match=f"Could not download {url}"):
        download_beir("x", tmp_path / "cache", url=url, timeout=5)
    assert files_under(tmp_path / "cache") == []


def test_scifact_loads_with_official_counts(shared_datasets, tmp_path, clean_env):
    data = load_dataset("scifact", data_dir=shared_datasets, cache_dir=tmp_path / "cache", download=False)
    assert data.path == shared_datasets / "scifact"
    assert len(data.corpus) == 5183
    assert len(set(data.corpus.ids.tolist())) == 5183
    assert data.splits == ["test", "train"]
    test, train = data.split("test"), data.split("train")
    assert (len(test), len(train)) == (300, 809)
    assert sum(len(d) for d in test.qrels.values()) == 339
    assert sum(len(d) for d in train.qrels.values()) == 919
    assert set(test.ids).isdisjoint(train.ids)
    assert not (tmp_path / "cache").exists()


# --------------------------------------------------------------------------- download


class _Server:
    def __init__(self) -> None:
        self.routes: dict[str, bytes] = {}
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's naming
                server.requests.append(self.path)
                body = server.routes.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/zip")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture
def server(clean_env):
    srv = _Server()
    yield srv
    srv.close()


def zip_folder(folder: Path, prefix: str | None) -> bytes:
    """A zip of `folder`'s files, under `prefix/` (BEIR's layout) or at the top level when prefix is None."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for file in sorted(folder.rglob("*")):
            if file.is_file():
                rel = file.relative_to(folder).as_posix()
                zf.write(file, f"{prefix}/{rel}" if prefix else rel)
    return buffer.getvalue()


@pytest.mark.parametrize("prefix", ["tiny", None])
def test_download_beir_lands_atomically(server, tiny_beir, tmp_path, prefix):
    server.routes["/tiny.zip"] = zip_folder(tiny_beir("src"), prefix)
    cache = tmp_path / "cache"
    path = download_beir("tiny", cache, url=server.url + "/tiny.zip")
    assert path == cache / "datasets" / "tiny"
    assert [p.name for p in (cache / "datasets").iterdir()] == ["tiny"]  # no temporary folder left behind
    assert sorted(p.name for p in path.iterdir()) == ["corpus.jsonl", "qrels", "queries.jsonl"]
    data = load_beir(path)
    assert len(data.corpus) == 20 and len(data.split("test")) == 4
    assert server.requests == ["/tiny.zip"]


def test_resolve_downloads_from_beir_url_once(server, tiny_beir, tmp_path, monkeypatch):
    server.routes["/tiny.zip"] = zip_folder(tiny_beir("src"), "tiny")
    monkeypatch.setattr(data_mod, "BEIR_URL", server.url + "/{name}.zip")
    cache = tmp_path / "cache"
    data = load_dataset("tiny", data_dir=tmp_path / "nowhere", cache_dir=cache, download=True)
    assert data.path == cache / "datasets" / "tiny" and len(data.corpus) == 20
    again = load_dataset("tiny", data_dir=tmp_path / "nowhere", cache_dir=cache, download=True)
    assert again.corpus.fingerprint() == data.corpus.fingerprint()
    assert server.requests == ["/tiny.zip"]  # the second load used the cache


def test_download_keeps_an_entry_another_process_published_first(server, tiny_beir, tmp_path):
    server.routes["/tiny.zip"] = zip_folder(tiny_beir("src"), "tiny")
    cache = tmp_path / "cache"
    existing = tiny_beir("tiny", root=cache / "datasets", docs=dict(list(tiny_beir.docs.items())[:19]))
    before = snapshot(existing)
    assert download_beir("tiny", cache, url=server.url + "/tiny.zip") == existing
    assert snapshot(existing) == before
    assert [p.name for p in (cache / "datasets").iterdir()] == ["tiny"]


@pytest.mark.parametrize(
    "member", ["../evil.txt", "tiny/../../evil.txt", "../datasets-evil/evil.txt", "../extract-evil/evil.txt",
               "/tmp/imrnn-evil.txt"]
)
def test_download_refuses_path_escaping_members(server, tiny_beir, tmp_path, member):
    buffer = io.BytesIO(zip_folder(tiny_beir("src"), "tiny"))
    with zipfile.ZipFile(buffer, "a") as zf:
        zf.writestr(zipfile.ZipInfo(member), b"pwned")
    assert member in zipfile.ZipFile(io.BytesIO(buffer.getvalue())).namelist()
    server.routes["/tiny.zip"] = buffer.getvalue()
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match="escapes the target folder; refusing it"):
        download_beir("tiny", cache, url=server.url + "/tiny.zip")
    assert list((cache / "datasets").iterdir()) == []
    assert not any(p.name == "evil.txt" for p in tmp_path.rglob("*"))
    assert not Path("/tmp/imrnn-evil.txt").exists()


def test_download_refuses_a_non_zip_and_leaves_nothing(server, tmp_path):
    server.routes["/tiny.zip"] = b"<html>This is not the archive you are looking for</html>"
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match="did not return a valid zip archive"):
        download_beir("tiny", cache, url=server.url + "/tiny.zip")
    assert list((cache / "datasets").iterdir()) == []


def test_download_refuses_an_invalid_beir_archive(server, tiny_beir, tmp_path):
    folder = tiny_beir("src")
    rewrite_line(folder / "corpus.jsonl", 2, "{broken")
    server.routes["/tiny.zip"] = zip_folder(folder, "tiny")
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match="corpus.jsonl:2: malformed JSON"):
        download_beir("tiny", cache, url=server.url + "/tiny.zip")
    assert list((cache / "datasets").iterdir()) == []


def test_download_http_error_names_the_url(server, tmp_path):
    with pytest.raises(DataError, match=r"Could not download .*/absent.zip.*404"):
        download_beir("absent", tmp_path / "cache", url=server.url + "/absent.zip")
    assert list((tmp_path / "cache" / "datasets").iterdir()) == []


@pytest.mark.parametrize("name", ["../escape", "a/b", "", ".hidden"])
def test_download_rejects_non_beir_names(tmp_path, name):
    with pytest.raises(DataError, match="is not a plain BEIR name"):
        download_beir(name, tmp_path / "cache", url="http://127.0.0.1:1/x.zip")
    assert not (tmp_path / "cache").exists()


def test_no_warnings_on_clean_load(tiny_beir):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_beir(tiny_beir())
