"""A candidate judged on held-out validation halves: blending the adapter's scores with the frozen retriever's.

Usage (from the repository root, after the README's install command):
    python benchmarks/frozen_blend.py                         # the six collections where the recipe trains
    python benchmarks/frozen_blend.py --datasets scifact npl
    python benchmarks/frozen_blend.py --seed 43 --output benchmarks/results/frozen-blend-seed43.json

The candidate: score = (1 - alpha) * adapted cosine + alpha * frozen cosine, alpha in {0, 0.25, 0.5, 0.75} chosen
per collection (per fold) on validation data. It is judged without test data, by the protocol of
`all_collections.py --held-out`: each validation set is dealt into two seeded halves; the default recipe trains and
early-stops on one half, alpha is chosen there too, and both are scored on the other half, both ways. The
"unseen-relevant" columns keep the validation queries none of whose relevant documents is relevant to a training or
other-half query: the subset where issue #12 asks the adapter to gain, and where a blend towards the frozen
retriever could help. LISA and MED are left out by default: with under 30 judged queries per fold nothing is trained.
Writes `--output` (benchmarks/results/frozen-blend.json) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import time
from datetime import date
from pathlib import Path

import numpy as np

from all_collections import DATA_DIR, held_out_plans, plans_for
from imrnn.config import EncoderConfig, IMRNNConfig, TrainConfig
from imrnn.data import QuerySet, load_dataset
from imrnn.evaluate import evaluated_queries, hits_to_run, per_query
from imrnn.files import atomic_write_json
from imrnn.model import IMRNN
from imrnn.scoring import score_candidates
from imrnn.workflow import Workspace, train

HERE = Path(__file__).resolve().parent
ALPHAS = (0.0, 0.25, 0.5, 0.75)
TRAINED = ("scifact", "nfcorpus", "cranfield", "cisi", "npl", "cacm")


def blended_values(workspace: Workspace, model: IMRNN, queries: QuerySet) -> dict[float | str, np.ndarray]:
    """Per-query nDCG@10 of every blend weight alpha on `queries` (alpha 0 = the adapter alone), and of "base"."""
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
    return values


def run_collection(name: str, recipe: TrainConfig, model: IMRNNConfig) -> dict:
    """Held-out figures of the recipe, of each fixed alpha and of alpha chosen on the selecting half."""
    plans, protocol = plans_for(name, recipe.seed, recipe.validation_fraction)
    workspace = Workspace.open(load_dataset(name, DATA_DIR, None, download=False), EncoderConfig(precision="fp32"),
                               k=100, progress=False)
    pooled: dict[str, list[np.ndarray]] = {}
    chosen_alphas = []
    for plan in plans:
        for half_plan in held_out_plans(plan, recipe.seed):
            fit = train(workspace, half_plan, recipe, model, progress=False)
            selecting = blended_values(workspace, fit.model, half_plan.validation)
            scoring = blended_values(workspace, fit.model, half_plan.test)
            alpha = max(ALPHAS, key=lambda a: selecting[a].mean())  # ties go to the smaller alpha
            chosen_alphas.append(alpha)
            unseen = set(half_plan.unseen_relevant(half_plan.test))
            rows = {"base": scoring["base"], "chosen": scoring[alpha], **{f"alpha {a}": scoring[a] for a in ALPHAS},
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
    lines = ["| collection | held-out queries | base | recipe (alpha 0) | alpha chosen on validation | change | alphas chosen "
             "| unseen-relevant: base → recipe → chosen (queries) |", "|---|---:|---:|---:|---:|---:|---|---|"]
    for name, res in results["collections"].items():
        held, unseen = res["held_out"], res["unseen"]
        lines.append(f"| {name} | {res['queries']} | {held['base']:.4f} | {held['alpha 0.0']:.4f} | {held['chosen']:.4f} | "
                     f"{held['chosen'] - held['alpha 0.0']:+.4f} | {', '.join(str(a) for a in res['chosen_alphas'])} | "
                     + (f"{unseen['base']:.4f} → {unseen['alpha 0.0']:.4f} → {unseen['chosen']:.4f} ({res['unseen_queries']})"
                        if unseen else "–") + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(TRAINED))
    parser.add_argument("--seed", type=int, default=42, help="every seed: training, carve-outs, folds and halves")
    parser.add_argument("--output", type=Path, default=HERE / "results" / "frozen-blend.json")
    args = parser.parse_args()
    recipe, model = TrainConfig(seed=args.seed), IMRNNConfig()
    results = {"date": date.today().isoformat(), "alphas": list(ALPHAS), "recipe": recipe.to_dict(), "collections": {}}
    for name in args.datasets:
        started = time.perf_counter()
        results["collections"][name] = run_collection(name, recipe, model)
        print(f"{name}: {time.perf_counter() - started:.0f}s", flush=True)
        atomic_write_json(args.output, results)  # after each collection: partial results survive
    print(table(results))


if __name__ == "__main__":
    main()
