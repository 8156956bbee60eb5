"""The eight-collection comparison over several seeds: how much of each system's test gain is one seed's luck.

Usage (from the repository root, after the README's install command):
    python benchmarks/seed_spread.py                          # seeds 42 43 44, all eight collections
    python benchmarks/seed_spread.py --seeds 42 43 --datasets npl cacm
    python benchmarks/seed_spread.py --set validation_folds=1 --output-dir benchmarks/results/one-adapter
    python benchmarks/seed_spread.py --seeds 42 --per-collection  # also the full per-collection table of a seed

Per seed, `all_collections.run_collection` with the default recipe (or the one `--set` makes of it), Rocchio and the
linear adapter, the protocol of `all_collections.py`. A seed sets the folds of the cross-validated collections, the validation carve-out, the
initialisation and the data order; the test queries are the same for every seed (pooled over the folds), so the
frozen retriever's figure is too. Writes `benchmarks/results/collections-seed<S>.json` per seed, after each
collection; a file already there is reused collection by collection (delete it to re-run), so an interrupted run
resumes. Prints, per collection, each system's relative test nDCG@10 gain per seed and its mean, then issue #12's
criteria per seed. Test figures here are reported, never used to choose anything.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from all_collections import COLLECTIONS, DEFAULT_NAME, parse_setting, relative, run_collection
from all_collections import tables as collection_tables
from imrnn.config import IMRNNConfig, TrainConfig
from imrnn.files import atomic_write_json

HERE = Path(__file__).resolve().parent
SYSTEMS = ("Rocchio", "linear adapter", DEFAULT_NAME)
TRUSTED = 50  # issue #12: at least +3 % on every collection with this many judged queries


def seed_file(folder: Path, seed: int) -> Path:
    return folder / f"collections-seed{seed}.json"


def run_seed(seed: int, datasets: Sequence[str], path: Path, settings: dict | None = None) -> dict:
    """`all_collections.py`'s results for one seed (the recipe with `settings`, Rocchio, linear adapter), resumed
    from `path`."""
    recipe = TrainConfig.from_dict({**TrainConfig().to_dict(), **(settings or {}), "seed": seed})
    results = json.loads(path.read_text()) if path.exists() else {"recipe": recipe.to_dict(), "collections": {}}
    if TrainConfig.from_dict(results["recipe"]) != recipe:  # from_dict reads records from before a field existed
        raise SystemExit(f"{path} holds results of another recipe; delete it or pass another --output-dir.")
    for name in datasets:
        if name in results["collections"]:
            continue
        started = time.perf_counter()
        results["collections"][name] = run_collection(name, recipe, IMRNNConfig(), [DEFAULT_NAME], nested=False, baselines=True)
        print(f"seed {seed}, {name}: {time.perf_counter() - started:.0f}s", flush=True)
        atomic_write_json(path, results, default=float)
    return results


def gains(results: dict, name: str, system: str) -> float:
    systems = results["collections"][name]["systems"]
    return relative(systems[system], systems["base"]["test"]["adapted"]["nDCG@10"])


def criteria(results: dict, datasets: Sequence[str]) -> dict[str, object]:
    """Issue #12's test criteria for one seed's results."""
    recipe = {n: gains(results, n, DEFAULT_NAME) for n in datasets}
    test = {n: results["collections"][n]["systems"][DEFAULT_NAME]["test"] for n in datasets}

    def beaten(system: str) -> int:
        return sum(recipe[n] > gains(results, n, system) + 1e-9 for n in datasets)

    return {"mean gain": float(np.mean(list(recipe.values()))),
            "below +3 % with >= 50 queries": [n for n in datasets
                                              if results["collections"][n]["queries"] >= TRUSTED and recipe[n] < 0.03],
            "below base with p < 0.05": [n for n in datasets if recipe[n] < 0 and test[n]["p_value"]["nDCG@10"] < 0.05],
            "beats Rocchio on": beaten("Rocchio"), "beats the linear adapter on": beaten("linear adapter")}


def tables(by_seed: dict[int, dict], datasets: Sequence[str]) -> str:
    """Relative gain per collection and system (one column per seed, then the mean), the mean over collections,
    and issue #12's criteria per seed, as markdown."""
    seeds = list(by_seed)
    head = " | ".join(f"seed {s}" for s in seeds)
    lines = [f"| collection (queries) | frozen nDCG@10 | system | {head} | mean |",
             "|---|---:|---|" + "---:|" * (len(seeds) + 1)]
    for name in datasets:
        first = by_seed[seeds[0]]["collections"][name]
        for i, system in enumerate(SYSTEMS):
            values = [gains(by_seed[s], name, system) for s in seeds]
            label = f"| {name} ({first['queries']}) | {first['systems']['base']['test']['adapted']['nDCG@10']:.4f} |" if i == 0 else "| | |"
            lines.append(f"{label} {system} | " + " | ".join(f"{v:+.1%}" for v in values) + f" | {np.mean(values):+.1%} |")
    for system in SYSTEMS:
        values = [np.mean([gains(by_seed[s], n, system) for n in datasets]) for s in seeds]
        lines.append(f"| **mean of {len(datasets)}** | | {system} | " + " | ".join(f"{v:+.2%}" for v in values)
                     + f" | {np.mean(values):+.2%} |")
    lines += ["", "| seed | mean gain | below +3 % (≥ 50 queries) | below base, p < 0.05 | beats Rocchio | beats linear adapter |",
              "|---:|---:|---|---|---:|---:|"]
    for seed, results in by_seed.items():
        c = criteria(results, datasets)
        lines.append(f"| {seed} | {c['mean gain']:+.2%} | {', '.join(c['below +3 % with >= 50 queries']) or 'none'} | "
                     f"{', '.join(c['below base with p < 0.05']) or 'none'} | {c['beats Rocchio on']}/{len(datasets)} | "
                     f"{c['beats the linear adapter on']}/{len(datasets)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", nargs="+", type=int, default=[42, 43, 44])
    parser.add_argument("--datasets", nargs="+", default=list(COLLECTIONS), choices=list(COLLECTIONS))
    parser.add_argument("--output-dir", type=Path, default=HERE / "results",
                        help="where collections-seed<S>.json go (and are resumed from)")
    parser.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE",
                        help="TrainConfig fields that make the recipe under test from the default, e.g. validation_folds=1")
    parser.add_argument("--per-collection", action="store_true",
                        help="also print each seed's full table (validation and test nDCG@10, paired p, improved/worsened, "
                             "unseen-relevant subset, training seconds), as all_collections.py does")
    args = parser.parse_args()
    settings = dict(parse_setting(item) for item in args.set)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    args.output_dir.mkdir(parents=True, exist_ok=True)
    by_seed = {seed: run_seed(seed, args.datasets, seed_file(args.output_dir, seed), settings) for seed in args.seeds}
    if args.per_collection:
        for seed, results in by_seed.items():
            shown = {"collections": {name: results["collections"][name] for name in args.datasets}}
            print(f"Seed {seed}:\n\n{collection_tables(shown)}\n")
    print(tables(by_seed, args.datasets))


if __name__ == "__main__":
    main()
