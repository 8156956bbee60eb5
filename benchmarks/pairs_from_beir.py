"""Write one split of a BEIR dataset as an `imrnn train --pairs` file, to check that the pairs route trains exactly
like `--dataset` (README, "Training from your own pairs").

Usage (from the repository root):
    python benchmarks/pairs_from_beir.py scifact train /tmp/scifact-train.jsonl
    python benchmarks/pairs_from_beir.py scifact test /tmp/scifact-test.jsonl
    imrnn train --pairs /tmp/scifact-train.jsonl --test-pairs /tmp/scifact-test.jsonl \\
        --corpus ../shared/datasets/scifact/corpus.jsonl --seed 42 --precision fp32 --json

Rows carry the dataset's query ids (`query_id`), so queries that share a text stay apart (SciFact's training
split has two such pairs) and the seeded validation carve-out picks the same queries as `--dataset`. With
`--no-query-ids` rows hold only texts; identical texts then become one query (on SciFact a duplicate-row error).
The file is JSON Lines, or CSV/TSV when its name ends so. Datasets come from IMRNN_DATA_DIR (default ../shared/datasets).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from pathlib import Path

from imrnn.data import load_dataset

HERE = Path(__file__).resolve().parent
DATA_DIR = os.environ.get("IMRNN_DATA_DIR", str(HERE.parent.parent / "shared" / "datasets"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset")
    parser.add_argument("split")
    parser.add_argument("output", type=Path)
    parser.add_argument("--no-query-ids", action="store_true", help="write only query texts (no query_id column)")
    args = parser.parse_args()
    queries = load_dataset(args.dataset, DATA_DIR, download=False).split(args.split)
    rows = [{**({} if args.no_query_ids else {"query_id": qid}), "query": text, "doc_id": doc, "grade": grade}
            for qid, text in zip(queries.ids, queries.texts) for doc, grade in queries.qrels[qid].items()]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    if args.output.suffix in (".csv", ".tsv"):
        with open(args.output, "w", newline="", encoding="utf-8") as out:
            writer = csv.DictWriter(out, list(rows[0]), delimiter="\t" if args.output.suffix == ".tsv" else ",")
            writer.writeheader()
            writer.writerows(rows)
    else:
        args.output.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    print(f"wrote {args.output}: {len(rows)} pairs of {len(queries)} queries ({args.dataset} {args.split})")


if __name__ == "__main__":
    main()
