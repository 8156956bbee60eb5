"""Re-ranking throughput of the authors' package through its public API (run INSIDE the authors' environment).

Called by benchmarks/vs_official.py, alternately with our own throughput measurement, on the same inputs:
WORK/rerank-inputs/{queries.npy (Q, d), candidates.npy (Q, K, d), ids.json (Q lists of K document ids)}.
Times `IMRNNAdapter.rank_embeddings` (one query per call: the API takes one query) over all Q queries,
best of --repeats after one warm-up call, and writes {"qps": ..., "seconds": [...]} to --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from imrnns.adapter import IMRNNAdapter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--inputs", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    adapter = IMRNNAdapter.from_checkpoint(args.checkpoint, load_encoder=False, device="cpu")
    queries = torch.from_numpy(np.load(args.inputs / "queries.npy"))
    candidates = torch.from_numpy(np.load(args.inputs / "candidates.npy"))
    ids = json.loads((args.inputs / "ids.json").read_text())
    adapter.rank_embeddings(queries[0], candidates[0], document_ids=ids[0])  # warm-up
    seconds = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        for query, cands, cand_ids in zip(queries, candidates, ids):
            adapter.rank_embeddings(query, cands, document_ids=cand_ids)
        seconds.append(time.perf_counter() - start)
    args.out.write_text(json.dumps({"qps": len(queries) / min(seconds), "seconds": seconds,
                                    "torch_threads": torch.get_num_threads()}, indent=2))


if __name__ == "__main__":
    main()
