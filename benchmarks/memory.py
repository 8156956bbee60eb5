#!/usr/bin/env python
"""Peak memory of `imrnn search` over a synthetic corpus too big to copy casually (default 2M x 384 float32,
2.9 GiB): the corpus is memory-mapped and scanned in chunks, so the peak must stay far below its size.

    python benchmarks/memory.py                      # 2M x 384, 1000 queries, k=100; records benchmarks/RESULTS.md
    python benchmarks/memory.py --docs 200000 --no-record   # a quick smaller run

What it does:
1. writes `corpus.npy` (seeded random unit vectors, generated and appended 100k rows at a time: never whole in
   RAM), `ids.txt`, and 1000 queries that are noisy copies of known corpus rows (`queries.npy`, `qids.txt`);
2. runs, under `/usr/bin/time -v`,
   `imrnn search --embeddings corpus.npy --ids ids.txt --query-embeddings queries.npy --query-ids qids.txt -k 100 -o run.trec`
   and reads "Maximum resident set size" (peak RSS, which counts the corpus pages mapped into the process);
3. checks the run (every query's planted row must come first) and the peak against the 4 GiB budget;
4. records the figure in benchmarks/RESULTS.md (section "Peak memory of imrnn search").
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

BUDGET_GIB = 4.0
SECTION = "## Peak memory of `imrnn search`"


def write_corpus(folder: Path, n_docs: int, dim: int, seed: int, block: int = 100_000) -> Path:
    """`corpus.npy` (+ `ids.txt`) written block by block: an .npy header, then raw float32 rows appended."""
    path = folder / "corpus.npy"
    rng = np.random.default_rng(seed)
    with open(path, "wb") as out, open(folder / "ids.txt", "w", encoding="utf-8") as ids:
        np.lib.format.write_array_header_1_0(out, {"descr": "<f4", "fortran_order": False, "shape": (n_docs, dim)})
        for start in range(0, n_docs, block):
            rows = min(block, n_docs - start)
            chunk = rng.standard_normal((rows, dim), dtype=np.float32)
            chunk /= np.linalg.norm(chunk, axis=1, keepdims=True)
            chunk.tofile(out)
            ids.write("".join(f"d{i}\n" for i in range(start, start + rows)))
    return path


def write_queries(folder: Path, corpus: Path, n_queries: int, seed: int, noise: float = 0.05) -> np.ndarray:
    """Queries = corpus rows plus a little noise, renormalised; returns the planted rows (the expected top-1)."""
    docs = np.load(corpus, mmap_mode="r")
    rng = np.random.default_rng(seed + 1)
    rows = np.sort(rng.choice(len(docs), size=n_queries, replace=False))
    queries = np.asarray(docs[rows], dtype=np.float32) + rng.standard_normal((n_queries, docs.shape[1]), dtype=np.float32) * noise
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    np.save(folder / "queries.npy", queries)
    (folder / "qids.txt").write_text("".join(f"q{i}\n" for i in range(n_queries)))
    return rows


def run_search(folder: Path, k: int, backend: str) -> tuple[list[str], dict[str, str], float]:
    imrnn = shutil.which("imrnn", path=str(Path(sys.executable).parent)) or "imrnn"
    command = ["/usr/bin/time", "-v", imrnn, "search", "--embeddings", str(folder / "corpus.npy"), "--ids", str(folder / "ids.txt"),
               "--query-embeddings", str(folder / "queries.npy"), "--query-ids", str(folder / "qids.txt"),
               "-k", str(k), "--backend", backend, "-o", str(folder / "run.trec")]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"imrnn search failed ({done.returncode}):\n{done.stderr[-3000:]}")
    stats = {}
    for line in done.stderr.splitlines():
        if ":" in line and line.startswith("\t"):
            key, _, value = line.strip().rpartition(": ")
            stats[key] = value
    return command, stats, wall


def check_run(folder: Path, planted: np.ndarray) -> float:
    """Share of queries whose planted corpus row is ranked first."""
    top: dict[str, str] = {}
    with open(folder / "run.trec", encoding="utf-8") as run:
        for line in run:
            qid, _, doc, rank, _, _ = line.split()
            if rank == "1":
                top[qid] = doc
    return float(np.mean([top.get(f"q{i}") == f"d{row}" for i, row in enumerate(planted)]))


def record(results: Path, text: str) -> None:
    """Replace (or append) this benchmark's section of RESULTS.md, leaving the other sections alone."""
    old = results.read_text(encoding="utf-8") if results.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}.*?(?=^## |\Z)", re.S | re.M)
    new = pattern.sub(lambda _: text, old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + text
    results.write_text(new, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/imrnn-memory"), help="Scratch folder (needs ~3.2 GB for 2M x 384).")
    parser.add_argument("--docs", type=int, default=2_000_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("-k", type=int, default=100)
    parser.add_argument("--backend", default="exact")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="Keep the scratch folder (reused by the next run).")
    parser.add_argument("--no-record", action="store_true", help="Do not write benchmarks/RESULTS.md.")
    args = parser.parse_args()

    folder = args.work / f"{args.docs}x{args.dim}-seed{args.seed}"
    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "corpus.npy"
    expected_bytes = args.docs * args.dim * 4
    if not corpus.exists() or corpus.stat().st_size < expected_bytes:
        start = time.perf_counter()
        write_corpus(folder, args.docs, args.dim, args.seed)
        print(f"wrote {corpus} ({expected_bytes / 2**30:.2f} GiB) in {time.perf_counter() - start:.0f}s", file=sys.stderr)
    planted = write_queries(folder, corpus, args.queries, args.seed)

    command, stats, wall = run_search(folder, args.k, args.backend)
    peak_kib = int(stats["Maximum resident set size (kbytes)"])
    peak_gib = peak_kib / 2**20
    top1 = check_run(folder, planted)
    shown = " ".join(str(c).replace(str(folder), "$WORK") for c in command)
    summary = (
        f"{SECTION} ({args.docs:,} x {args.dim} float32 corpus)\n\n"
        f"Synthetic corpus of {args.docs:,} seeded random unit vectors ({expected_bytes / 2**30:.2f} GiB as float32, "
        f"an `.npy` written 100k rows at a time), {args.queries} queries (noisy copies of known rows), k = {args.k}, "
        f"backend `{args.backend}`. Produced by `python benchmarks/memory.py` "
        f"({platform.machine()}, {os.cpu_count()} CPUs shared with other work, Python {platform.python_version()}).\n\n"
        f"```\n{shown}\n```\n\n"
        f"| measure | value |\n|---|---|\n"
        f"| peak RSS (`/usr/bin/time -v`, Maximum resident set size) | **{peak_gib:.2f} GiB** ({peak_kib:,} KiB) |\n"
        f"| budget | {BUDGET_GIB:.0f} GiB: {'met' if peak_gib < BUDGET_GIB else 'EXCEEDED'} |\n"
        f"| corpus size on disk | {expected_bytes / 2**30:.2f} GiB |\n"
        f"| wall time (`Elapsed`) | {stats.get('Elapsed (wall clock) time (h:mm:ss or m:ss)', '?')} |\n"
        f"| planted row ranked first | {top1:.1%} of queries |\n\n"
        "How it stays small: `--embeddings` memory-maps the file (read-only, never unpickled); `exact_search` reads "
        "row chunks (at most 2^25 query x document scores per chunk), and releases each scored chunk's pages from the "
        "process (`madvise(MADV_DONTNEED)`; the OS page cache may still hold them), so the peak is the working set of "
        "one chunk plus the id table, not the corpus.\n"
    )
    print(summary)
    if not args.no_record:
        record(Path(__file__).with_name("RESULTS.md"), summary)
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)
    if peak_gib >= BUDGET_GIB or top1 < 0.99:
        sys.exit(f"FAILED: peak {peak_gib:.2f} GiB (budget {BUDGET_GIB} GiB), top-1 {top1:.1%}")


if __name__ == "__main__":
    main()
