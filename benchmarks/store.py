"""Vector stores as the first stage versus the in-process faiss HNSW path, on synthetic 384-d corpora.

Usage (from the repository root):
    python benchmarks/store.py [--sizes 100000 1000000] [--systems faiss milvus qdrant] [--workdir DIR]
        [--qdrant-max 100000] [--queries 200] [--json out.json]

For each corpus size the driver writes one seeded clustered corpus (`scale.synthetic_corpus`, memory-mapped) and
the exact top-100 of 256 perturbed-document queries, then runs every system in its own subprocess (so each peak RSS
is its own), one after another in the same invocation:

* faiss: `FaissIndex` HNSW over the memory-mapped corpus + `IMRNNRetriever.index_embeddings` (projects every
  document once); a query = HNSW top-100 + `rerank_ids` to top-10. "Ingest" is building both in memory.
* milvus: Milvus Lite (embedded, `milvus:FILE.db`), HNSW on the frozen embedding; records written through
  `imrnn.store` in batches (frozen embedding + `IMRNN.cache_corpus(...).projected`); build = flush until every
  segment is indexed; a query = `store.search(q, 100)` + `rerank_hits(..., 10)` from the returned vectors.
* qdrant: Qdrant local mode (embedded, `qdrant:FOLDER`), which searches exactly in NumPy; sizes above
  `--qdrant-max` are skipped (local mode is meant for small collections and writes one SQLite row per point).

Every system uses the same random "trained-like" adapter and HNSW M=16, efConstruction=40, ef=128. Latencies are
one query per call (p50/p99 over `--queries` calls after warm-up), wall clock, on a shared machine: the load average
is printed with the table. Prints a markdown table for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale import queries_from, synthetic_corpus, trained_like_adapter  # noqa: E402

M, EF_CONSTRUCTION, EF_SEARCH, DEPTH, TOP = 16, 40, 128, 100, 10
BATCH = 2000  # documents per upsert


def single_thread() -> None:
    """One query at a time gains nothing from threads; on a shared machine idle OpenMP threads only add jitter."""
    import faiss
    import torch

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)


def latencies(search, rerank, queries: np.ndarray, warmup: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Wall milliseconds per query, single-threaded, one query per call (after `warmup` calls): the first stage
    (`search(q)`) alone, and the first stage plus the adapter re-rank of its result (`rerank(q, result)`)."""
    single_thread()
    for q in queries[:warmup]:
        rerank(q[None], search(q[None]))
    first, total = [], []
    for q in queries:
        start = time.perf_counter()
        found = search(q[None])
        middle = time.perf_counter()
        rerank(q[None], found)
        end = time.perf_counter()
        first.append(1000 * (middle - start))
        total.append(1000 * (end - start))
    return np.array(first), np.array(total)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(np.intersect1d(f[f >= 0], t)) / len(t) for f, t in zip(found, truth)]))


def run_faiss(docs: np.ndarray, queries: np.ndarray, truth: np.ndarray, timed: np.ndarray) -> dict:
    from imrnn.checkpoint import Checkpoint
    from imrnn.encode import EncoderConfig
    from imrnn.index import FaissIndex
    from imrnn.retriever import IMRNNRetriever

    start = time.perf_counter()
    retriever = IMRNNRetriever(Checkpoint(trained_like_adapter(), EncoderConfig())).index_embeddings(docs)
    project_s = time.perf_counter() - start
    start = time.perf_counter()
    hnsw = FaissIndex("hnsw", hnsw_m=M, ef_construction=EF_CONSTRUCTION, ef_search=EF_SEARCH).build(docs)
    build_s = time.perf_counter() - start
    start = time.perf_counter()
    found = hnsw.search(queries, DEPTH).indices
    batch_ms = 1000 * (time.perf_counter() - start) / len(queries)
    first, total = latencies(lambda q: hnsw.search(q, DEPTH).indices, lambda q, rows: retriever.rerank_ids(q, rows, k=TOP),
                             timed)
    return {"ingest_s": project_s + build_s, "build_s": build_s, "first_stage_ms": first, "total_ms": total,
            "recall": recall(found, truth), "batched_ms_per_query": batch_ms}


def run_store(kind: str, docs: np.ndarray, queries: np.ndarray, truth: np.ndarray, timed: np.ndarray, folder: Path) -> dict:
    from imrnn.encode import Encoder, EncoderConfig
    from imrnn.store import AdapterIdentity, Records, StoreConfig, open_store, rerank_hits

    model = trained_like_adapter()
    uri = f"milvus:{folder / 'bench.db'}" if kind == "milvus" else f"qdrant:{folder / 'bench'}"
    config = StoreConfig(collection="bench", index_type="hnsw", hnsw_m=M, ef_construction=EF_CONSTRUCTION,
                         ef_search=EF_SEARCH, batch_size=BATCH)
    with open_store(uri, config) as store:
        identity = AdapterIdentity.of(model, Encoder(EncoderConfig(precision="fp32")), "benchmark")
        store.create(docs.shape[1], model.config.dim, identity.metadata("ready"))
        start = time.perf_counter()
        for first in range(0, len(docs), BATCH):
            block = np.asarray(docs[first : first + BATCH])
            ids = [str(i) for i in range(first, first + len(block))]
            store.upsert(Records(ids, block, model.cache_corpus(block).projected.numpy(), [""] * len(ids), [""] * len(ids)))
        ingest_s = time.perf_counter() - start
        start = time.perf_counter()
        if kind == "milvus":  # seal every segment and wait until its HNSW index is built
            store.client.flush("bench")
            while store.client.describe_index("bench", "embedding").get("pending_index_rows", 0):
                time.sleep(0.5)
        store.search(queries[:1], DEPTH)  # first query: loads what the engine loads lazily
        build_s = time.perf_counter() - start
        start = time.perf_counter()
        found = store.search(queries, DEPTH).ids  # all queries, 64 per request
        batch_ms = 1000 * (time.perf_counter() - start) / len(queries)
        assert store.count() == len(docs)
        first, total = latencies(lambda q: store.search(q, DEPTH), lambda q, hits: rerank_hits(model, q, hits, TOP), timed)
    rows = np.where(found == "", -1, np.vectorize(int, otypes=[np.int64])(np.where(found == "", "-1", found)))
    return {"ingest_s": ingest_s, "build_s": build_s, "first_stage_ms": first, "total_ms": total,
            "recall": recall(rows, truth), "batched_ms_per_query": batch_ms, "disk_mb": sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20}


def worker(args: argparse.Namespace) -> None:
    """One system on one corpus, in this process; prints a JSON line."""
    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    data = Path(args.data)
    docs = np.load(data / "corpus.npy", mmap_mode="r")
    queries, truth = np.load(data / "queries.npy"), np.load(data / "truth.npy")
    timed = queries[: args.queries]
    folder = Path(tempfile.mkdtemp(dir=data, prefix=args.worker))
    try:
        result = (run_faiss(docs, queries, truth, timed) if args.worker == "faiss"
                  else run_store(args.worker, docs, queries, truth, timed, folder))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    result.update(system=args.worker, n=len(docs), peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    for key in ("first_stage_ms", "total_ms"):
        times = result.pop(key)
        result[key.replace("_ms", "_p50_ms")] = float(np.percentile(times, 50))
        result[key.replace("_ms", "_p99_ms")] = float(np.percentile(times, 99))
        result[key.replace("_ms", "_min_ms")] = float(times.min())  # the cost without preemption, on a shared machine
    print(json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--systems", nargs="+", default=["faiss", "milvus", "qdrant"], choices=["faiss", "milvus", "qdrant"])
    parser.add_argument("--qdrant-max", type=int, default=100_000, help="Skip Qdrant local mode above this many documents.")
    parser.add_argument("--queries", type=int, default=200, help="Single-query calls timed per system.")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="Also write the results here.")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    from imrnn.index import exact_search

    rows = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for n in args.sizes:
            data = Path(tmp) / f"n{n}"
            data.mkdir()
            docs = synthetic_corpus(data / "corpus.npy", n)
            queries = queries_from(docs, 256)
            np.save(data / "queries.npy", queries)
            np.save(data / "truth.npy", exact_search(queries, docs, DEPTH).indices)
            del docs
            for system in args.systems:
                if system == "qdrant" and n > args.qdrant_max:
                    continue
                load = os.getloadavg()[0]
                done = subprocess.run([sys.executable, __file__, "--worker", system, "--data", str(data),
                                       "--queries", str(args.queries)], capture_output=True, text=True)
                if done.returncode != 0:
                    print(done.stderr[-3000:], file=sys.stderr)
                    raise SystemExit(f"{system} at {n:,} failed")
                rows.append({**json.loads(done.stdout.strip().splitlines()[-1]), "load_before": load,
                             "load_after": os.getloadavg()[0]})
                print(rows[-1], flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    print(f"\nSynthetic clustered corpora (384-d float32), {date.today().isoformat()}, {os.cpu_count()} CPU cores; "
          f"HNSW M={M}, efConstruction={EF_CONSTRUCTION}, ef={EF_SEARCH}; one query per call, store top-{DEPTH} + adapter "
          f"re-rank to top-{TOP}; 1-minute load average before/after each system in the last column.\n")
    print("| documents | system | ingest docs/s | index build s | first stage p50 / p99 ms | first stage + re-rank top-10 "
          "p50 / p99 ms | first stage, 256 queries batched, ms/query | recall@100 vs exact | peak RSS MB | load |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['n']:,} | {r['system']} | {r['n'] / r['ingest_s']:,.0f} | {r['build_s']:.1f} "
              f"| {r['first_stage_p50_ms']:.2f} / {r['first_stage_p99_ms']:.2f} | {r['total_p50_ms']:.2f} / {r['total_p99_ms']:.2f} "
              f"| {r['batched_ms_per_query']:.2f} | {r['recall']:.3f} | {r['peak_rss_mb']:,.0f} "
              f"| {r['load_before']:.1f} / {r['load_after']:.1f} |")


if __name__ == "__main__":
    main()
