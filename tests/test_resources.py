"""Resource limits: memory-mapped corpora are scanned chunk by chunk without staying resident, and
`imrnn search --embeddings ...` searches precomputed embeddings (the 2M-document benchmark is
benchmarks/memory.py; this file checks the same mechanisms at a size the test suite can afford)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from imrnn.cli import app
from imrnn.files import release_pages
from imrnn.evaluate import hits_to_run, read_run
from imrnn.index import exact_search

ENV = {"IMRNN_DATA_DIR": None, "IMRNN_CACHE_DIR": None, "XDG_CACHE_HOME": None}


def rss_file_kib() -> int | None:
    """This process's resident file-backed pages (Linux), or None where /proc does not say."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssFile:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def unit_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_npy(path: Path, n: int, dim: int, seed: int = 0, block: int = 20_000) -> Path:
    rng = np.random.default_rng(seed)
    with open(path, "wb") as out:
        np.lib.format.write_array_header_1_0(out, {"descr": "<f4", "fortran_order": False, "shape": (n, dim)})
        for start in range(0, n, block):
            unit_rows(rng, min(block, n - start), dim).tofile(out)
    return path


@pytest.mark.skipif(rss_file_kib() is None, reason="needs Linux /proc/self/status RssFile")
def test_exact_search_does_not_keep_the_corpus_resident(tmp_path):
    docs = np.load(write_npy(tmp_path / "docs.npy", 80_000, 384), mmap_mode="r")  # 117 MiB
    queries = unit_rows(np.random.default_rng(1), 16, 384)
    before = rss_file_kib()
    hits = exact_search(queries, docs, 10, chunk_size=4096)
    grown = rss_file_kib() - before
    assert grown < 24 * 1024, f"{grown} KiB of the corpus stayed resident"
    reference = exact_search(queries, np.array(docs), 10, chunk_size=4096)
    np.testing.assert_array_equal(hits.indices, reference.indices)
    float(np.asarray(docs).sum())  # control: reading it all without releasing does keep it resident
    assert rss_file_kib() - before > 80 * 1024


def test_release_pages_keeps_data_and_ignores_other_arrays(tmp_path):
    rng = np.random.default_rng(2)
    data = unit_rows(rng, 3000, 64)
    shared = np.lib.format.open_memmap(tmp_path / "w.npy", mode="w+", dtype=np.float32, shape=data.shape)
    shared[:] = data
    release_pages(shared, 0, len(shared))  # dirty shared pages live in the page cache: nothing is lost
    np.testing.assert_array_equal(shared, data)
    shared.flush()
    private = np.load(tmp_path / "w.npy", mmap_mode="c")
    private[5] = 0.0
    release_pages(private, 0, len(private))  # copy-on-write: releasing would drop the change, so it is a no-op
    assert (private[5] == 0).all()
    plain = data.copy()
    release_pages(plain, 0, len(plain))
    release_pages(np.load(tmp_path / "w.npy", mmap_mode="r")[100:200], 0, 100)  # a slice of a map
    np.testing.assert_array_equal(plain, data)


@pytest.fixture
def embeddings(tmp_path):
    rng = np.random.default_rng(3)
    docs, queries = unit_rows(rng, 500, 16), unit_rows(rng, 7, 16)
    np.save(tmp_path / "docs.npy", docs)
    np.save(tmp_path / "queries.npy", queries)
    (tmp_path / "ids.txt").write_text("".join(f"doc-{i}\n" for i in range(500)))
    (tmp_path / "qids.json").write_text(json.dumps([f"q{i}" for i in range(7)]))
    return tmp_path, docs, queries


def search_args(folder: Path, **override: str) -> list[str]:
    args = {"--embeddings": folder / "docs.npy", "--ids": folder / "ids.txt", "--query-embeddings": folder / "queries.npy",
            "--query-ids": folder / "qids.json", "-k": "5", "-o": folder / "run.trec", **override}
    return ["search", *[str(x) for kv in args.items() if kv[1] is not None for x in kv]]


def test_cli_search_over_precomputed_embeddings(embeddings):
    folder, docs, queries = embeddings
    result = CliRunner().invoke(app, search_args(folder), env=ENV)
    assert result.exit_code == 0, result.output
    expected = exact_search(queries, docs, 5)
    doc_ids = np.array([f"doc-{i}" for i in range(500)], dtype=object)
    want = hits_to_run([f"q{i}" for i in range(7)], doc_ids, expected.indices, expected.scores)
    got = read_run(folder / "run.trec")
    assert got.keys() == want.keys()
    for q in want:
        assert got[q] == pytest.approx(want[q], abs=1e-6)


@pytest.mark.parametrize("change, fragment", [
    (lambda f: (f / "ids.txt").write_text("a\nb\nc\n"), "holds 3 document ids but the embeddings have 500 rows"),
    (lambda f: (f / "ids.txt").write_text("".join(f"doc-{i % 499}\n" for i in range(500))), "duplicate document id"),
    (lambda f: (f / "ids.txt").write_text("".join(f"doc {i}\n" for i in range(500))), "whitespace"),
    (lambda f: np.save(f / "docs.npy", np.zeros((500, 16))), "holds a float64 array"),
    (lambda f: np.save(f / "docs.npy", np.array([{"x": 1}] * 500, dtype=object), allow_pickle=True), "not a readable .npy"),
    (lambda f: (f / "docs.npy").write_bytes(b"not numpy"), "not a readable .npy"),
    (lambda f: np.save(f / "queries.npy", np.zeros((7, 8), np.float32)), "query dimension 8 differs"),
    (lambda f: np.save(f / "queries.npy", np.full((7, 16), np.nan, np.float32)), "query row 0"),
])
def test_cli_search_embeddings_errors(embeddings, change, fragment):
    folder = embeddings[0]
    change(folder)
    result = CliRunner().invoke(app, search_args(folder), env=ENV)
    assert result.exit_code == 2 and fragment in result.stderr, result.output
    assert "Traceback" not in result.output


def test_cli_search_embeddings_needs_all_four_and_no_dataset(embeddings):
    folder = embeddings[0]
    result = CliRunner().invoke(app, search_args(folder, **{"--query-ids": None}), env=ENV)
    assert result.exit_code == 2 and "missing: --query-ids" in result.stderr
    result = CliRunner().invoke(app, search_args(folder) + ["--dataset", "scifact"], env=ENV)
    assert result.exit_code == 2 and "and no --dataset" in result.stderr
    result = CliRunner().invoke(app, ["search", "-o", str(folder / "r.trec")], env=ENV)
    assert result.exit_code == 2 and "Give --dataset NAME" in result.stderr
