"""What bf16 encoding does to the default adapter: trained on fp32 embeddings and applied to bf16 ones (the
inference-only change), and retrained on bf16 embeddings (what `imrnn run` does when `--precision auto` picks bf16).

Usage (from the repository root, after the README's install command):
    python benchmarks/precision_drift.py scifact nfcorpus
    python benchmarks/precision_drift.py scifact nfcorpus --held-out
Both precisions are encoded at their default batch sizes into IMRNN_CACHE_DIR (keyed by precision, so they never mix)
unless already cached there. Seed 42, the official splits, nDCG@10 on test; prints one line per dataset and path.
`--held-out` uses no test data: the recipe, keeping the plateau's mean and keeping the best epoch, is trained on each
precision and scored on held-out validation halves (`all_collections.held_out_validation`), to judge how much the
choice between the two moves the result when only the embeddings' last bits change.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

from all_collections import held_out_validation
from imrnn.config import EncoderConfig, IMRNNConfig, TrainConfig
from imrnn.data import load_dataset
from imrnn.workflow import SplitPlan, Workspace, evaluate, train

DATA_DIR = os.environ.get("IMRNN_DATA_DIR", str(Path(__file__).resolve().parent.parent.parent / "shared" / "datasets"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("datasets", nargs="+")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--held-out", action="store_true", help="compare plateau averaging and the best epoch on "
                                                                "held-out validation halves instead of test")
    args = parser.parse_args()
    for name in args.datasets:
        dataset = load_dataset(name, DATA_DIR, None, download=False)
        plan = SplitPlan.official(dataset, seed=args.seed)
        spaces = {precision: Workspace.open(dataset, EncoderConfig(precision=precision), k=100, progress=False)
                  for precision in ("fp32", "bf16")}
        if args.held_out:
            for plateau in (True, False):
                recipe = dataclasses.replace(TrainConfig(seed=args.seed), plateau_average=plateau)
                scores = {precision: held_out_validation(space, plan, recipe, IMRNNConfig())["recipe"].mean()
                          for precision, space in spaces.items()}
                print(f"{name}: {'plateau mean' if plateau else 'best epoch'}: held-out validation nDCG@10 trained on fp32 "
                      f"{scores['fp32']:.4f}, on bf16 {scores['bf16']:.4f} (difference {scores['bf16'] - scores['fp32']:+.4f})",
                      flush=True)
            continue
        models = {precision: train(space, plan, TrainConfig(seed=args.seed), progress=False).model
                  for precision, space in spaces.items()}
        for trained_on, model in models.items():
            for applied_to, space in spaces.items():
                report = evaluate(model, space, plan).overall
                print(f"{name}: adapter trained on {trained_on}, applied to {applied_to} embeddings: nDCG@10 "
                      f"{report.base['nDCG@10']:.4f} -> {report.adapted['nDCG@10']:.4f}", flush=True)


if __name__ == "__main__":
    main()
