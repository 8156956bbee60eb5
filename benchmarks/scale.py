"""Cost versus corpus size on synthetic embeddings: index build, first-stage latency, adapter re-rank, memory.

Usage (from the repository root): python benchmarks/scale.py [--sizes 10000 100000 1000000] [--workdir DIR]
Documents are seeded clustered unit vectors (384-d) written chunk by chunk into a memory-mapped .npy, so the
corpus is never built whole in RAM; queries are perturbed documents, so nearest neighbours are meaningful.
The adapter runs through the public API: `IMRNNRetriever.index_embeddings` (projects every document once) and
`rerank_ids` on the HNSW candidates' rows. Prints a markdown table for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

from imrnn.checkpoint import Checkpoint
from imrnn.config import IMRNNConfig
from imrnn.encode import EncoderConfig
from imrnn.index import FaissIndex, exact_search
from imrnn.model import IMRNN
from imrnn.retriever import IMRNNRetriever

DIM = 384


def synthetic_corpus(path: Path, n: int, seed: int = 0, clusters: int = 2048, chunk: int = 100_000) -> np.ndarray:
    """Clustered unit vectors in an on-disk .npy (written in chunks), memory-mapped read-only."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, DIM)).astype(np.float32)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, DIM))
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        block = centres[rng.integers(0, clusters, m)] + 0.8 * rng.standard_normal((m, DIM)).astype(np.float32)
        out[start : start + m] = block / np.linalg.norm(block, axis=1, keepdims=True)
    out.flush()
    del out
    return np.load(path, mmap_mode="r")


def queries_from(docs: np.ndarray, count: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    picked = np.asarray(docs[np.sort(rng.choice(len(docs), count, replace=False))])
    noisy = picked + 0.5 * rng.standard_normal(picked.shape).astype(np.float32) / np.sqrt(DIM)
    return (noisy / np.linalg.norm(noisy, axis=1, keepdims=True)).astype(np.float32)


def per_call_ms(fn, repeats: int) -> float:
    """Median wall milliseconds of `fn()` over `repeats` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def trained_like_adapter(seed: int = 0) -> IMRNN:
    """An adapter with random non-zero weights: the same cost as a trained one."""
    torch.manual_seed(seed)
    model = IMRNN(IMRNNConfig(embedding_dim=DIM))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model.eval()


def bench(n: int, workdir: Path, model: IMRNN) -> dict:
    docs = synthetic_corpus(workdir / f"corpus-{n}.npy", n)
    queries = queries_from(docs, 256)
    one = queries[:1]
    exact_ms = per_call_ms(lambda: exact_search(one, docs, 100), 5)
    exact_batch = exact_search(queries, docs, 100)
    start = time.perf_counter()
    hnsw = FaissIndex("hnsw", hnsw_m=16, ef_construction=40, ef_search=128).build(docs)
    build_s = time.perf_counter() - start
    hnsw_ms = per_call_ms(lambda: hnsw.search(one, 100), 20)
    approx = hnsw.search(queries, 100)
    recall = float(np.mean([len(np.intersect1d(a, e)) / 100 for a, e in zip(approx.indices, exact_batch.indices)]))

    start = time.perf_counter()  # the public API: every document projected once, then rows are only gathered
    retriever = IMRNNRetriever(Checkpoint(model, EncoderConfig())).index_embeddings(docs)
    cache_s = time.perf_counter() - start
    rerank_one_ms = per_call_ms(lambda: retriever.rerank_ids(one, approx.indices[:1]), 20)
    rerank_batch_ms = per_call_ms(lambda: retriever.rerank_ids(queries, approx.indices), 5)

    def end_to_end() -> None:
        retriever.rerank_ids(one, hnsw.search(one, 100).indices, k=10)

    e2e_ms = per_call_ms(end_to_end, 20)
    return {
        "n": n, "hnsw_build_s": build_s, "projection_cache_s": cache_s, "exact_ms": exact_ms, "hnsw_ms": hnsw_ms,
        "hnsw_recall@100": recall,
        "rerank_one_ms": rerank_one_ms, "rerank_256_ms": rerank_batch_ms, "e2e_hnsw_top10_ms": e2e_ms,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    model = trained_like_adapter()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        rows = []
        for n in args.sizes:
            rows.append(bench(n, Path(tmp), model))
            print(rows[-1], flush=True)
    print(f"\nSynthetic clustered corpora, 384-d float32 memory-mapped, {date.today().isoformat()}, "
          f"{os.cpu_count()} CPU cores; HNSW M=16, efConstruction=40, efSearch=128; one query unless noted.\n")
    print("| documents | HNSW build s | projection cache s | exact top-100 ms/query | HNSW top-100 ms/query | HNSW recall@100 vs exact "
          "| adapter re-rank ms (1 query x 100) | adapter re-rank ms (256 queries x 100) | HNSW + adapter top-10 ms/query | peak RSS MB |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['n']:,} | {r['hnsw_build_s']:.1f} | {r['projection_cache_s']:.1f} | {r['exact_ms']:.1f} | {r['hnsw_ms']:.2f} | {r['hnsw_recall@100']:.3f} "
              f"| {r['rerank_one_ms']:.2f} | {r['rerank_256_ms']:.1f} | {r['e2e_hnsw_top10_ms']:.2f} | {r['peak_rss_mb']:.0f} |")


if __name__ == "__main__":
    main()
