"""Two recipes on the same held-out validation halves: how far apart they are, and how far apart noise alone puts them.

Usage (from the repository root, after the README's install command):
    python benchmarks/all_collections.py --variants --no-nested --no-baselines --held-out --output reference.json
    python benchmarks/all_collections.py --variants --no-nested --no-baselines --held-out --output candidate.json \\
        --set query_balanced=true
    python benchmarks/compare_held_out.py reference.json candidate.json

Both files must come from the same seed, so that the halves (and the folds of the cross-validated collections) are
the same. No test data is read. Per collection: each recipe's relative nDCG@10 gain over the frozen retriever on the
held-out halves, the difference in points, and the paired t-test p over the same (split, query) pairs. Then the
quantity candidates are judged by, the mean over collections of the relative gains, with its difference and a
standard error: the collections are independent, so the difference's variance is the sum over collections of
var(per-query difference) / (queries x base nDCG@10^2), divided by the number of collections squared. A difference
inside two standard errors is what reshuffling the halves could give either way.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
from scipy import stats


def held_out(path: Path) -> dict[str, dict]:
    """The `held_out_validation` record of every collection of one `all_collections.py --held-out` output."""
    collections = json.loads(path.read_text())["collections"]
    records = {name: result["held_out_validation"] for name, result in collections.items() if "held_out_validation" in result}
    if not records:
        raise SystemExit(f"{path} holds no held-out figures: run all_collections.py with --held-out.")
    missing = [name for name, record in records.items() if "per_query" not in record]
    if missing:
        raise SystemExit(f"{path} has no per-query held-out values for {', '.join(missing)} (written by "
                         "all_collections.py since 2026-12-06): run it again to compare.")
    return records


def compare(reference: dict[str, dict], candidate: dict[str, dict]) -> tuple[list[dict], dict]:
    """Per-collection rows and the summary over the collections both files hold."""
    common = [name for name in reference if name in candidate]
    if not common:
        raise SystemExit("The two files share no collection.")
    rows, variance = [], 0.0
    for name in common:
        ref, cand = reference[name]["per_query"], candidate[name]["per_query"]
        if ref["query_ids"] != cand["query_ids"] or not np.allclose(ref["base"], cand["base"]):
            raise SystemExit(f"{name}: the two files were scored on different queries or halves (another seed or "
                             "data?); compare runs of the same seed.")
        base = float(np.mean(ref["base"]))
        diff = np.asarray(cand["recipe"]) - np.asarray(ref["recipe"])
        p = float(stats.ttest_rel(cand["recipe"], ref["recipe"]).pvalue) if len(diff) > 1 and np.any(diff) else 1.0
        variance += (diff.var(ddof=1) / len(diff) if len(diff) > 1 else 0.0) / base**2
        rows.append({"collection": name, "queries": len(diff), "reference": np.mean(ref["recipe"]) / base - 1,
                     "candidate": np.mean(cand["recipe"]) / base - 1, "p": p})
    difference = float(np.mean([row["candidate"] - row["reference"] for row in rows]))
    summary = {"reference": float(np.mean([row["reference"] for row in rows])),
               "candidate": float(np.mean([row["candidate"] for row in rows])),
               "difference": difference, "standard_error": math.sqrt(variance) / len(rows),
               "ahead": sum(row["candidate"] > row["reference"] for row in rows), "collections": len(rows)}
    return rows, summary


def table(rows: list[dict], summary: dict) -> str:
    lines = ["| collection | held-out queries | reference | candidate | difference | paired t p |",
             "|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['collection']} | {row['queries']} | {row['reference']:+.2%} | {row['candidate']:+.2%} | "
                     f"{(row['candidate'] - row['reference']) * 100:+.2f} points | {row['p']:.2g} |")
    lines.append(f"| mean of {summary['collections']} | | {summary['reference']:+.2%} | {summary['candidate']:+.2%} | "
                 f"{summary['difference'] * 100:+.2f} ± {summary['standard_error'] * 100:.2f} points (1 SE) | |")
    lines.append(f"\nCandidate ahead on {summary['ahead']} of {summary['collections']} collections.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reference", type=Path, help="all_collections.py --held-out output of the reference recipe")
    parser.add_argument("candidate", type=Path, help="the same for the candidate, same seed")
    args = parser.parse_args()
    print(table(*compare(held_out(args.reference), held_out(args.candidate))))


if __name__ == "__main__":
    main()
