"""Explanations over data on disk: one query of a dataset split, the deletion test over a split, a JSONL file.

The dataset helpers take a `prepared` object with `.dataset`, `.doc_embs` (the corpus embeddings), `.k` (the
frozen retriever's candidate depth) and `.ranking(queries)` (its candidates for a query set).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from .attribution import Explainer
from .faithfulness import deletion_test
from .records import DeletionReport, ExplainError, Explanation


def explain_dataset_query(explainer: Explainer, prepared: Any, split: str, query_id: str, top: int = 10,
                          concepts: int = 10, doc_words: int = 1) -> Explanation:
    """Explain one query of a dataset split over the frozen retriever's exact top-K of the corpus."""
    queries = prepared.dataset.split(split)
    if query_id not in set(queries.ids):
        raise ExplainError(
            f"Query {query_id!r} is not in split {split!r} of {prepared.dataset.name!r} (it has {len(queries)} queries with "
            f"judgements, e.g. {', '.join(queries.ids[:3])}). Pick one of those, or another --split."
        )
    text = queries.texts[queries.ids.index(query_id)]
    corpus = prepared.dataset.corpus
    return explainer.explain(text, corpus.ids, _Passages(corpus), prepared.doc_embs, query_id=query_id, top=top,
                             concepts=concepts, doc_words=doc_words, k=prepared.k)


class _Passages(Sequence[str]):
    """`corpus.passages()` built lazily: an explanation reads a few of them, not all N."""

    def __init__(self, corpus: Any) -> None:
        self.corpus = corpus

    def __len__(self) -> int:
        return len(self.corpus)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return f"{self.corpus.titles[i]} {self.corpus.texts[i]}".strip()


def split_deletion_test(explainer: Explainer, prepared: Any, split: str, n: int = 3, draws: int = 10, top: int = 10,
                        seed: int = 0, limit: int | None = None, progress: bool = True) -> DeletionReport:
    """The deletion test over a dataset split (optionally its first `limit` queries)."""
    queries = prepared.dataset.split(split)
    if limit is not None:
        queries = queries.subset(queries.ids[:limit])
    data = prepared.ranking(queries)
    return deletion_test(explainer, queries.ids, queries.texts, prepared.doc_embs, data.candidates,
                         prepared.dataset.corpus.ids, n=n, draws=draws, top=top, seed=seed, progress=progress)


def read_documents(path: str | Path) -> tuple[list[str], list[str]]:
    """(ids, passages) from a JSONL file of {"_id" or "id", "title"?, "text"} objects, one per line."""
    path = Path(path)
    if not path.is_file():
        raise ExplainError(f"Documents file {path} does not exist; give a JSONL file with one {{\"_id\", \"text\"}} object per line.")
    ids, texts = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ExplainError(f"{path}:{number}: not valid JSON ({err}).") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ExplainError(f"{path}:{number}: expected an object with a string \"text\" field (and \"_id\").")
        ids.append(str(record.get("_id", record.get("id", number))))
        texts.append(f"{record.get('title') or ''} {record['text']}".strip())
    if not ids:
        raise ExplainError(f"{path} holds no documents.")
    if len(set(ids)) != len(ids):
        raise ExplainError(f"{path}: document ids are not unique.")
    return ids, texts
