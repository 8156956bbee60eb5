"""Vector stores as the first stage: real embedded engines (Milvus Lite, Qdrant local mode) and a real local Ray.

Every test opens its own store in a temporary folder and closes it (Milvus Lite's in-process server, its file lock
and port are released by `close`). The kill-and-resume test SIGKILLs `imrnn index` subprocesses at random points
of their write phase; IMRNN_KILL_ROUNDS (default 1) sets how many kills each backend gets before the final run.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")
pytest.importorskip("qdrant_client")

from conftest import TINY_DOCS, randomised  # noqa: E402
from imrnn.checkpoint import Checkpoint, save_checkpoint  # noqa: E402
from imrnn.cli import app  # noqa: E402
from imrnn.config import IMRNNConfig  # noqa: E402
from imrnn.data import load_dataset  # noqa: E402
from imrnn.encode import Encoder, EncoderConfig, encode_corpus, encode_queries  # noqa: E402
from imrnn.errors import StoreError  # noqa: E402
from imrnn.evaluate import read_run  # noqa: E402
from imrnn.indexing import index_corpus  # noqa: E402
from imrnn.model import IMRNN  # noqa: E402
from imrnn.retriever import IMRNNRetriever  # noqa: E402
from imrnn.store import StoreConfig, open_store  # noqa: E402

BACKENDS = ("milvus", "qdrant")
KILL_ROUNDS = int(os.environ.get("IMRNN_KILL_ROUNDS", "1"))
FP32 = EncoderConfig(precision="fp32")  # one precision everywhere: encodings compare to float32 rounding


def store_uri(backend: str, folder: Path, name: str = "store") -> str:
    return f"milvus:{folder / (name + '.db')}" if backend == "milvus" else f"qdrant:{folder / name}"


def stored(uri: str, collection: str = "imrnn") -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every record of a collection: id -> (frozen embedding, projected vector)."""
    with open_store(uri, StoreConfig(collection=collection)) as store:
        return {i: (e, p) for batch in store.scan(7) for i, e, p in zip(batch.ids, batch.embeddings, batch.projected)}


@pytest.fixture(scope="module")
def env(tmp_path_factory, write_tiny_beir):
    """A tiny BEIR dataset, a cache with its embeddings, and two checkpoints with different (random) adapters."""
    root = tmp_path_factory.mktemp("store")
    data = write_tiny_beir(root / "data" / "tiny")
    cache = root / "cache"
    encoder = Encoder(FP32, "cpu", 16)
    dataset = load_dataset(data)
    encode_corpus(encoder, dataset.corpus, cache, progress=False)
    checkpoints = []
    for seed in (1, 2):
        path = root / f"ckpt{seed}"
        save_checkpoint(Checkpoint(randomised(IMRNN(IMRNNConfig()), seed), FP32), path)
        checkpoints.append(path)
    identity = root / "identity"  # an untrained adapter ranks as the frozen retriever does
    save_checkpoint(Checkpoint(IMRNN(IMRNNConfig()), FP32), identity)
    return {"root": root, "data": data, "cache": cache, "encoder": encoder, "dataset": dataset, "ckpts": checkpoints,
            "identity": identity}


def cli(env: dict, *args: str) -> str:
    result = CliRunner().invoke(app, [*args, "--cache-dir", str(env["cache"])], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def cli_error(env: dict, *args: str) -> str:
    result = CliRunner().invoke(app, [*args, "--cache-dir", str(env["cache"])], catch_exceptions=False)
    assert result.exit_code == 2, result.output
    return result.output


def in_process(env: dict, checkpoint: Path, k: int) -> tuple[list[str], list]:
    """The in-process reference: exact first stage over the cached embeddings, adapter re-rank (`IMRNNRetriever`)."""
    dataset = env["dataset"]
    retriever = IMRNNRetriever.from_pretrained(checkpoint, candidates=k)
    retriever.index_embeddings(encode_corpus(env["encoder"], dataset.corpus, env["cache"], progress=False), dataset.corpus.ids)
    queries = dataset.split("test")
    return queries.ids, retriever.search_embeddings(encode_queries(env["encoder"], queries, env["cache"]), k)


@pytest.mark.parametrize("backend", BACKENDS)
def test_index_then_search_reproduces_the_in_process_ranking(env, backend, tmp_path):
    uri, ckpt = store_uri(backend, tmp_path), env["ckpts"][0]
    out = cli(env, "index", "--dataset", str(env["data"]), "--store", uri, "--checkpoint", str(ckpt), "--index-type", "flat",
              "--upsert-batch", "7")
    assert "indexed: 20 documents" in out
    assert "already indexed: 20 documents" in cli(env, "index", "--dataset", str(env["data"]), "--store", uri,
                                                  "--checkpoint", str(ckpt))  # idempotent: nothing written again
    records = stored(uri)
    corpus = env["dataset"].corpus
    embeddings = np.asarray(encode_corpus(env["encoder"], corpus, env["cache"], progress=False))
    assert sorted(records) == sorted(corpus.ids.tolist())
    model = IMRNNRetriever.from_pretrained(ckpt).model
    projected = model.cache_corpus(embeddings).projected.numpy()
    for row, doc_id in enumerate(corpus.ids.tolist()):  # adapter-ready: frozen embedding and its projection
        np.testing.assert_allclose(records[doc_id][0], embeddings[row], rtol=0, atol=1e-6)
        np.testing.assert_allclose(records[doc_id][1], projected[row], rtol=0, atol=1e-5)

    run, base = tmp_path / "run.trec", tmp_path / "base.trec"
    cli(env, "search", "--dataset", str(env["data"]), "--split", "test", "--store", uri, "--checkpoint", str(ckpt), "--k", "20",
        "--output", str(run), "--base-output", str(base))
    adapted, frozen = read_run(run), read_run(base)
    qids, rankings = in_process(env, ckpt, 20)
    for qid, ranking in zip(qids, rankings):
        got = sorted(adapted[qid], key=lambda d: -adapted[qid][d])
        assert got == ranking.ids
        np.testing.assert_allclose([adapted[qid][d] for d in got], ranking.scores, rtol=0, atol=1e-5)
        np.testing.assert_allclose([frozen[qid][d] for d in got], ranking.base_scores, rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_connected_retriever_sees_added_and_deleted_documents(env, backend, tmp_path):
    uri = store_uri(backend, tmp_path)
    with IMRNNRetriever.connect(env["identity"], uri, store_config=StoreConfig(index_type="flat"), candidates=10) as retriever:
        retriever.index({d: f"{title} {text}" for d, (title, text) in TINY_DOCS.items() if d != "d16"}, progress=False)
        query = "What is the currency of Mexico?"
        assert "peso" not in retriever.search(query, k=10)[0].ids
        retriever.index({"peso": "The peso is the currency of Mexico, issued by the Bank of Mexico."}, progress=False)
        first = retriever.search([query, "Which hormone lowers blood sugar?"], k=3)
        assert first[0].ids[0] == "peso" and first[1].ids[0] == "d7"
        assert len(first[0].ids) == 3 and np.all(np.diff(first[0].scores) <= 0)
        retriever.delete(["peso"])
        assert "peso" not in retriever.search(query, k=10)[0].ids
        assert retriever.store.count() == 19
        with pytest.raises(Exception, match="rerank_ids"):
            retriever.rerank_ids(np.zeros((1, 384), np.float32), [["d1"]])


@pytest.mark.parametrize("backend", BACKENDS)
def test_clear_errors_name_the_fix(env, backend, tmp_path):
    uri, (first, second) = store_uri(backend, tmp_path), env["ckpts"]
    data = str(env["data"])
    unreachable = "milvus:http://127.0.0.1:9" if backend == "milvus" else "qdrant:http://127.0.0.1:9"
    assert "Could not reach" in cli_error(env, "index", "--dataset", data, "--store", unreachable, "--checkpoint", str(first))
    cli(env, "index", "--dataset", data, "--store", uri, "--checkpoint", str(first), "--index-type", "flat")
    search = ("search", "--dataset", data, "--split", "test", "--store", uri, "--output", str(tmp_path / "run.trec"))
    missing = cli_error(env, *search, "--checkpoint", str(first), "--collection", "nope")
    assert "'nope' does not exist" in missing and "imrnn index" in missing
    mismatch = cli_error(env, *search, "--checkpoint", str(second))
    assert "--reproject" in mismatch and str(second) in mismatch and str(first) in mismatch
    narrow = tmp_path / "ckpt8"  # an adapter for 8-d embeddings (another encoder's size)
    save_checkpoint(Checkpoint(IMRNN(IMRNNConfig(embedding_dim=8)), FP32), narrow)
    assert "384-d embeddings" in cli_error(env, *search, "--checkpoint", str(narrow))
    with open_store(uri) as store, pytest.raises(StoreError, match="holds 384-d embeddings"):
        store.search(np.zeros((1, 8), np.float32), 3)

    out = cli(env, "index", "--store", uri, "--checkpoint", str(second), "--reproject")  # no re-encoding: stored embeddings
    assert "reprojected: 20 documents" in out
    run = tmp_path / "second.trec"
    cli(env, "search", "--dataset", data, "--split", "test", "--store", uri, "--checkpoint", str(second), "--k", "20",
        "--output", str(run))
    adapted = read_run(run)
    qids, rankings = in_process(env, second, 20)
    assert all(sorted(adapted[q], key=lambda d: -adapted[q][d]) == r.ids for q, r in zip(qids, rankings))
    assert "--reproject" in cli_error(env, *search, "--checkpoint", str(first))  # now the first one is the stranger


def _index_command(env: dict, uri: str) -> list[str]:
    return [sys.executable, "-c", "from imrnn.cli import main; main()", "index", "--dataset", str(env["big"]), "--store", uri,
            "--checkpoint", str(env["ckpts"][0]), "--upsert-batch", "2", "--cache-dir", str(env["cache"])]


@pytest.fixture(scope="module")
def big(env, write_tiny_beir):
    """60 documents (written 2 per batch) with cached embeddings, so a kill lands among many batches."""
    docs = {f"x{i}": (f"Topic {i}", f"Document number {i} about subject {i % 17} and item {i % 5}.") for i in range(60)}
    folder = write_tiny_beir(env["root"] / "data" / "big", docs=docs, queries={"q": "subject 3"}, qrels={"test": {"q": {"x3": 1}}})
    encode_corpus(env["encoder"], load_dataset(folder).corpus, env["cache"], progress=False)
    return {**env, "big": folder}


EVERY_UPDATE = {**os.environ, "TQDM_MININTERVAL": "0", "TQDM_MINITERS": "1"}  # the bar shows every batch written


def _wait_for(process: subprocess.Popen, done: int) -> bool:
    """Read the job's progress bar on stderr until it shows at least `done` documents written; False if the job
    ends first having found nothing left to do."""
    seen = b""
    while True:
        counts = re.findall(rb"indexing into \w+:.*?(\d+)/\d+ \[", seen)
        if counts and int(counts[-1]) >= done:
            return True
        chunk = process.stderr.read1(4096)
        if not chunk:
            assert process.wait() == 0 and b"already indexed" in seen, seen.decode(errors="replace")[-2000:]
            return False
        seen += chunk


@pytest.mark.parametrize("backend", BACKENDS)
def test_killed_index_runs_resume_to_exactly_the_corpus(big, backend, tmp_path):
    """Each round SIGKILLs `imrnn index` once its bar shows a random number of documents written (0 = as writing
    starts), plus up to 50 ms: mid-upsert, mid-metadata-update or between the two."""
    rng = random.Random(os.getpid() + time.time_ns())
    corpus = load_dataset(big["big"]).corpus
    uri = store_uri(backend, tmp_path)
    for _ in range(KILL_ROUNDS):
        process = subprocess.Popen(_index_command(big, uri), stderr=subprocess.PIPE, env=EVERY_UPDATE)
        if not _wait_for(process, rng.randrange(len(corpus))):
            continue  # an earlier round already finished the job
        time.sleep(rng.uniform(0, 0.05))
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=60)
        with open_store(uri) as store:  # where the kill landed (shown with pytest -s)
            progress = store.info().metadata["progress"]
            print(f"{backend}: killed at {progress.get('done')}/{progress.get('total')} ({store.count()} stored)")
    final = subprocess.run(_index_command(big, uri), capture_output=True, timeout=300)
    assert final.returncode == 0, final.stderr.decode(errors="replace")[-2000:]
    records = stored(uri)
    assert sorted(records) == sorted(corpus.ids.tolist())  # every document once: nothing missing, no duplicate
    with open_store(uri) as store:
        assert store.count() == len(corpus)
        assert store.info().metadata["state"] == "ready"
    embeddings = np.asarray(encode_corpus(big["encoder"], corpus, big["cache"], progress=False))
    projected = IMRNNRetriever.from_pretrained(big["ckpts"][0]).model.cache_corpus(embeddings).projected.numpy()
    for row, doc_id in enumerate(corpus.ids.tolist()):
        np.testing.assert_array_equal(records[doc_id][0], embeddings[row])
        np.testing.assert_allclose(records[doc_id][1], projected[row], rtol=0, atol=1e-6)


def test_ray_encoding_stores_the_single_process_vectors(env, tmp_path):
    pytest.importorskip("ray")
    single, distributed = store_uri("milvus", tmp_path, "single"), store_uri("milvus", tmp_path, "ray")
    cli(env, "index", "--dataset", str(env["data"]), "--store", single, "--checkpoint", str(env["ckpts"][0]))
    out = cli(env, "index", "--dataset", str(env["data"]), "--store", distributed, "--checkpoint", str(env["ckpts"][0]),
              "--ray", "--ray-actors", "1", "--upsert-batch", "6")
    assert "indexed: 20 documents" in out
    import ray

    assert not ray.is_initialized()  # the local Ray the job started is stopped again
    reference, got = stored(single), stored(distributed)
    assert sorted(got) == sorted(reference)
    for doc_id, (embedding, projected) in got.items():
        np.testing.assert_allclose(embedding, reference[doc_id][0], rtol=0, atol=1e-5)
        np.testing.assert_allclose(projected, reference[doc_id][1], rtol=0, atol=1e-5)


def test_a_failed_local_ray_start_is_tried_again(env, tmp_path, monkeypatch):
    """A local Ray's start-up fails now and then (its raylet not registered within Ray's fixed 30 s on busy cores):
    a later try must do. One more try than production's, so the injected failure leaves the real starts their usual
    number (a real start has failed here too, after the injected one)."""
    ray = pytest.importorskip("ray")
    import imrnn.indexing as indexing

    tries = indexing.LOCAL_RAY_STARTS + 1
    monkeypatch.setattr(indexing, "LOCAL_RAY_STARTS", tries)
    real_init, calls = ray.init, []

    def failing_once(*args, **kwargs):
        calls.append(kwargs)
        if len(calls) == 1:
            raise ValueError("Ray component dashboard_agent_http is trying to use a port number that is used by other components.")
        return real_init(*args, **kwargs)

    monkeypatch.setattr(ray, "init", failing_once)
    with pytest.warns(UserWarning, match=rf"did not start \(ValueError: .*\); trying again \(2 of {tries}\)"):
        out = cli(env, "index", "--dataset", str(env["data"]), "--store", store_uri("milvus", tmp_path), "--checkpoint",
                  str(env["ckpts"][0]), "--ray", "--ray-actors", "1")
    assert "indexed: 20 documents" in out and 2 <= len(calls) <= tries
    assert not ray.is_initialized()


def test_a_local_ray_that_never_starts_is_a_clear_error(env, tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    import imrnn.indexing

    def never(*args, **kwargs):
        raise RuntimeError("Failed to start the raylet")

    monkeypatch.setattr(ray, "init", never)
    with pytest.warns(UserWarning, match="trying again"):
        out = cli_error(env, "index", "--dataset", str(env["data"]), "--store", store_uri("milvus", tmp_path), "--checkpoint",
                        str(env["ckpts"][0]), "--ray")
    assert f"Could not start a local Ray in {imrnn.indexing.LOCAL_RAY_STARTS} tries" in out
    assert "RuntimeError: Failed to start the raylet" in out and "without --ray" in out


def test_store_uris_and_config_are_checked(tmp_path):
    from imrnn.errors import ConfigError

    with pytest.raises(ConfigError, match="milvus:./NAME.db"):
        open_store("redis://localhost")
    with pytest.raises(StoreError, match="ending in .db"):
        open_store(f"milvus:{tmp_path / 'folder'}")
    with pytest.raises(StoreError, match="does not exist"):
        open_store(f"milvus:{tmp_path / 'missing' / 'x.db'}")
    with pytest.raises(ConfigError, match="letters, digits"):
        StoreConfig(collection="bad-name")
    with pytest.raises(ConfigError, match="index_type"):
        StoreConfig(index_type="ivf")


def test_index_corpus_refuses_a_half_reprojected_collection(env, tmp_path):
    uri = store_uri("milvus", tmp_path)
    model = IMRNNRetriever.from_pretrained(env["ckpts"][0]).model
    with open_store(uri, StoreConfig(index_type="flat")) as store:
        index_corpus(store, model, env["encoder"], env["dataset"].corpus, "first", env["cache"], progress=False)
        meta = store.info().metadata
        store.write_metadata({**meta, "state": "reprojecting"})
        with pytest.raises(StoreError, match="--reproject"):
            index_corpus(store, model, env["encoder"], env["dataset"].corpus, "first", env["cache"], progress=False)
    with pytest.raises(StoreError, match="not ready"):
        IMRNNRetriever.connect(env["ckpts"][0], uri)
