"""Why the adapter gains least where training saw none of a query's relevant documents: a prior over documents.

Usage (from the repository root, after the README's install command):
    python benchmarks/document_prior.py                                  # SciFact, seeds 42 43 44
    python benchmarks/document_prior.py --datasets scifact cranfield npl --seeds 42

For each test query, the share of its top-10 that are documents relevant to some training or validation query
("training-relevant documents"), under the frozen retriever and under the default recipe's adapter, split into the
unseen-relevant test queries (none of whose relevant documents is training-relevant: there every training-relevant
document in the top-10 is a miss) and the others. If the adapter's gain came only from matching queries to
documents better, the share would move alike in both groups; a share that rises on the unseen-relevant queries
too means the adapter learned to favour the documents it was trained on, whatever the query. The splits are the
protocol of `all_collections.py` (official splits, else 5-fold cross-validation pooled over the folds); this is an
analysis of test results, and chooses nothing. Writes `--output` (benchmarks/results/document-prior.json) and
prints a markdown table.
"""

from __future__ import annotations

import argparse
from datetime import date
from pathlib import Path

import numpy as np

from all_collections import DATA_DIR, plans_for
from imrnn.config import EncoderConfig, IMRNNConfig, TrainConfig
from imrnn.data import load_dataset
from imrnn.evaluate import evaluated_queries, hits_to_run, per_query
from imrnn.files import atomic_write_json
from imrnn.scoring import score_candidates
from imrnn.workflow import SplitPlan, Workspace, train

HERE = Path(__file__).resolve().parent
TOP = 10


def top_share(scores: np.ndarray, candidates: np.ndarray, marked: np.ndarray) -> np.ndarray:
    """Per query, the share of its top-`TOP` candidates by `scores` that are `marked` (a bool per corpus row)."""
    order = np.argsort(-scores, axis=1, kind="stable")[:, :TOP]
    rows = np.take_along_axis(candidates, order, axis=1)
    return np.where(rows >= 0, marked[np.maximum(rows, 0)], False).mean(axis=1)


def plan_values(workspace: Workspace, plan: SplitPlan, recipe: TrainConfig) -> dict[str, np.ndarray]:
    """Per evaluated test query of one plan: nDCG@10 and training-relevant top-10 share, frozen and adapted."""
    model = train(workspace, plan, recipe, IMRNNConfig(), progress=False).model
    data = workspace.ranking(plan.test)
    doc_ids = workspace.dataset.corpus.ids
    seen = {d for docs in plan.seen.values() for d, r in docs.items() if r > 0}
    marked = np.isin(doc_ids, list(seen))
    scores = {"base": workspace.frozen_scores(data),
              "adapted": score_candidates(model, data.query_embs, workspace.doc_embs, data.candidates)}
    judged = evaluated_queries(data.qrels)
    row_of = {q: i for i, q in enumerate(data.query_ids)}
    rows = np.array([row_of[q] for q in judged], dtype=int)
    unseen = set(plan.unseen_relevant(plan.test))
    values = {"unseen": np.array([q in unseen for q in judged])}
    for name, s in scores.items():
        run = hits_to_run(data.query_ids, doc_ids, data.candidates, s)
        values[f"{name} nDCG@10"] = per_query(run, data.qrels, ["nDCG@10"])["nDCG@10"]
        values[f"{name} share"] = top_share(s, data.candidates, marked)[rows]
    return values


def run_dataset(name: str, seed: int) -> dict:
    """Pooled over the dataset's plans: both figures for the unseen-relevant test queries and for the others."""
    plans, protocol = plans_for(name, seed, TrainConfig().validation_fraction)
    workspace = Workspace.open(load_dataset(name, DATA_DIR, None, download=False), EncoderConfig(precision="fp32"),
                               k=100, progress=False)
    parts = [plan_values(workspace, plan, TrainConfig(seed=seed)) for plan in plans]
    values = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    unseen = values.pop("unseen")
    groups = {"unseen-relevant": unseen, "other": ~unseen}
    return {"protocol": protocol, "groups": {
        group: {"queries": int(mask.sum()), **{key: float(v[mask].mean()) for key, v in values.items()}}
        for group, mask in groups.items() if mask.any()}}


def table(results: dict) -> str:
    """One row per collection, seed and group of test queries."""
    lines = ["| collection | seed | test queries | queries | nDCG@10 frozen → adapted | training-relevant share of "
             "the top-10, frozen → adapted |", "|---|---:|---|---:|---|---|"]
    for key, res in results["runs"].items():
        name, seed = key.rsplit(" seed ", 1)
        for group, g in res["groups"].items():
            lines.append(f"| {name} | {seed} | {group} | {g['queries']} | {g['base nDCG@10']:.4f} → "
                         f"{g['adapted nDCG@10']:.4f} | {g['base share']:.3f} → {g['adapted share']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["scifact"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    parser.add_argument("--output", type=Path, default=HERE / "results" / "document-prior.json")
    args = parser.parse_args()
    results = {"date": date.today().isoformat(), "top": TOP, "runs": {}}
    for name in args.datasets:
        for seed in args.seeds:
            results["runs"][f"{name} seed {seed}"] = run_dataset(name, seed)
            atomic_write_json(args.output, results)  # after each run: partial results survive
    print(table(results))


if __name__ == "__main__":
    main()
