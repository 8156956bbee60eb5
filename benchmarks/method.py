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

from imrnn.config import EncoderConfig, IMRNNConfig, TrainConfig
from imrnn.data import load_dataset
from baselines import rocchio
from imrnn.evaluate import hits_to_run
from imrnn.workflow import Comparison, SplitPlan, Workspace, cross_validate, evaluate, train

HERE = Path(__file__).resolve().parent
DATA_DIR = os.environ.get("IMRNN_DATA_DIR", str(HERE.parent.parent / "shared" / "datasets"))
MEASURES = ("nDCG@10", "R@10", "RR@10", "R@100")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def row(label: str, report: dict, seconds: float | None = None) -> str:
    """One table row from a report dict (`EvaluationReport.to_dict()`, or a `Comparison` as a dict)."""
    b, a = report["base"], report["adapted"]
    u = report.get("unseen_relevant")
    if u is None:
        unseen = "n/a"  # not computed for this row (Rocchio)
    else:
        unseen = f"{u['base']['nDCG@10']:.4f} → {u['adapted']['nDCG@10']:.4f} ({u['queries']})" if u["queries"] else "empty"
    cells = [label, str(report["queries"])] + [f"{b[m]:.4f} → {a[m]:.4f}" for m in ("nDCG@10", "R@10", "RR@10")]
    cells += [f"{b['R@100']:.4f}", f"{report['p_value']['nDCG@10']:.1e}", f"{report['improved']}/{report['worsened']}", unseen]
    cells.append("" if seconds is None else f"{seconds:.1f}")
    return "| " + " | ".join(cells) + " |"


HEADER = ("| run | queries | nDCG@10 base → adapted | R@10 | RR@10 | R@100 (ceiling) | paired t p (nDCG@10) | improved/worsened "
          "| unseen-relevant nDCG@10 (queries) | train s |\n|---|---:|---|---|---|---:|---:|---:|---|---:|")


def train_and_report(workspace: Workspace, plan: SplitPlan, model_config: IMRNNConfig, train_config: TrainConfig,
                     ) -> tuple[dict, float, dict]:
    """Train on the plan, evaluate on its test queries: (report dict, training seconds, adapted run)."""
    result = train(workspace, plan, train_config, model_config, progress=False)
    report = evaluate(result.model, workspace, plan)
    out = report.to_dict()
    out["best_epoch"], out["validation_nDCG@10"] = result.best_epoch, result.best_validation
    return out, result.seconds, report.adapted_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42])
    parser.add_argument("--folds", type=int, default=0, help="k-fold cross-validation over the test queries (Cranfield)")
    parser.add_argument("--ablations", action="store_true")
    parser.add_argument("--validation", default="auto")
    parser.add_argument("--precision", default="fp32", help="encoding precision; the recorded figures are fp32 (the "
                        "library's default is auto: bf16 on CPUs with native bf16, see benchmarks/encode_speed.py)")
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    data = load_dataset(args.dataset, DATA_DIR, None, download=False)
    workspace = Workspace.open(data, EncoderConfig(precision=args.precision), k=100)
    lines, results = [HEADER], {"dataset": args.dataset, "date": date.today().isoformat(), "runs": {}}

    if args.folds:  # the library's cross-validation, exactly as `imrnn run --folds K` (no checkpoints written here)
        plans = SplitPlan.kfold(data.split("test"), args.folds, TrainConfig().validation_fraction, seed=42)
        cv = cross_validate(workspace, plans, TrainConfig(seed=42), IMRNNConfig(), progress=False).to_dict()
        for i, fold in enumerate(cv["folds"]):
            lines.append(row(f"fold {i}", fold, fold["train_seconds"]))
        seconds = sum(fold["train_seconds"] for fold in cv["folds"])
        lines.append(row(f"all {args.folds} folds (union of test folds)", cv["union"], seconds))
        results["runs"]["kfold"] = cv["union"]
        results["runs"]["folds"] = cv["folds"]
    else:
        variants: dict[str, tuple[IMRNNConfig, TrainConfig]] = {f"seed {s}": (IMRNNConfig(), TrainConfig(seed=s)) for s in args.seeds}
        if args.ablations:
            full = IMRNNConfig()
            other_loss = "listwise" if TrainConfig().loss == "margin" else "margin"
            pooled = {"choose_query_balanced": False}  # every default before this round's
            variants = {
                "full model (seed 42)": (full, TrainConfig()),
                "without A_q": (dataclasses.replace(full, use_query_adapter=False), TrainConfig()),
                "without A_d": (dataclasses.replace(full, use_doc_adapter=False), TrainConfig()),
                "iterations = 2": (dataclasses.replace(full, iterations=2), TrainConfig()),
                f"other loss ({other_loss})": (full, TrainConfig(loss=other_loss)),
                "without Rocchio start (feedback)": (full, TrainConfig(feedback=False)),
                "with novelty gate (abstain rule)": (full, TrainConfig(novelty_gate=True, validation_folds=1)),
                "without weight averaging": (full, TrainConfig(ema_half_life=0.0)),
                "previous default (the pooled margin loss, not chosen on validation)": (full, TrainConfig(**pooled)),
                "one-adapter default (not a soup of three)": (full, TrainConfig(validation_folds=1, **pooled)),
                "earlier default (best epoch, not the plateau's mean)": (full, TrainConfig(validation_folds=1, plateau_average=False,
                                                                                            **pooled)),
                "the default before it (raw weights, in-sample feedback rule, best epoch)": (full, TrainConfig(
                    validation_folds=1, ema_half_life=0.0, feedback_rule="in-sample", plateau_average=False, **pooled)),
                "first default (no feedback, gate by one SE, raw weights, best epoch)": (full, TrainConfig(
                    validation_folds=1, **pooled, feedback=False, novelty_gate=True, gate_rule="one-standard-error", ema_half_life=0.0,
                    plateau_average=False)),
            }
        for label, (model_config, train_config) in variants.items():
            plan = SplitPlan.official(data, "train", args.validation, "test", train_config.validation_fraction, train_config.seed)
            start_rss = peak_rss_mb()
            report, secs, _ = train_and_report(workspace, plan, model_config, train_config)
            report["peak_rss_mb"] = max(start_rss, peak_rss_mb())
            results["runs"][label] = report
            lines.append(row(label, report, secs))
        if len(args.seeds) > 1 and not args.ablations:
            values = np.array([results["runs"][f"seed {s}"]["adapted"]["nDCG@10"] for s in args.seeds])
            lines.append(f"\nadapted nDCG@10 over seeds {args.seeds}: mean {values.mean():.4f}, std {values.std(ddof=1):.4f}, "
                         f"min {values.min():.4f}, max {values.max():.4f}")
        if args.ablations:
            plan = SplitPlan.official(data, "train", args.validation, "test", TrainConfig().validation_fraction, 42)
            run, choice = rocchio(workspace, plan)
            base = workspace.ranking(plan.test)
            base_run = hits_to_run(base.query_ids, data.corpus.ids, base.candidates, workspace.frozen_scores(base))
            report = {**dataclasses.asdict(Comparison.of_runs(base_run, run, plan.test.qrels)), "beta": choice["beta"], "m": choice["m"]}
            results["runs"]["rocchio"] = report
            lines.append(row(f"Rocchio (beta={report['beta']}, m={report['m']}, non-learned, tuned on train+validation)", report))
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
