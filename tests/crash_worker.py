"""Subprocess worker for tests/test_crash.py: encodes a small corpus or trains an adapter, so the test can
SIGKILL it at random points and check that the next run resumes correctly. Not collected by pytest.

    python tests/crash_worker.py encode --cache DIR [--texts 200] [--chunk 16] [--out X.npy] [--log calls.log]
    python tests/crash_worker.py train --state DIR [--out W.safetensors] [--resume] [--epochs 16]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # the tests compare results bit for bit with in-process runs

WORDS = ("retrieval adapter query document embedding vector cosine ranking feedback modulation corpus index "
         "chunk resume crash signal memory cache lock atomic rename manifest epoch seed").split()


def corpus_texts(n: int) -> list[str]:
    """`n` short texts of varied length (so the length-sorted chunks differ from the input order)."""
    return [f"Text {i}: " + " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(3 + (i * 13) % 17)) for i in range(n)]


def encode(args: argparse.Namespace) -> None:
    import numpy as np

    from imrnn.encode import Encoder, EncoderConfig, encode_cached

    encoder = Encoder(EncoderConfig(precision="bf16"), device="cpu", batch_size=16)
    if args.log:
        original = encoder.encode

        def logged(texts, prefix="", progress=False):
            out = original(texts, prefix, progress)
            with open(args.log, "a") as log:  # one line per finished encode call; append survives SIGKILL
                log.write(f"{len(texts)}\n")
            return out

        encoder.encode = logged  # type: ignore[method-assign]
    texts = corpus_texts(args.texts)
    embs = encode_cached(encoder, [f"t{i}" for i in range(len(texts))], texts, args.cache, chunk_size=args.chunk, progress=False)
    if args.out:
        np.save(args.out, np.asarray(embs))
    print("done", flush=True)


def synthetic_task(seed: int = 0, n_docs: int = 1500, dim: int = 32, n_queries: int = 800, k: int = 30):
    """Relevance in a re-weighted space the base cosine ignores (as in tests/test_model.py)."""
    import numpy as np

    from imrnn.index import exact_search
    from imrnn.candidates import ranking_set

    rng = np.random.default_rng(seed)
    docs = rng.standard_normal((n_docs, dim)).astype(np.float32)
    docs /= np.linalg.norm(docs, axis=1, keepdims=True)
    weights = np.ones(dim, np.float32)
    weights[:4] = 6.0
    targets = rng.integers(0, n_docs, size=n_queries)
    queries = docs[targets] * weights + rng.standard_normal((n_queries, dim)).astype(np.float32) * 1.2
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    ids = np.array([f"d{i}" for i in range(n_docs)], dtype=object)
    qids = [f"q{i}" for i in range(n_queries)]
    qrels = {q: {f"d{t}": 1} for q, t in zip(qids, targets)}
    hits = exact_search(queries, docs, k)
    cut = n_queries * 4 // 5
    make = lambda sl, add: ranking_set(qids[sl], queries[sl], hits.indices[sl], qrels, ids, add)  # noqa: E731
    return docs, ids, make(slice(0, cut), 5), make(slice(cut, n_queries), 0)


def run_training(state_dir: Path | None, resume: bool, epochs: int = 16, on_epoch=None):
    """The training run every kill/resume test compares: seeded, with dropout (so RNG state matters)."""
    from imrnn.config import IMRNNConfig, TrainConfig
    from imrnn.train import train_adapter

    docs, ids, train_set, validation_set = synthetic_task()
    config = TrainConfig(epochs=epochs, batch_size=8, lr=3e-3, candidates=30, seed=11, patience=epochs)
    model_config = IMRNNConfig(embedding_dim=32, hidden_dim=32, dropout=0.1)
    return train_adapter(model_config, config, docs, ids, train_set, validation_set, progress=False, on_epoch=on_epoch,
               state_dir=state_dir, resume=resume)


def train(args: argparse.Namespace) -> None:
    from safetensors.torch import save_file

    result = run_training(Path(args.state) if args.state else None, args.resume, args.epochs,
                          on_epoch=lambda record: print(f"epoch {record['epoch']}", flush=True))
    if args.out:
        tmp = Path(args.out).with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in result.model.state_dict().items()}, str(tmp))
        os.replace(tmp, args.out)
    print("done", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="mode", required=True)
    enc = sub.add_parser("encode")
    enc.add_argument("--cache", required=True)
    enc.add_argument("--texts", type=int, default=200)
    enc.add_argument("--chunk", type=int, default=16)
    enc.add_argument("--out")
    enc.add_argument("--log")
    tr = sub.add_parser("train")
    tr.add_argument("--state")
    tr.add_argument("--out")
    tr.add_argument("--resume", action="store_true")
    tr.add_argument("--epochs", type=int, default=16)
    args = parser.parse_args()
    {"encode": encode, "train": train}[args.mode](args)


if __name__ == "__main__":
    sys.exit(main())
