#!/usr/bin/env python
"""Faithfulness and speed of `imrnn explain` on a dataset split; prints markdown tables.

    IMRNN_DATA_DIR=/work/shared/datasets IMRNN_CACHE_DIR=/tmp/imrnn-cache \\
        python benchmarks/faithfulness.py --checkpoint /tmp/ckpt-explain --dataset scifact --split test

What it measures (the checkpoint is one trained with `imrnn train --dataset scifact`):

1. Deletion test, n = 3: for every query and its most-promoted document (largest rank gain among the adapted
   top 10), the drop of that document's adapted score when the 3 query words chosen by a method are deleted,
   against the mean drop over 10 random 3-word deletions. Methods: token attribution (occlusion) and concepts
   (the query words closest to the top-10 concepts of the document's relative modulation), with the concept
   vocabulary embedded through the full encoder ("encoder") and, for comparison, the transformer's input
   word-embedding matrix ("input").
2. Vocabulary self-recovery: match each query's own embedding against the vocabulary; the share of the top-10
   concepts that are words of the query (precision) tells whether the vocabulary lives in the same space as
   the embeddings the back-projection produces.
3. Time to explain one query over its 100 candidates (model, encoder and vocabulary already loaded).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

from imrnn.checkpoint import load_checkpoint
from imrnn.data import load_dataset
from imrnn.encode import Encoder
from imrnn.explain import Explainer, explain_dataset_query, split_deletion_test, words
from imrnn.workflow import Workspace
from imrnn.report import deletion_markdown


def self_recovery(explainer: Explainer, texts: list[str], k: int = 10) -> float:
    """Mean share of each text's top-k vocabulary matches (its own embedding, centred) that are its own words."""
    vocab = explainer.vocabulary
    embs = explainer.encoder.encode(texts, explainer.encoder.config.query_prefix)
    sims = vocab.directions(embs) @ vocab.vectors.T  # sentence embeddings vs. tokens, as the explanation matches them
    top = np.argsort(-sims, axis=1)[:, :k]
    shares = []
    for text, row in zip(texts, top):
        own = {text[s:e].lower() for s, e in words(text)}
        shares.append(np.mean([vocab.tokens[i] in own for i in row]))
    return float(np.mean(shares))


def timing(explainer: Explainer, workspace: Workspace, split: str, ids: list[str], doc_words: int) -> tuple[list[float], list[float]]:
    """Wall-clock and process CPU seconds per explanation. On a shared machine the wall clock mostly measures the
    neighbours; with one torch thread the CPU time is what the wall clock would be on an idle core."""
    wall, cpu = [], []
    for qid in ids:
        start, start_cpu = time.perf_counter(), time.process_time()
        explain_dataset_query(explainer, workspace, split, qid, doc_words=doc_words)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return wall, cpu


def _stats(values: list[float]) -> str:
    values = sorted(values)
    return f"{statistics.median(values):.3f} | {values[min(len(values) - 1, int(0.9 * len(values)))]:.3f} | {values[-1]:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="/tmp/ckpt-explain")
    parser.add_argument("--dataset", default="scifact")
    parser.add_argument("--split", default="test")
    parser.add_argument("--n", type=int, default=3)
    parser.add_argument("--draws", type=int, default=10)
    parser.add_argument("--timed-queries", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--skip-input", action="store_true", help="skip the input-embedding vocabulary comparison")
    parser.add_argument("--timing-only", action="store_true", help="only the speed table")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    checkpoint = load_checkpoint(args.checkpoint)
    encoder = Encoder(checkpoint.encoder)
    data = load_dataset(args.dataset)
    workspace = Workspace.open(data, encoder, 100, progress=False)
    queries = data.split(args.split)
    kinds = ["encoder"] if args.skip_input or args.timing_only else ["encoder", "input"]
    explainers = {kind: Explainer(checkpoint, encoder, vocabulary=kind, progress=True) for kind in kinds}
    for ex in explainers.values():
        ex.vocabulary, ex.pseudo_inverse  # one-time costs, outside every timing below

    print(f"# imrnn explain on {args.dataset} {args.split} ({len(queries)} queries), checkpoint {args.checkpoint}\n")
    print(f"torch threads: {torch.get_num_threads()}, load average at start: {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} CPUs\n")

    # 3. speed first (before the long deletion runs heat the machine further)
    ex = explainers["encoder"]
    explain_dataset_query(ex, workspace, args.split, queries.ids[0])  # warm-up
    ids = queries.ids[: args.timed_queries]
    print("## Time to explain one query over 100 candidates (excluding model load)\n")
    print("| doc word attributions | wall median s | wall p90 s | wall max s | CPU median s | CPU p90 s | CPU max s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for doc_words in (0, 1, 3):
        wall, cpu = timing(ex, workspace, args.split, ids, doc_words)
        default = " (default)" if doc_words == 1 else ""
        print(f"| {doc_words}{default} | {_stats(wall)} | {_stats(cpu)} |")
    print(f"\n({len(ids)} queries; load average now {os.getloadavg()[0]:.1f})\n")
    if args.timing_only:
        return

    # 2. vocabulary self-recovery
    print("## Concept vocabulary: self-recovery of a query's own words (top-10 precision)\n")
    print("| vocabulary | tokens | precision@10 |\n|---|---:|---:|")
    for kind, ex in explainers.items():
        print(f"| {kind} | {len(ex.vocabulary.tokens)} | {self_recovery(ex, queries.texts):.3f} |")
    print()

    # 1. deletion test
    for kind, ex in explainers.items():
        start = time.perf_counter()
        report = split_deletion_test(ex, workspace, args.split, n=args.n, draws=args.draws, progress=False)
        print(deletion_markdown(report, f"## Deletion test ({kind} vocabulary)"))
        print(f"\n({time.perf_counter() - start:.0f} s)\n")


if __name__ == "__main__":
    main()
