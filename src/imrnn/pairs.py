"""Your own training data: (query, relevant document) pairs and a corpus in JSON Lines, CSV or TSV -> a `Dataset`.

A pairs file holds one judged (query, document) pair per row, e.g. as JSON Lines

    {"query": "What is the currency of Mexico?", "doc_id": "d16", "grade": 2}
    {"query": "What is the currency of Mexico?", "document": "Mexico pays in pesos."}

or as CSV/TSV whose first row names the columns (`query,doc_id,grade`). The fields:

    query     the query text (required, not blank)
    doc_id    the id of a relevant document of the corpus, or
    document  the relevant document's text: it joins the corpus (unless a corpus document has exactly this text)
    grade     an integer >= 0 (default 1; 0 = judged not relevant, as in BEIR qrels)
    query_id  optional, on every row of a file or on none

Rows with the same query (the same `query_id`, or without ids the same text) are one query with several judged
documents. Queries without ids are numbered q1, q2, ... in order of first appearance, so their order (which seeds
the validation carve-out) is the file's. `load_pairs` returns a `Dataset` whose `train` split holds the pairs and
whose `test` split holds the optional test pairs, so `SplitPlan`, `train`, `evaluate` and `run_pipeline` of
`imrnn.workflow` work on it unchanged. Every bad row is a `DataError` naming file and line.
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .data import MAX_RELEVANCE, Corpus, Dataset, Qrels, check_id, clip, json_objects, numbered_lines, without_lone_surrogates
from .errors import DataError

PAIRS_SPLIT = "train"  # the split that `load_pairs` fills from the pairs file
TEST_SPLIT = "test"  # ... and from the test pairs file
FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv", ".tab": "tsv"}
_DELIMITERS = {"csv": ",", "tsv": "\t"}
_NAMES = {"jsonl": "JSON Lines", "csv": "CSV", "tsv": "TSV"}
_ID_KEYS = ("_id", "id", "doc_id")  # a corpus record's id, under any one of these names
PAIR_COLUMNS = ("query", "doc_id", "document", "grade", "query_id")
_PAIR_EXAMPLE = '{"query": "...", "doc_id": "d1", "grade": 1}'


# --------------------------------------------------------------------------- rows of any format


def file_format(path: Path) -> tuple[str, str]:
    """('jsonl' | 'csv' | 'tsv', why): by the file's extension, else by its first non-blank line."""
    if path.suffix.lower() in FORMATS:
        return FORMATS[path.suffix.lower()], f"its {path.suffix} extension"
    for _, line in numbered_lines(path):
        if line.strip():
            kind = "jsonl" if line.lstrip().startswith("{") else "tsv" if "\t" in line else "csv"
            return kind, "its first line"
    raise DataError(f"{path} is empty. Give one row per line: JSON objects, or CSV/TSV with a header row.")


def read_rows(path: str | Path, kind: str, columns: tuple[str, ...]) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) for every non-blank row of a JSON Lines, CSV or TSV file (`kind` names it in errors).

    CSV/TSV files need a header row naming at least one of `columns`; an empty cell is "" (id, grade and document
    fields treat "" as absent). A row in another format than the file's (decided by its extension or first line) is
    a DataError naming its line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Missing {kind} file {path}. Give an existing JSON Lines (.jsonl), CSV (.csv) or TSV (.tsv) file.")
    fmt, why = file_format(path)
    if fmt == "jsonl":
        yield from _json_rows(path, why)
    else:
        yield from _table_rows(path, fmt, why, columns)


def _json_rows(path: Path, why: str) -> Iterator[tuple[int, dict[str, Any]]]:
    def malformed(number: int, line: str, err: json.JSONDecodeError) -> str:
        looks_tabular = not line.lstrip().startswith(("{", "[", '"')) and ("\t" in line or "," in line)
        hint = " It looks like a CSV/TSV row: one file must use one format." if looks_tabular else ""
        return (f"{path}:{number}: not a JSON object ({err.msg} at column {err.colno}), but the file is JSON Lines "
                f"(by {why}).{hint} Each line must be one object, e.g. {_PAIR_EXAMPLE}.")

    yield from json_objects(path, malformed)


def _table_rows(path: Path, fmt: str, why: str, columns: tuple[str, ...]) -> Iterator[tuple[int, dict[str, Any]]]:
    name, delimiter = _NAMES[fmt], _DELIMITERS[fmt]
    reader = csv.reader((line + "\n" for _, line in numbered_lines(path)), delimiter=delimiter, strict=True)
    header: list[str] = []
    header_line = start = 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            raise DataError(
                f"{path}:{start}: unreadable {name} row ({err}). Quote cells that hold the delimiter, quotes or line breaks; "
                "JSON Lines has no cell-size limit."
            ) from None
        number, start = start, reader.line_num + 1
        if not row or not any(cell.strip() for cell in row):
            continue
        if row[0].lstrip().startswith("{") and _is_json_object(delimiter.join(row)):
            raise DataError(f"{path}:{number}: a JSON object in a {name} file (by {why}). One file must use one format; "
                            "name a JSON Lines file .jsonl.")
        if not header:
            header, header_line = [cell.strip().lower() for cell in row], number
            if len(set(header)) != len(header) or "" in header:
                raise DataError(f"{path}:{number}: the header row names columns {header}: every column needs a distinct name.")
            if not set(header) & set(columns):
                raise DataError(f"{path}:{number}: the first row {clip(delimiter.join(row))} names none of the columns "
                                f"{', '.join(columns)}. A {name} file starts with a header row naming its columns.")
            continue
        if len(row) != len(header):
            other = {"csv": ("\t", "tab-separated (TSV)"), "tsv": (",", "comma-separated (CSV)")}[fmt]
            hint = (f" The row looks {other[1]}, but the file is {name} (by {why}): one file must use one format."
                    if other[0] in "".join(row) else f" Quote cells that contain {'commas' if fmt == 'csv' else 'tabs'}.")
            raise DataError(f"{path}:{number}: {len(row)} cells, but the header (line {header_line}) names {len(header)}: "
                            f"{', '.join(header)}.{hint}")
        yield number, dict(zip(header, row))


def _is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except (ValueError, RecursionError):
        return False


def _string(path: Path, number: int, record: dict[str, Any], key: str) -> str | None:
    """A text field: None when absent, else a str (lone surrogates from JSON escapes become U+FFFD)."""
    value = record.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise DataError(f"{path}:{number}: \"{key}\" must be a string, got {type(value).__name__} {clip(value)}.")
    return without_lone_surrogates(value)


def _identifier(path: Path, number: int, record: dict[str, Any], key: str) -> str | None:
    """An id field: None when absent or empty, else a single-token string (JSON integers are accepted)."""
    value = record.get(key)
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError(f"{path}:{number}: \"{key}\" must be a string id, got {type(value).__name__} {clip(value)}.")
    return check_id(path, number, str(value), f"\"{key}\"")


def _grade(path: Path, number: int, value: Any) -> int:
    if value is None or value == "":
        return 1
    integer = isinstance(value, int) and not isinstance(value, bool)
    if not integer and not (isinstance(value, str) and value.strip().lstrip("+-").isdecimal()):
        raise DataError(f"{path}:{number}: grade {clip(value)} is not an integer. Use grades such as 0, 1, 2 "
                        "(or leave it out: the default is 1).")
    grade = int(value)
    if not 0 <= grade <= MAX_RELEVANCE:
        raise DataError(f"{path}:{number}: grade {clip(value)} is out of range; grades are integers from 0 (not relevant) up.")
    return grade


# --------------------------------------------------------------------------- corpus and pairs


def read_corpus(path: str | Path) -> Corpus:
    """Documents from JSON Lines (BEIR's `{"_id", "title", "text"}`) or CSV/TSV with columns `_id` (or `id`,
    `doc_id`), `text` and optionally `title`. Ids must be unique single tokens; every row needs a text field."""
    path = Path(path)
    ids: list[str] = []
    titles: list[str] = []
    texts: list[str] = []
    seen: dict[str, int] = {}
    for number, record in read_rows(path, "corpus", (*_ID_KEYS, "title", "text")):
        found = {key: doc for key in _ID_KEYS if (doc := _identifier(path, number, record, key)) is not None}
        if len(found) != 1:
            raise DataError(f"{path}:{number}: a document needs exactly one id field (\"_id\", \"id\" or \"doc_id\"); found "
                            f"{' and '.join(found) or 'none'}. Give every document one unique id.")
        (doc,) = found.values()
        if doc in seen:
            raise DataError(f"{path}:{number}: duplicate document id {clip(doc)} (first on line {seen[doc]}). Ids must be "
                            "unique; remove or rename one.")
        if "text" not in record and "title" not in record:
            raise DataError(f"{path}:{number}: document {clip(doc)} has no \"text\" (fields: {', '.join(record) or 'none'}). "
                            "Name the document's text \"text\" (and its title, if any, \"title\").")
        seen[doc] = number
        ids.append(doc)
        titles.append(_string(path, number, record, "title") or "")
        texts.append(_string(path, number, record, "text") or "")
    if not ids:
        raise DataError(f"{path}: no documents found. Give one document per row, e.g. {{\"_id\": \"d1\", \"text\": \"...\"}}.")
    return Corpus(np.array(ids, dtype=object), titles, texts)


class _PairsReader:
    """Reads pairs files against one corpus: queries numbered and text documents added across files."""

    def __init__(self, corpus: Corpus | None, corpus_path: Path | None) -> None:
        self.corpus_path = corpus_path
        self.ids: list[str] = corpus.ids.tolist() if corpus is not None else []
        self.titles: list[str] = list(corpus.titles) if corpus is not None else []
        self.texts: list[str] = list(corpus.texts) if corpus is not None else []
        self.known: set[str] = set(self.ids)
        self.by_text: dict[str, str] | None = None  # document text -> id, built when a row first gives a text
        self.queries: dict[str, str] = {}  # query id -> text
        self.origin: dict[str, tuple[Path, int]] = {}  # query id -> where it was first seen
        self.numbered: dict[str, str] = {}  # query text -> generated id (files without query_id)

    def corpus(self) -> Corpus:
        return Corpus(np.array(self.ids, dtype=object), self.titles, self.texts)

    def read(self, path: Path, kind: str) -> Qrels:
        """The qrels of one pairs file; new queries and text documents are added to this reader."""
        qrels: Qrels = {}
        where: dict[tuple[str, str], int] = {}
        with_ids: tuple[bool, int] | None = None  # (rows give query_id, first row's line)
        for number, record in read_rows(path, kind, PAIR_COLUMNS):
            query = (_string(path, number, record, "query") or "").strip()
            if not query:
                state = "blank" if "query" in record else "missing"
                raise DataError(f"{path}:{number}: {state} \"query\" (fields: {', '.join(record) or 'none'}). Every row needs "
                                f"the query's text, e.g. {_PAIR_EXAMPLE}.")
            given = _identifier(path, number, record, "query_id")
            if with_ids is None:
                with_ids = (given is not None, number)
            elif with_ids[0] != (given is not None):
                has, lacks = (with_ids[1], number) if with_ids[0] else (number, with_ids[1])
                raise DataError(f"{path}:{number}: line {has} gives a query_id and line {lacks} does not. Give query_id on "
                                "every row of a file or on none (rows without ids are grouped by query text).")
            qid = self.query_id(path, number, query, given, kind)
            doc = self.document(path, number, record)
            key = (qid, doc)
            if key in where:
                same_text = "" if given else (" If these are two different queries with the same text, give every row a "
                                              "query_id.")
                raise DataError(f"{path}:{number}: duplicate row: query {clip(query)} is already paired with document "
                                f"{clip(doc)} on line {where[key]}. Remove one of the two rows.{same_text}")
            where[key] = number
            qrels.setdefault(qid, {})[doc] = _grade(path, number, record.get("grade"))
        if not qrels:
            raise DataError(f"{path}: no pairs found. Give one (query, document) pair per row, e.g. {_PAIR_EXAMPLE}.")
        if not any(grade > 0 for docs in qrels.values() for grade in docs.values()):
            raise DataError(f"{path}: every pair has grade 0 (not relevant); a query needs at least one relevant document.")
        return qrels

    def query_id(self, path: Path, number: int, query: str, given: str | None, kind: str) -> str:
        """The row's query id: its query_id, or the id earlier rows gave the same text, or the next q<n>."""
        qid = given if given is not None else self.numbered.get(query)
        if qid is None:
            qid = f"q{len(self.numbered) + 1}"
            while qid in self.queries:  # an id a file with query_id columns already took
                qid = f"q{int(qid[1:]) + 1}"
            self.numbered[query] = qid
        if qid not in self.queries:
            self.queries[qid] = query
            self.origin[qid] = (path, number)
            return qid
        first_path, first_line = self.origin[qid]
        if first_path != path:
            what = f"query_id {clip(qid)}" if given is not None else f"query {clip(query)}"
            raise DataError(f"{path}:{number}: {what} is also in {first_path}:{first_line} ({kind} and training pairs must "
                            "not share queries; queries without query_id are numbered q1, q2, ...). Remove it from one.")
        if self.queries[qid] != query:
            raise DataError(f"{path}:{number}: query_id {clip(qid)} has the text {clip(query)}, but line {first_line} gave it "
                            f"{clip(self.queries[qid])}. One id, one text: fix the id or the text.")
        return qid

    def document(self, path: Path, number: int, record: dict[str, Any]) -> str:
        """The row's document id: its doc_id (which must be in the corpus), or the id of its text."""
        doc = _identifier(path, number, record, "doc_id")
        text = _string(path, number, record, "document") or ""
        if (doc is None) == (not text.strip()):
            problem = "gives both \"doc_id\" and \"document\"" if doc is not None else "has no \"doc_id\" and no (non-blank) \"document\""
            raise DataError(f"{path}:{number}: the row {problem}. Give one: the id of a corpus document, or the relevant "
                            "document's text.")
        if doc is not None:
            if doc not in self.known:
                source = (f"the corpus {self.corpus_path} ({len(self.known)} documents)" if self.corpus_path is not None
                          else "any corpus: no corpus file was given (--corpus)")
                raise DataError(f"{path}:{number}: unknown doc_id {clip(doc)}: it is not in {source}. Fix the id, add the "
                                "document to the corpus, or give its text in \"document\" instead.")
            return doc
        if self.by_text is None:
            passages = (f"{t} {x}".strip() for t, x in zip(self.titles, self.texts))
            self.by_text = {**dict(zip(self.texts, self.ids)), **dict(zip(passages, self.ids))}
        if text not in self.by_text:
            doc = "text-" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]
            self.by_text[text] = doc
            self.ids.append(doc)
            self.titles.append("")
            self.texts.append(text)
            self.known.add(doc)
        return self.by_text[text]


def load_pairs(pairs: str | Path, corpus: str | Path | None = None, test_pairs: str | Path | None = None,
               name: str | None = None) -> Dataset:
    """A `Dataset` from your own data: `pairs` become split `train`, the optional `test_pairs` split `test`.

    `corpus` (JSON Lines, CSV or TSV) holds the documents pairs refer to by `doc_id`; documents given by text join
    it (with ids `text-<hash>`, so a changed corpus is re-encoded once and cached). Without `corpus` the documents
    given by text are the corpus. The dataset is named `name`, else after the pairs file."""
    pairs = Path(pairs)
    corpus_path = Path(corpus) if corpus is not None else None
    reader = _PairsReader(read_corpus(corpus_path) if corpus_path is not None else None, corpus_path)
    qrels = {PAIRS_SPLIT: reader.read(pairs, "pairs")}
    if test_pairs is not None:
        qrels[TEST_SPLIT] = reader.read(Path(test_pairs), "test pairs")
    return Dataset(name or pairs.stem, pairs, reader.corpus(), reader.queries, qrels)
