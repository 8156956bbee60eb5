"""One protocol over every collection: the default recipe against the re-rankers a user would pick instead.

Usage (from the repository root, after the README's install command):
    python benchmarks/all_collections.py                      # all eight collections of ../shared/datasets
    python benchmarks/all_collections.py --datasets cisi cacm

Per collection: the official train / validation (dev, else 15 % carved from train) / test splits where a train split
exists, else 5-fold cross-validation over its queries (validation carved from the training folds; the union of the
test folds is reported). Every system re-ranks the same frozen top-100 (`--set candidates=200`: top-200)
and is tuned on the same non-test queries:
* `Rocchio`: non-learned feedback, beta and m tuned on the training and validation queries (benchmarks/baselines.py);
* `linear adapter`: q' = W q (LlamaIndex / OpenAI cookbook), learning rate and epoch chosen on validation;
* `default recipe`: `imrnn.workflow.train` with the default `TrainConfig`, exactly what `imrnn run` does; the other
  rows (`VARIANTS`) are the same call with one design choice changed, and the earlier defaults.
The decision rules (Rocchio start, gate rule, acceptance test) are also judged without test data, by 2-fold
cross-validation inside each validation set (`nested_validation`); that table and the validation columns are what
the recipe was chosen on (README "How the default recipe was chosen"); test columns are reported, never used to
choose. `--held-out` also scores the recipe on validation queries it never selected on (`held_out_validation`: it
decides on one half of each validation set, is scored on the other): the figure candidate recipes are compared by.
`--set loss=listwise` (any TrainConfig or IMRNNConfig field) runs a candidate recipe instead of the default.
Writes benchmarks/results/collections.json (after each collection) and prints markdown tables for RESULTS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from datetime import date
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from baselines import linear_adapter, rocchio
from imrnn.candidates import RankingSet
from imrnn.config import GATE_RULES, EncoderConfig, IMRNNConfig, TrainConfig
from imrnn.data import load_dataset
from imrnn.evaluate import Run, clearly_better, evaluate_run, evaluated_queries, hits_to_run, per_query
from imrnn.model import IMRNN
from imrnn.scoring import score_candidates, sort_by_score
from imrnn.train import GATE_THRESHOLDS, validation_ndcg, validation_values
from imrnn.workflow import Comparison, SplitPlan, Workspace, train

HERE = Path(__file__).resolve().parent
DATA_DIR = os.environ.get("IMRNN_DATA_DIR", str(HERE.parent.parent / "shared" / "datasets"))
COLLECTIONS = ("scifact", "nfcorpus", "cranfield", "cisi", "npl", "cacm", "lisa", "med")
DEFAULT_NAME = "default recipe"


def plans_for(name: str, seed: int, validation_fraction: float) -> tuple[list[SplitPlan], str]:
    """The official splits where the collection has a train split, else 5-fold cross-validation over its queries."""
    data = load_dataset(name, DATA_DIR, None, download=False)
    if "train" in data.splits:
        return [SplitPlan.official(data, seed=seed)], "official splits"
    return SplitPlan.kfold(data.split("test"), 5, validation_fraction, seed=seed), "5-fold CV"


def adapted_run(workspace: Workspace, model: IMRNN, data: RankingSet) -> Run:
    order, scores = sort_by_score(data.candidates, score_candidates(model, data.query_embs, workspace.doc_embs, data.candidates))
    return hits_to_run(data.query_ids, workspace.dataset.corpus.ids, order, scores)


_DEFAULT = TrainConfig()


def _switch(field: str, label: str) -> tuple[str, dict]:
    """A variant that flips one boolean design choice of the default recipe, named for what it does."""
    on = getattr(_DEFAULT, field)
    return f"{'without' if on else 'with'} {label}", {field: not on}


ONE_ADAPTER = {"validation_folds": 1}  # the gate and the acceptance test need validation queries no adapter trained on
POOLED = {"choose_query_balanced": False}  # the pooled margin loss alone, as every default before this round's
VARIANTS: dict[str, dict] = dict([  # TrainConfig changes from the recipe under test: its ablations and earlier defaults
    (DEFAULT_NAME, {}),
    ("previous default", POOLED),
    ("without weight averaging", {"ema_half_life": 0.0}),
    ("with in-sample feedback rule", {"feedback_rule": "in-sample"}),
    _switch("feedback", "Rocchio start"),
    ("with novelty gate (abstain rule)", {**ONE_ADAPTER, "novelty_gate": True}),
    ("with acceptance test", {**ONE_ADAPTER, "keep_only_if_better": True}),
    ("without few-query fallback", {"min_queries": 0}),
    ("one-adapter default", {**ONE_ADAPTER, **POOLED}),
    ("earlier default", {**ONE_ADAPTER, **POOLED, "plateau_average": False}),
    ("the default before it", {**ONE_ADAPTER, **POOLED, "ema_half_life": 0.0, "feedback_rule": "in-sample",
                               "plateau_average": False}),
    ("first default", {**ONE_ADAPTER, **POOLED, "feedback": False, "novelty_gate": True, "gate_rule": "one-standard-error",
                       "keep_only_if_better": False, "min_queries": 0, "ema_half_life": 0.0, "feedback_rule": "in-sample",
                       "plateau_average": False}),
])


def recipe_variants(workspace: Workspace, plan: SplitPlan, recipe: TrainConfig, model: IMRNNConfig,
                    variants: Sequence[str]) -> dict[str, tuple[Run, float, float]]:
    """{variant: (test run, validation nDCG@10 of the final model, train seconds)}: `imrnn.workflow.train` with the
    recipe (exactly what `imrnn run` does with it) and with each change in `VARIANTS`."""
    validation, test = workspace.ranking(plan.validation), workspace.ranking(plan.test)
    out: dict[str, tuple[Run, float, float]] = {}
    for name in variants:
        fit = train(workspace, plan, dataclasses.replace(recipe, **VARIANTS[name]), model, progress=False)
        value = validation_ndcg(fit.model, validation, workspace.doc_embs, workspace.dataset.corpus.ids)
        out[name] = (adapted_run(workspace, fit.model, test), value, fit.seconds)
    return out


GATE_CHOICES = ("none", *GATE_RULES)  # no gate at all, then each of the library's rules


def option_values(workspace: Workspace, plan: SplitPlan, config: TrainConfig, model: IMRNNConfig) -> dict[str, np.ndarray]:
    """Per-query validation nDCG@10 of every model a decision rule can end with, for one training under `config`:
    the untrained starting point, the trained adapter, and the trained adapter behind each novelty-gate threshold."""
    validation, memory = workspace.ranking(plan.validation), workspace.ranking(plan.train).query_embs
    fit = train(workspace, plan, dataclasses.replace(config, **ONE_ADAPTER, novelty_gate=False, keep_only_if_better=False,
                                                     min_queries=0),
                model, progress=False)

    def values(model: IMRNN) -> np.ndarray:
        return validation_values(model, validation, workspace.doc_embs, workspace.dataset.corpus.ids)

    out = {"start": values(IMRNN(fit.model.config).eval()), "none": values(fit.model)}
    for threshold in GATE_THRESHOLDS:
        out[str(threshold)] = values(fit.model.with_gate(torch.from_numpy(np.asarray(memory, np.float32)), threshold))
    return out


def decide(values: dict[str, np.ndarray], rows: np.ndarray, gate_rule: str, keep_only_if_better: bool) -> str:
    """The option `train` ends with when it decides on the validation queries `rows` (mirrors `calibrate_gate` and
    `keep_if_clearly_better`): the gate by `gate_rule`, then the starting point unless the result is clearly better."""
    trained = [name for name in values if name != "start"]  # "none" first, then the thresholds, least conservative first
    sub = {name: values[name][rows] for name in values}
    best = max(trained, key=lambda name: sub[name].mean())
    chosen = "none"
    if gate_rule == "best":
        chosen = best
    elif gate_rule == "abstain" and best != "none" and clearly_better(sub[best], sub["none"]):
        chosen = best
    elif gate_rule == "one-standard-error":
        chosen = best
        for name in trained:
            if not clearly_better(sub[best], sub[name]):
                chosen = name
    if keep_only_if_better and not clearly_better(sub[chosen], sub["start"]):
        return "start"
    return chosen


def nested_validation(workspace: Workspace, plan: SplitPlan, recipe: TrainConfig, model: IMRNNConfig) -> dict[str, float]:
    """Each decision rule judged without test data: the validation queries are split in two seeded halves, the rule
    decides on one half and is scored on the other, both ways (2-fold cross-validation inside validation).
    Keys: "feedback|gate rule|acceptance" (feedback on or off at the start of training)."""
    out: dict[str, float] = {}
    for feedback in (True, False):
        values = option_values(workspace, plan, dataclasses.replace(recipe, feedback=feedback), model)
        order = np.random.default_rng(recipe.seed).permutation(len(values["start"]))
        halves = (order[: len(order) // 2], order[len(order) // 2 :])
        for rule in GATE_CHOICES:
            for accept in (False, True):
                scored = [values[decide(values, mine, rule, accept)][other] for mine, other in (halves, halves[::-1])]
                out[f"{'feedback' if feedback else 'no feedback'}|gate {rule}|{'accept test' if accept else 'always keep'}"] = \
                    float(np.concatenate(scored).mean())
    out["base"] = float(values["start"].mean())  # the last training started from the frozen retriever
    return out


def held_out_plans(plan: SplitPlan, seed: int) -> list[SplitPlan]:
    """The validation queries dealt into two seeded halves, as two plans: each selects on one half (its
    `validation`) and is scored on the other (its `test`); the first half's plan comes first."""
    ids = list(plan.validation.ids)
    order = np.random.default_rng(seed).permutation(len(ids))
    halves = [plan.validation.subset([ids[i] for i in part]) for part in (order[: len(ids) // 2], order[len(ids) // 2 :])]
    return [SplitPlan(plan.train, selecting, scoring, {**plan.train.qrels, **selecting.qrels})
            for selecting, scoring in (halves, halves[::-1])]


def held_out_validation(workspace: Workspace, plan: SplitPlan, recipe: TrainConfig, model: IMRNNConfig) -> dict[str, np.ndarray]:
    """The recipe judged on validation queries it never saw: validation is split in two seeded halves, the recipe
    (feedback tuning, early stopping, every decision) uses one half and is scored on the other, both ways.

    Unlike the validation column, nothing is selected on the queries that score it, so recipes that search more
    (more epochs, more patience) get no credit for the search itself. Per-query nDCG@10 over all validation queries:
    {"base", "recipe", "unseen"} ("unseen": a 0/1 mask of the queries none of whose relevant documents is relevant
    to a training or other-half query), and "query_ids" (a query is scored once per split whose validation holds it)."""
    out: dict[str, list[np.ndarray]] = {"base": [], "recipe": [], "unseen": [], "query_ids": []}
    for half_plan in held_out_plans(plan, recipe.seed):
        scoring = half_plan.test
        fit = train(workspace, half_plan, recipe, model, progress=False)
        data = workspace.ranking(scoring)
        out["recipe"].append(validation_values(fit.model, data, workspace.doc_embs, workspace.dataset.corpus.ids))
        frozen = hits_to_run(data.query_ids, workspace.dataset.corpus.ids, data.candidates, workspace.frozen_scores(data))
        out["base"].append(per_query(frozen, data.qrels, ["nDCG@10"])["nDCG@10"])
        unseen, judged = set(half_plan.unseen_relevant(scoring)), evaluated_queries(scoring.qrels)
        out["unseen"].append(np.array([q in unseen for q in judged], dtype=float))
        out["query_ids"].append(np.array(judged, dtype=str))
    return {key: np.concatenate(parts) for key, parts in out.items()}


def weighted_mean(pairs: Sequence[tuple[float, int]]) -> float:
    """The mean over folds of (value, queries) pairs, weighted by queries: the mean over all their queries."""
    values, weights = zip(*pairs)
    return float(np.average(values, weights=weights))


def run_collection(name: str, recipe: TrainConfig, model: IMRNNConfig, variants: Sequence[str], nested: bool,
                   baselines: bool, held_out: bool = False) -> dict:
    """Every system on one collection: per-system union comparison vs base, validation means, seconds."""
    plans, protocol = plans_for(name, recipe.seed, recipe.validation_fraction)
    workspace = Workspace.open(load_dataset(name, DATA_DIR, None, download=False), EncoderConfig(precision="fp32"),
                               k=recipe.candidates, progress=False)
    runs: dict[str, Run] = {"base": {}}
    validation: dict[str, list[tuple[float, int]]] = {"base": []}
    seconds: dict[str, float] = {}
    choices: list[dict] = []
    qrels, unseen = {}, []
    decisions: dict[str, list[tuple[float, int]]] = {}
    held: dict[str, list[np.ndarray]] = {}
    for plan in plans:
        val_data, test_data = workspace.ranking(plan.validation), workspace.ranking(plan.test)
        n_val = len(val_data.query_ids)
        runs["base"].update(hits_to_run(test_data.query_ids, workspace.dataset.corpus.ids, test_data.candidates,
                                        workspace.frozen_scores(test_data)))
        base_val = hits_to_run(val_data.query_ids, workspace.dataset.corpus.ids, val_data.candidates, workspace.frozen_scores(val_data))
        validation["base"].append((evaluate_run(base_val, val_data.qrels, ["nDCG@10"])["nDCG@10"], n_val))
        qrels.update(plan.test.qrels)
        unseen += plan.unseen_relevant(plan.test)
        systems: dict[str, tuple[Run, float, float]] = {}
        if baselines:
            start = time.perf_counter()
            run, report = rocchio(workspace, plan)
            systems["Rocchio"] = (run, report["validation_nDCG@10"], time.perf_counter() - start)
            start = time.perf_counter()
            run, linear = linear_adapter(workspace, plan, seed=recipe.seed)
            systems["linear adapter"] = (run, linear["validation_nDCG@10"], time.perf_counter() - start)
            choices.append({"rocchio": {k: report[k] for k in ("beta", "m")},
                            "linear": {k: linear[k] for k in ("lr", "best_epoch")}})
        systems.update(recipe_variants(workspace, plan, recipe, model, variants))
        if held_out:
            for key, values in held_out_validation(workspace, plan, recipe, model).items():
                held.setdefault(key, []).append(values)
        if nested:
            for key, value in nested_validation(workspace, plan, recipe, model).items():
                decisions.setdefault(key, []).append((value, n_val))
        for system, (run, value, secs) in systems.items():
            runs.setdefault(system, {}).update(run)
            validation.setdefault(system, []).append((value, n_val))
            seconds[system] = seconds.get(system, 0.0) + secs
    out = {"protocol": protocol, "queries": len(qrels), "folds": choices, "systems": {},
           "nested_validation": {key: weighted_mean(pairs) for key, pairs in decisions.items()}}
    if held:
        pooled = {key: np.concatenate(parts) for key, parts in held.items()}
        novel = pooled["unseen"] > 0
        out["held_out_validation"] = {"queries": len(novel), "base": float(pooled["base"].mean()),
                                      "recipe": float(pooled["recipe"].mean()), "unseen_queries": int(novel.sum()),
                                      "unseen_base": float(pooled["base"][novel].mean()) if novel.any() else None,
                                      "unseen_recipe": float(pooled["recipe"][novel].mean()) if novel.any() else None,
                                      "per_query": {key: pooled[key].tolist() for key in ("query_ids", "base", "recipe")}}
    for system, run in runs.items():
        overall = Comparison.of_runs(runs["base"], run, qrels)
        subset = {q: qrels[q] for q in unseen}
        unseen_cmp = Comparison.of_runs(runs["base"], run, subset) if subset else None
        out["systems"][system] = {
            "test": dataclasses.asdict(overall),
            "unseen_relevant": None if unseen_cmp is None else {"queries": unseen_cmp.queries, "base": unseen_cmp.base["nDCG@10"],
                                                                "adapted": unseen_cmp.adapted["nDCG@10"]},
            "validation_nDCG@10": weighted_mean(validation[system]),
            "train_seconds": round(seconds.get(system, 0.0), 1),
        }
    return out


def relative(system: dict, base: float) -> float:
    return system["test"]["adapted"]["nDCG@10"] / base - 1.0


def tables(results: dict) -> str:
    """The per-collection table and the summary over collections, as markdown."""
    lines = ["| collection (protocol, queries) | system | validation nDCG@10 | test nDCG@10 | rel. gain | paired t p "
             "| improved/worsened | unseen-relevant (queries) | train s |", "|---|---|---:|---:|---:|---:|---:|---|---:|"]
    systems = next(iter(results["collections"].values()))["systems"]
    shown = ["base", *(name for name in systems if name != "base")]  # the collection's label goes on its first row
    for name, res in results["collections"].items():
        base = res["systems"]["base"]["test"]["adapted"]["nDCG@10"]
        for system in shown:
            s = res["systems"][system]
            t, u = s["test"], s["unseen_relevant"]
            unseen = "–" if u is None else f"{u['adapted']:.4f} ({u['queries']})"
            p = "–" if system == "base" else f"{t['p_value']['nDCG@10']:.1e}"
            wl = "–" if system == "base" else f"{t['improved']}/{t['worsened']}"
            label = f"{name} ({res['protocol']}, {res['queries']})" if system == "base" else ""
            lines.append(f"| {label} | {system} | {s['validation_nDCG@10']:.4f} | {t['adapted']['nDCG@10']:.4f} | "
                         f"{relative(s, base):+.1%} | {p} | {wl} | {unseen} | {s['train_seconds']:.0f} |")
    lines += ["", "| system | mean rel. gain (test) | median | collections beaten by the default recipe "
              "| mean rel. gain (validation) |", "|---|---:|---:|---:|---:|"]
    names = list(results["collections"])
    systems = list(next(iter(results["collections"].values()))["systems"])
    for system in (systems if DEFAULT_NAME in systems else []):  # the summary compares every system with the recipe
        gains = [relative(results["collections"][n]["systems"][system], results["collections"][n]["systems"]["base"]["test"]["adapted"]["nDCG@10"])
                 for n in names]
        val = [results["collections"][n]["systems"][system]["validation_nDCG@10"] / results["collections"][n]["systems"]["base"]["validation_nDCG@10"] - 1
               for n in names]
        beaten = sum(results["collections"][n]["systems"][DEFAULT_NAME]["test"]["adapted"]["nDCG@10"]
                     > results["collections"][n]["systems"][system]["test"]["adapted"]["nDCG@10"] + 1e-9 for n in names)
        lines.append(f"| {system} | {np.mean(gains):+.1%} | {np.median(gains):+.1%} | {beaten}/{len(names)} | {np.mean(val):+.1%} |")
    held = {n: res["held_out_validation"] for n, res in results["collections"].items() if "held_out_validation" in res}
    if held:
        gains = {n: h["recipe"] / h["base"] - 1.0 for n, h in held.items()}
        lines += ["", "The recipe on held-out validation halves (chosen on one half, scored on the other): nDCG@10, "
                  "relative gain; unseen-relevant validation queries in brackets.", "",
                  "| collection | queries | base | recipe | rel. gain | unseen-relevant base → recipe (queries) |",
                  "|---|---:|---:|---:|---:|---|"]
        for n, h in held.items():
            unseen = "–" if h["unseen_base"] is None else f"{h['unseen_base']:.4f} → {h['unseen_recipe']:.4f} ({h['unseen_queries']})"
            lines.append(f"| {n} | {h['queries']} | {h['base']:.4f} | {h['recipe']:.4f} | {gains[n]:+.2%} | {unseen} |")
        lines.append(f"| mean | | | | {np.mean(list(gains.values())):+.2%} | |")
    decisions = [res.get("nested_validation", {}) for res in results["collections"].values()]
    if all(decisions):
        lines += ["", "Decision rules judged by 2-fold cross-validation inside each validation set (no test data): mean "
                  "relative nDCG@10 gain over the frozen retriever across collections, and per collection.", "",
                  "| feedback | gate rule | trained adapter | mean | " + " | ".join(names) + " |",
                  "|---|---|---|---:|" + "---:|" * len(names)]
        for key in (k for k in decisions[0] if k != "base"):
            gains = [d[key] / d["base"] - 1.0 for d in decisions]
            lines.append("| " + " | ".join(key.split("|")) + f" | {np.mean(gains):+.2%} | "
                         + " | ".join(f"{g:+.1%}" for g in gains) + " |")
    return "\n".join(lines)


def parse_setting(item: str) -> tuple[str, object]:
    """`field=value` with value read as JSON where it parses (numbers, true/false), else as a string."""
    name, _, value = item.partition("=")
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(COLLECTIONS))
    parser.add_argument("--output", type=Path, default=HERE / "results" / "collections.json")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS),
                        help="which recipe variants to train (default: all)")
    parser.add_argument("--no-nested", action="store_true", help="skip judging the decision rules by 2-fold "
                        "cross-validation inside validation (two extra trainings per split)")
    parser.add_argument("--no-baselines", action="store_true", help="skip Rocchio and the linear adapter")
    parser.add_argument("--held-out", action="store_true", help="also judge the recipe on held-out validation halves "
                        "(two extra trainings per split; for comparing candidate recipes without test data)")
    parser.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE",
                        help="train a candidate recipe instead of the default (TrainConfig or IMRNNConfig fields, e.g. "
                             "loss=listwise lr=3e-3 hidden_dim=256); "
                             "for choosing the default on validation")
    args = parser.parse_args()
    settings = dict(parse_setting(item) for item in args.set)
    model_fields = {f.name for f in dataclasses.fields(IMRNNConfig)}
    recipe = TrainConfig.from_dict({**TrainConfig().to_dict(), **{k: v for k, v in settings.items() if k not in model_fields}})
    model = IMRNNConfig.from_dict({**IMRNNConfig().to_dict(), **{k: v for k, v in settings.items() if k in model_fields}})
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    results = {"date": date.today().isoformat(), "recipe": recipe.to_dict(), "model": model.to_dict(), "collections": {}}
    for name in args.datasets:
        started = time.perf_counter()
        results["collections"][name] = run_collection(name, recipe, model, args.variants, not args.no_nested,
                                                      not args.no_baselines, args.held_out)
        print(f"{name}: {time.perf_counter() - started:.0f}s", flush=True)
        args.output.parent.mkdir(exist_ok=True)
        args.output.write_text(json.dumps(results, indent=2, default=float))  # after each collection: partial results survive
    print(tables(results))


if __name__ == "__main__":
    main()
