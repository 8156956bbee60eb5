"""Method benchmarks for RESULTS.md: base vs adapted per dataset, seeds, k-fold, ablations, Rocchio, cost.

Usage (from the repository root, after the README's install command):
    python benchmarks/method.py scifact --seeds 42 43 44
    python benchmarks/method.py nfcorpus
    python benchmarks/method.py cranfield --folds 5
    python benchmarks/method.py scifact --ablations
Datasets come from IMRNN_DATA_DIR (default ../shared/datasets); embeddings are cached in IMRNN_CACHE_DIR.
Each run prints a markdown table and writes JSON next to this file under results/.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

from imrnn.config import IMRNNConfig, TrainConfig
from imrnn.data import QuerySet, carve_validation, kfold, load_dataset
from imrnn.encode import Encoder
from imrnn.evaluate import evaluate_run, hits_to_run
from imrnn.pipeline import Prepared, compare_runs, evaluate_adapter, fit, validation_split

HERE = Path(__file__).resolve().parent
DATA_DIR = os.environ.get("IMRNN_DATA_DIR", str(HERE.parent.parent / "shared" / "datasets"))
MEASURES = ("nDCG@10", "R@10", "RR@10", "R@100")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def row(label: str, report: dict, seconds: float | None = None) -> str:
    b, a = report["base"], report["adapted"]
    u = report.get("unseen_relevant")
    if u is None:
        unseen = "n/a"  # not computed for this row (Rocchio, the k-fold union)
    else:
        unseen = f"{u['base']['nDCG@10']:.4f} → {u['adapted']['nDCG@10']:.4f} ({u['queries']})" if u["queries"] else "empty"
    cells = [label, str(report["queries"])] + [f"{b[m]:.4f} → {a[m]:.4f}" for m in ("nDCG@10", "R@10", "RR@10")]
    cells += [f"{b['R@100']:.4f}", f"{report['p_value']['nDCG@10']:.1e}", f"{report['improved']}/{report['worsened']}", unseen]
    cells.append("" if seconds is None else f"{seconds:.1f}")
    return "| " + " | ".join(cells) + " |"


HEADER = ("| run | queries | nDCG@10 base → adapted | R@10 | RR@10 | R@100 (ceiling) | paired t p (nDCG@10) | improved/worsened "
          "| unseen-relevant nDCG@10 (queries) | train s |\n|---|---:|---|---|---|---:|---:|---:|---|---:|")


def train_and_report(prepared: Prepared, train_q: QuerySet, val_q: QuerySet, test_q: QuerySet, model_config: IMRNNConfig,
                     train_config: TrainConfig, seen_qrels: dict) -> tuple[dict, float, object]:
    result = fit(prepared, train_q, val_q, model_config, train_config, progress=False)
    report, run = evaluate_adapter(result.model, prepared, test_q, seen_qrels)
    report["best_epoch"], report["validation_nDCG@10"] = result.best_epoch, result.best_validation
    return report, result.seconds, run


def rocchio(prepared: Prepared, val_q: QuerySet, test_q: QuerySet) -> tuple[dict, dict]:
    """Non-learned feedback q' = norm(q + beta * mean(top-m candidates)); beta and m chosen on validation."""
    docs = np.asarray(prepared.doc_embs)

    def run_for(queries: QuerySet, beta: float, m: int) -> dict:
        data = prepared.ranking(queries)
        cands = docs[data.candidates]
        q = data.query_embs + beta * cands[:, :m].mean(1)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        scores = np.einsum("qd,qkd->qk", q, cands)
        return hits_to_run(queries.ids, prepared.dataset.corpus.ids, data.candidates, scores)

    grid = [(b, m) for b in (0.0, 0.1, 0.25, 0.5, 1.0) for m in (1, 3, 5, 10)]
    best = max(grid, key=lambda bm: evaluate_run(run_for(val_q, *bm), val_q.qrels, ["nDCG@10"])["nDCG@10"])
    data = prepared.ranking(test_q)
    base_run = hits_to_run(test_q.ids, prepared.dataset.corpus.ids, data.candidates, prepared.base_scores(data))
    report = compare_runs(base_run, run_for(test_q, *best), test_q.qrels)
    report["beta"], report["m"] = best
    return report, {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42])
    parser.add_argument("--folds", type=int, default=0, help="k-fold cross-validation over the test queries (Cranfield)")
    parser.add_argument("--ablations", action="store_true")
    parser.add_argument("--validation", default="auto")
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    data = load_dataset(args.dataset, DATA_DIR, None, download=False)
    prepared = Prepared.build(data, Encoder(), None, 100)
    dim = prepared.doc_embs.shape[1]
    lines, results = [HEADER], {"dataset": args.dataset, "date": date.today().isoformat(), "runs": {}}

    if args.folds:
        queries = data.split("test")
        base_runs, adapted_runs, qrels, seconds = {}, {}, {}, []
        for i, (train_q, test_q) in enumerate(kfold(queries, args.folds, seed=42)):
            config = TrainConfig(seed=42)
            fit_q, val_q = carve_validation(train_q, config.validation_fraction, config.seed)
            seen = {**fit_q.qrels, **val_q.qrels}
            report, secs, run = train_and_report(prepared, fit_q, val_q, test_q, IMRNNConfig(embedding_dim=dim), config, seen)
            seconds.append(secs)
            d = prepared.ranking(test_q)
            base_runs.update(hits_to_run(test_q.ids, data.corpus.ids, d.candidates, prepared.base_scores(d)))
            adapted_runs.update(run)
            qrels.update(test_q.qrels)
            lines.append(row(f"fold {i}", report, secs))
        union = compare_runs(base_runs, adapted_runs, qrels)
        lines.append(row(f"all {args.folds} folds (union of test folds)", union, sum(seconds)))
        results["runs"]["kfold"] = union
    else:
        train_q, val_q = validation_split(data, "train", args.validation, TrainConfig().validation_fraction, 42)
        test_q = data.split("test")
        seen = {**data.qrels["train"], **val_q.qrels}
        variants: dict[str, tuple[IMRNNConfig, TrainConfig]] = {
            f"seed {s}": (IMRNNConfig(embedding_dim=dim), TrainConfig(seed=s)) for s in args.seeds
        }
        if args.ablations:
            full = IMRNNConfig(embedding_dim=dim)
            variants = {
                "full model (seed 42)": (full, TrainConfig()),
                "without A_q": (dataclasses.replace(full, use_query_adapter=False), TrainConfig()),
                "without A_d": (dataclasses.replace(full, use_doc_adapter=False), TrainConfig()),
                "iterations = 2": (dataclasses.replace(full, iterations=2), TrainConfig()),
                "other loss (" + ("listwise" if TrainConfig().loss == "margin" else "margin") + ")":
                    (full, TrainConfig(loss="listwise" if TrainConfig().loss == "margin" else "margin")),
                "without novelty gate": (full, TrainConfig(novelty_gate=False)),
            }
        for label, (model_config, train_config) in variants.items():
            if train_config.seed != 42:
                train_q, val_q = validation_split(data, "train", args.validation, train_config.validation_fraction, train_config.seed)
                seen = {**data.qrels["train"], **val_q.qrels}
            start_rss = peak_rss_mb()
            report, secs, _ = train_and_report(prepared, train_q, val_q, test_q, model_config, train_config, seen)
            report["peak_rss_mb"] = max(start_rss, peak_rss_mb())
            results["runs"][label] = report
            lines.append(row(label, report, secs))
        if len(args.seeds) > 1 and not args.ablations:
            values = np.array([results["runs"][f"seed {s}"]["adapted"]["nDCG@10"] for s in args.seeds])
            lines.append(f"\nadapted nDCG@10 over seeds {args.seeds}: mean {values.mean():.4f}, std {values.std(ddof=1):.4f}, "
                         f"min {values.min():.4f}, max {values.max():.4f}")
        if args.ablations:
            report, _ = rocchio(prepared, val_q, test_q)
            results["runs"]["rocchio"] = report
            lines.append(row(f"Rocchio (beta={report['beta']}, m={report['m']}, non-learned)", report))
    lines.append(f"\npeak RSS of this process: {peak_rss_mb():.0f} MB; date {results['date']}")
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    suffix = "kfold" if args.folds else ("ablations" if args.ablations else "seeds")
    (out / f"{args.dataset}-{suffix}.json").write_text(json.dumps(results, indent=2, default=float))
    print("\n".join(lines))


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    print(f"total wall time {time.perf_counter() - started:.0f}s")
