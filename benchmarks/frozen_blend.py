"""Candidates judged on held-out validation halves: blending the adapter's scores with the frozen retriever's.

Usage (from the repository root, after the README's install command):
    python benchmarks/frozen_blend.py                         # the six collections where the recipe trains
    python benchmarks/frozen_blend.py --datasets scifact npl
    python benchmarks/frozen_blend.py --seed 43 --output benchmarks/results/frozen-blend-seed43.json

Two families of candidates, both aimed at the queries whose relevant documents training never saw:
* a fixed blend, score = (1 - alpha) * adapted cosine + alpha * frozen cosine, alpha in {0, 0.25, 0.5, 0.75}, each
  fixed and one chosen per collection (per fold) on validation data;
* a per-query novelty gate, score = g * adapted + (1 - g) * frozen with g = sigmoid((cosine of the nearest training
  query - t) / 0.05) (`imrnn.scoring.novelty_gate`, the `--novelty-gate` of the CLI), with t fixed for every
  collection, either a cosine or a quantile of the selecting half's own nearest-training-query cosines (so a query
  less like the training queries than that share of validation queries leans towards the frozen retriever). One
  threshold for all collections, so no per-collection choice on a handful of queries is involved.

They are judged without test data, by the protocol of `all_collections.py --held-out`: each validation set is dealt
into two seeded halves; the default recipe trains and early-stops on one half, alpha and the quantile thresholds are
set there too, and everything is scored on the other half, both ways. The "unseen-relevant" figures keep the
validation queries none of whose relevant documents is relevant to a training or other-half query: the subset where
issue #12 asks the adapter to gain. LISA and MED are left out by default: with under 30 judged queries per fold
nothing is trained. Writes `--output` (benchmarks/results/frozen-blend.json) and prints two markdown tables.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Mapping
from datetime import date
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from all_collections import DATA_DIR, held_out_plans, plans_for
from imrnn.config import EncoderConfig, IMRNNConfig, TrainConfig
from imrnn.data import QuerySet, load_dataset
from imrnn.evaluate import evaluated_queries, hits_to_run, per_query
from imrnn.files import atomic_write_json
from imrnn.model import IMRNN
from imrnn.scoring import blend, nearest_similarity, novelty_gate, score_candidates
from imrnn.workflow import SplitPlan, Workspace, train

HERE = Path(__file__).resolve().parent
ALPHAS = (0.0, 0.25, 0.5, 0.75)
GATE_COSINES = (0.5, 0.6, 0.7, 0.8)
GATE_QUANTILES = (0.1, 0.25, 0.5)
GATE_WIDTH = IMRNNConfig().gate_width
TRAINED = ("scifact", "nfcorpus", "cranfield", "cisi", "npl", "cacm")


def training_memory(workspace: Workspace, plan: SplitPlan) -> torch.Tensor:
    """Unit-length embeddings of the plan's training queries: what the novelty gate compares each query with."""
    return F.normalize(torch.from_numpy(np.asarray(workspace.ranking(plan.train).query_embs, np.float32)), dim=-1)


def nearest_training_similarity(query_embs: np.ndarray, memory: torch.Tensor) -> torch.Tensor:
    """Each query's cosine with its nearest training query (`memory`: from `training_memory`)."""
    return nearest_similarity(torch.from_numpy(np.asarray(query_embs, np.float32)), memory)


def blended_values(workspace: Workspace, model: IMRNN, queries: QuerySet, memory: torch.Tensor | None = None,
                   gates: Mapping[str, float] | None = None) -> dict[float | str, np.ndarray]:
    """Per-query nDCG@10 on `queries` of every blend weight alpha (alpha 0 = the adapter alone), of "base", and of
    each novelty gate in `gates` (name -> threshold) over the training query embeddings `memory`."""
    data = workspace.ranking(queries)
    doc_ids = workspace.dataset.corpus.ids
    adapted = score_candidates(model, data.query_embs, workspace.doc_embs, data.candidates)
    frozen = workspace.frozen_scores(data)

    def ndcg(scores: np.ndarray) -> np.ndarray:
        return per_query(hits_to_run(data.query_ids, doc_ids, data.candidates, scores), data.qrels, ["nDCG@10"])["nDCG@10"]

    padding = ~np.isfinite(adapted)  # -inf in both score arrays; blended, it must stay -inf rather than become NaN
    values: dict[float | str, np.ndarray] = {
        alpha: ndcg(np.where(padding, -np.inf, (1 - alpha) * adapted + alpha * frozen)) for alpha in ALPHAS}
    values["base"] = ndcg(frozen)
    if gates:
        nearest = nearest_training_similarity(data.query_embs, memory)
        pair = torch.from_numpy(np.where(padding, 0.0, adapted)), torch.from_numpy(np.where(padding, 0.0, frozen))
        for name, threshold in gates.items():
            gated = blend(novelty_gate(nearest, threshold, GATE_WIDTH), *pair).numpy()
            values[name] = ndcg(np.where(padding, -np.inf, gated))
    return values


def gate_thresholds(workspace: Workspace, plan: SplitPlan, memory: torch.Tensor) -> dict[str, float]:
    """The fixed cosine thresholds, and those at quantiles of the plan's validation queries' nearest-training cosines."""
    nearest = nearest_training_similarity(workspace.ranking(plan.validation).query_embs, memory).numpy()
    return ({f"gate {cosine}": cosine for cosine in GATE_COSINES}
            | {f"gate q{q}": float(np.quantile(nearest, q)) for q in GATE_QUANTILES})


def run_collection(name: str, recipe: TrainConfig, model: IMRNNConfig) -> dict:
    """Held-out figures of the recipe, of each fixed alpha, of alpha chosen on the selecting half, and of each gate."""
    plans, protocol = plans_for(name, recipe.seed, recipe.validation_fraction)
    workspace = Workspace.open(load_dataset(name, DATA_DIR, None, download=False), EncoderConfig(precision="fp32"),
                               k=100, progress=False)
    pooled: dict[str, list[np.ndarray]] = {}
    chosen_alphas = []
    for plan in plans:
        for half_plan in held_out_plans(plan, recipe.seed):
            fit = train(workspace, half_plan, recipe, model, progress=False)
            memory = training_memory(workspace, half_plan)
            gates = gate_thresholds(workspace, half_plan, memory)
            selecting = blended_values(workspace, fit.model, half_plan.validation)
            scoring = blended_values(workspace, fit.model, half_plan.test, memory, gates)
            alpha = max(ALPHAS, key=lambda a: selecting[a].mean())  # ties go to the smaller alpha
            chosen_alphas.append(alpha)
            unseen = set(half_plan.unseen_relevant(half_plan.test))
            rows = {"base": scoring["base"], "chosen": scoring[alpha], **{f"alpha {a}": scoring[a] for a in ALPHAS},
                    **{name: scoring[name] for name in gates},
                    "unseen": np.array([q in unseen for q in evaluated_queries(half_plan.test.qrels)])}
            for key, value in rows.items():
                pooled.setdefault(key, []).append(value)
    values = {key: np.concatenate(parts) for key, parts in pooled.items()}
    unseen = values.pop("unseen")
    return {"protocol": protocol, "queries": len(unseen), "chosen_alphas": chosen_alphas,
            "held_out": {key: float(v.mean()) for key, v in values.items()},
            "unseen_queries": int(unseen.sum()),
            "unseen": {key: float(v[unseen].mean()) for key, v in values.items()} if unseen.any() else None}


def table(results: dict) -> str:
    """Per collection: the recipe against alpha chosen on validation, and the alphas each half chose."""
    lines = ["| collection | held-out queries | base | recipe (alpha 0) | alpha chosen on validation | change | alphas chosen "
             "| unseen-relevant: base → recipe → chosen (queries) |", "|---|---:|---:|---:|---:|---:|---|---|"]
    for name, res in results["collections"].items():
        held, unseen = res["held_out"], res["unseen"]
        lines.append(f"| {name} | {res['queries']} | {held['base']:.4f} | {held['alpha 0.0']:.4f} | {held['chosen']:.4f} | "
                     f"{held['chosen'] - held['alpha 0.0']:+.4f} | {', '.join(str(a) for a in res['chosen_alphas'])} | "
                     + (f"{unseen['base']:.4f} → {unseen['alpha 0.0']:.4f} → {unseen['chosen']:.4f} ({res['unseen_queries']})"
                        if unseen else "–") + " |")
    return "\n".join(lines)


def candidates_table(results: dict) -> str:
    """Every candidate's mean relative held-out gain over the frozen retriever, per collection, and on SciFact's
    unseen-relevant held-out queries (where there are any)."""
    collections = results["collections"]
    names = [key for key in next(iter(collections.values()))["held_out"] if key != "base"]
    lines = ["| candidate | mean rel. gain | " + " | ".join(collections) + " | scifact unseen-relevant |",
             "|---|---:|" + "---:|" * len(collections) + "---:|"]
    scifact_unseen = (collections.get("scifact") or {}).get("unseen")
    for name in names:
        gains = [res["held_out"][name] / res["held_out"]["base"] - 1 for res in collections.values()]
        unseen = f"{scifact_unseen[name]:.4f}" if scifact_unseen else "–"
        lines.append(f"| {name} | {100 * np.mean(gains):+.2f} % | " + " | ".join(f"{100 * g:+.1f} %" for g in gains)
                     + f" | {unseen} |")
    if scifact_unseen:
        lines.append("| base | | " + " | ".join("" for _ in collections) + f" | {scifact_unseen['base']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(TRAINED))
    parser.add_argument("--seed", type=int, default=42, help="every seed: training, carve-outs, folds and halves")
    parser.add_argument("--output", type=Path, default=HERE / "results" / "frozen-blend.json")
    args = parser.parse_args()
    recipe, model = TrainConfig(seed=args.seed), IMRNNConfig()
    results = {"date": date.today().isoformat(), "alphas": list(ALPHAS), "gate_cosines": list(GATE_COSINES),
               "gate_quantiles": list(GATE_QUANTILES), "gate_width": GATE_WIDTH, "recipe": recipe.to_dict(), "collections": {}}
    for name in args.datasets:
        started = time.perf_counter()
        results["collections"][name] = run_collection(name, recipe, model)
        print(f"{name}: {time.perf_counter() - started:.0f}s", flush=True)
        atomic_write_json(args.output, results)  # after each collection: partial results survive
    print(table(results))
    print()
    print(candidates_table(results))


if __name__ == "__main__":
    main()
