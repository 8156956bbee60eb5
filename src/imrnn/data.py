"""BEIR folders -> Dataset: loading with line-precise validation, resolution, download and query splits."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import tempfile
import unicodedata
import urllib.error
import urllib.request
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from .errors import DataError
from .files import publish_folder

BEIR_URL = "https://public.ukp.informatik.tu-darmstadt.de/thakur/BEIR/datasets/{name}.zip"
Qrels = dict[str, dict[str, int]]


# --------------------------------------------------------------------------- locations


def default_cache_dir() -> Path:
    """`IMRNN_CACHE_DIR`, else `$XDG_CACHE_HOME/imrnn`, else `~/.cache/imrnn`."""
    if os.environ.get("IMRNN_CACHE_DIR"):
        return Path(os.environ["IMRNN_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "imrnn"


def data_search_path(data_dir: str | Path | None = None, cache_dir: str | Path | None = None) -> list[Path]:
    """Folders searched for a dataset name: `data_dir` (or `IMRNN_DATA_DIR`, colon-separated), then the cache."""
    raw = str(data_dir) if data_dir is not None else os.environ.get("IMRNN_DATA_DIR", "")
    dirs = [Path(p).expanduser() for p in raw.split(os.pathsep) if p]
    dirs.append(Path(cache_dir or default_cache_dir()) / "datasets")
    return dirs


# --------------------------------------------------------------------------- containers


@dataclass(frozen=True)
class Corpus:
    """Documents as parallel arrays: `ids[i]` has `titles[i]` and `texts[i]`."""

    ids: np.ndarray
    titles: list[str]
    texts: list[str]

    def __len__(self) -> int:
        return len(self.ids)

    def passages(self) -> list[str]:
        """The text the encoder sees: `title + " " + text` (BEIR's convention), stripped."""
        return [f"{t} {x}".strip() for t, x in zip(self.titles, self.texts)]

    def fingerprint(self) -> str:
        """SHA-256 over ids and passages: changes whenever anything the encoder would see changes."""
        return fingerprint_texts(self.ids.tolist(), self.passages())


@dataclass(frozen=True)
class QuerySet:
    """The queries of one split that have at least one relevant document, with their qrels."""

    name: str
    ids: list[str]
    texts: list[str]
    qrels: Qrels

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, ids: Sequence[str], name: str | None = None) -> "QuerySet":
        """The queries in `ids` (order kept as given)."""
        text = dict(zip(self.ids, self.texts))
        missing = [q for q in ids if q not in text]
        if missing:
            raise DataError(f"{len(missing)} query ids are not in split {self.name!r} (first: {clip(missing[0])}).")
        return QuerySet(name or self.name, list(ids), [text[q] for q in ids], {q: self.qrels[q] for q in ids})


@dataclass
class Dataset:
    """A BEIR dataset in memory: corpus arrays, all query texts and the qrels of every split found."""

    name: str
    path: Path
    corpus: Corpus
    queries: dict[str, str]
    qrels: dict[str, Qrels] = field(default_factory=dict)

    @property
    def splits(self) -> list[str]:
        return sorted(self.qrels)

    def split(self, name: str) -> QuerySet:
        """Queries of split `name` that have at least one judged-relevant (score > 0) document."""
        if name not in self.qrels:
            raise DataError(
                f"Dataset {self.name!r} has no split {name!r}; available: {', '.join(self.splits) or 'none'}. "
                f"Pick one of those with --split (splits are the files in {self.path / 'qrels'})."
            )
        qrels = {q: d for q, d in self.qrels[name].items() if any(r > 0 for r in d.values())}
        ids = sorted(qrels, key=_natural_key)
        return QuerySet(name, ids, [self.queries[q] for q in ids], qrels)


# --------------------------------------------------------------------------- reading files


_WIDE_BOMS = ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"), (b"\xff\xfe", "UTF-16"), (b"\xfe\xff", "UTF-16"))
_SURROGATE = re.compile("[\ud800-\udfff]")
MAX_RELEVANCE = 2**31 - 1  # pytrec_eval stores grades as C ints; larger values would silently wrap


def clip(value: object, limit: int = 80) -> str:
    """`repr` of a value cut to `limit` characters, so error messages stay short even for huge lines."""
    text = str(value)
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} characters)"


def numbered_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) for each line of a UTF-8 file (optional BOM; `\\n`, `\\r\\n` or `\\r` line ends).

    Raises DataError, naming file and line, on unreadable files, UTF-16/32 files, NUL bytes and bytes that are
    not UTF-8. Unicode line separators inside a line (U+2028, U+0085 ...) are kept: they may sit inside JSON strings.
    """
    try:
        handle = open(path, "rb")
    except OSError as err:
        raise DataError(f"Cannot read {path}: {err.strerror or err}. Check that it is a readable file.") from None
    with handle:
        number = 0
        try:
            for raw in handle:
                if number == 0:
                    for bom, name in _WIDE_BOMS:
                        if raw.startswith(bom):
                            raise DataError(
                                f"{path} is {name}-encoded (it starts with a {name} byte-order mark); imrnn reads UTF-8. "
                                f"Re-save it as UTF-8 (e.g. `iconv -f {name.lower()} -t utf-8`)."
                            )
                    if raw.startswith(b"\xef\xbb\xbf"):
                        raw = raw[3:]
                body = raw[:-1] if raw.endswith(b"\n") else raw
                parts = body.split(b"\r")
                if len(parts) > 1 and parts[-1] == b"":  # "\r\n", or a final lone "\r"
                    parts.pop()
                for part in parts:
                    number += 1
                    if b"\x00" in part:
                        raise DataError(
                            f"{path}:{number}: NUL byte at byte {part.index(bytes(1))}: this is not a UTF-8 text file "
                            "(binary, or UTF-16 without a byte-order mark). Re-save it as UTF-8 text."
                        )
                    try:
                        yield number, part.decode("utf-8")
                    except UnicodeDecodeError as err:
                        raise DataError(
                            f"{path}:{number}: bytes that are not UTF-8 ({err.reason} at byte {err.start}). "
                            "Re-save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)."
                        ) from None
        except OSError as err:
            raise DataError(f"Cannot read {path} (after line {number}): {err.strerror or err}.") from None


def check_id(path: Path, number: int, value: str, what: str) -> str:
    """An id must be one token: non-empty, no whitespace or control characters (TREC files split on whitespace)."""
    if value.split() != [value] or any(unicodedata.category(c) in ("Cc", "Cs") for c in value):
        raise DataError(
            f"{path}:{number}: {what} {clip(value)} contains whitespace or control characters. Ids must be single "
            "tokens, because qrels and TREC run files separate their columns by whitespace; rename it."
        )
    return value


def without_lone_surrogates(text: str) -> str:
    """`text` with lone surrogates (from `\\ud800`-style JSON escapes: not encodable text) replaced by U+FFFD."""
    return _SURROGATE.sub("\ufffd", text)


def json_objects(path: Path, malformed: Callable[[int, str, json.JSONDecodeError], str]) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line of a JSON Lines file. A line that is not one JSON object is a
    DataError naming it; `malformed(number, line, error)` words the message for a line that is not JSON at all."""
    for number, line in numbered_lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(malformed(number, line, err)) from None
        except (ValueError, RecursionError) as err:  # integers over 4300 digits, absurdly deep nesting
            reason = "nested too deeply" if isinstance(err, RecursionError) else str(err).split(":")[0]
            raise DataError(f"{path}:{number}: unreadable JSON ({reason}). Each line must be one flat JSON object.") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}. Each line must be one object.")
        yield number, record


def _read_jsonl(path: Path, kind: str) -> Iterator[tuple[int, dict]]:
    if not path.is_file():
        raise DataError(f"Missing {kind} file {path}. A BEIR folder needs corpus.jsonl, queries.jsonl and qrels/<split>.tsv.")

    def malformed(number: int, line: str, err: json.JSONDecodeError) -> str:
        return (f"{path}:{number}: malformed JSON ({err.msg} at column {err.colno}). "
                "Each line must be one JSON object, e.g. {\"_id\": \"d1\", \"title\": \"\", \"text\": \"...\"}.")

    for number, record in json_objects(path, malformed):
        rid = record.get("_id")
        if isinstance(rid, bool) or not isinstance(rid, (str, int)) or str(rid) == "":
            raise DataError(f"{path}:{number}: missing or empty \"_id\" in {kind} record. Give every record a unique \"_id\" string.")
        check_id(path, number, str(rid), "\"_id\"")
        for key in ("title", "text"):
            if key in record and record[key] is not None and not isinstance(record[key], str):
                raise DataError(f"{path}:{number}: \"{key}\" must be a string, got {type(record[key]).__name__}.")
            if isinstance(record.get(key), str):
                record[key] = without_lone_surrogates(record[key])
        yield number, record


def _read_records(path: Path, kind: str) -> tuple[list[str], list[str], list[str]]:
    ids: list[str] = []
    titles: list[str] = []
    texts: list[str] = []
    seen: dict[str, int] = {}
    for number, record in _read_jsonl(path, kind):
        rid = str(record["_id"])
        if rid in seen:
            raise DataError(
                f"{path}:{number}: duplicate _id {clip(rid)} (first seen on line {seen[rid]}). Ids must be unique; remove or rename one."
            )
        seen[rid] = number
        ids.append(rid)
        titles.append(record.get("title") or "")
        texts.append(record.get("text") or "")
    if not ids:
        raise DataError(f"{path}: no {kind} records found. The file must hold one JSON object per line.")
    return ids, titles, texts


def read_qrels(path: str | Path) -> Qrels:
    """Read a qrels file: BEIR TSV (`query-id corpus-id score`, header optional) or TREC (`qid 0 docid rel`)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Missing qrels file {path}. Pass an existing qrels TSV/TREC file.")
    qrels: Qrels = {}
    for number, line in numbered_lines(path):
        fields = line.split()
        if not fields:
            continue
        if number == 1 and fields[0].lower() in ("query-id", "query_id", "qid"):
            continue
        if len(fields) not in (3, 4):
            raise DataError(
                f"{path}:{number}: expected 3 columns (query-id corpus-id score) or 4 (qid 0 docid rel), got {len(fields)}: {line[:80]!r}."
            )
        qid, doc, rel = fields[0], fields[-2], fields[-1]
        try:
            value = int(rel)
        except ValueError:
            raise DataError(f"{path}:{number}: relevance {clip(rel)} is not an integer. Use integer grades such as 0, 1, 2.") from None
        if abs(value) > MAX_RELEVANCE:
            raise DataError(f"{path}:{number}: relevance {clip(rel)} is out of range; grades are small integers such as 0, 1, 2.")
        qrels.setdefault(qid, {})[doc] = value
    if not qrels:
        raise DataError(f"{path}: no judgements found. The file must hold lines `query-id corpus-id score`.")
    return qrels


def read_ids(path: str | Path, count: int | None = None, what: str = "document") -> list[str]:
    """Ids from a text file (one per line, blank lines skipped) or a `.json` list (e.g. a cache entry's ids.json).

    Every id must be a single token and unique; with `count`, there must be exactly that many (one per row)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Missing {what} ids file {path}. Give a text file with one id per line, or a JSON list of strings.")
    if path.suffix == ".json":
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
            raise DataError(f"{path} is not a readable JSON list of ids ({type(err).__name__}).") from None
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise DataError(f"{path} must hold a JSON list of id strings, e.g. [\"d1\", \"d2\"].")
        numbered: Iterator[tuple[int, str]] = enumerate(values, start=1)
    else:
        numbered = ((n, line.strip()) for n, line in numbered_lines(path) if line.strip())
    ids: list[str] = []
    seen: set[str] = set()
    for number, value in numbered:
        check_id(path, number, value, f"{what} id")
        if value in seen:
            raise DataError(f"{path}:{number}: duplicate {what} id {clip(value)}. Ids must be unique.")
        seen.add(value)
        ids.append(value)
    if count is not None and len(ids) != count:
        raise DataError(
            f"{path} holds {len(ids)} {what} ids but the embeddings have {count} rows. Give exactly one id per row, in row order."
        )
    return ids


def fingerprint_texts(ids: Sequence[str], texts: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for i, t in zip(ids, texts):
        digest.update(i.encode("utf-8", "surrogatepass") + b"\x00" + t.encode("utf-8", "surrogatepass") + b"\x01")
    return digest.hexdigest()


def _natural_key(value: str) -> tuple:
    return tuple(int(p) if p.isdecimal() else p for p in re.split(r"(\d+)", value))


def load_beir(path: str | Path, drop_unknown: bool = False, name: str | None = None) -> Dataset:
    """Load and validate a BEIR folder. Qrels that name unknown queries/documents are an error unless `drop_unknown`."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path} is not a directory. Point at a BEIR folder holding corpus.jsonl, queries.jsonl and qrels/.")
    doc_ids, titles, texts = _read_records(path / "corpus.jsonl", "corpus")
    query_ids, _, query_texts = _read_records(path / "queries.jsonl", "query")
    qrels_dir = path / "qrels"
    files = sorted(qrels_dir.glob("*.tsv")) if qrels_dir.is_dir() else []
    if not files:
        raise DataError(f"Missing qrels: no {qrels_dir}/<split>.tsv files. Add e.g. qrels/test.tsv with `query-id corpus-id score` lines.")
    known_docs, known_queries = set(doc_ids), set(query_ids)
    qrels: dict[str, Qrels] = {}
    for file in files:
        split = read_qrels(file)
        bad_q = sum(1 for q in split if q not in known_queries)
        bad_d = sum(1 for d in split.values() for doc in d if doc not in known_docs)
        if bad_q or bad_d:
            message = (
                f"{file}: {bad_q} query ids not in queries.jsonl and {bad_d} judgements naming documents not in corpus.jsonl."
            )
            if not drop_unknown:
                raise DataError(message + " Fix the files, or load with drop_unknown=True (CLI: --drop-unknown) to drop them.")
            warnings.warn(message + " Dropped.", stacklevel=2)
            split = {
                q: {d: r for d, r in docs.items() if d in known_docs} for q, docs in split.items() if q in known_queries
            }
            split = {q: d for q, d in split.items() if d}
        qrels[file.stem] = split
    corpus = Corpus(np.array(doc_ids, dtype=object), titles, texts)
    return Dataset(name or path.name, path, corpus, dict(zip(query_ids, query_texts)), qrels)


# --------------------------------------------------------------------------- resolution and download


def download_beir(name: str, cache_dir: str | Path | None = None, url: str | None = None, timeout: float = 30.0) -> Path:
    """Download BEIR dataset `name` from its official URL into `<cache>/datasets/<name>`, atomically."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise DataError(f"Dataset name {name!r} is not a plain BEIR name (letters, digits, '.', '_', '-').")
    target_root = Path(cache_dir or default_cache_dir()) / "datasets"
    target_root.mkdir(parents=True, exist_ok=True)
    url = url or BEIR_URL.format(name=name)
    with tempfile.TemporaryDirectory(dir=target_root, prefix=f".{name}-") as tmp:
        archive = Path(tmp) / f"{name}.zip"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, open(archive, "wb") as out:
                shutil.copyfileobj(response, out)
        except (urllib.error.URLError, OSError, TimeoutError) as err:
            raise DataError(f"Could not download {url}: {err}.") from None
        extract = Path(tmp) / "extract"
        try:
            with zipfile.ZipFile(archive) as zf:
                root = extract.resolve()
                for member in zf.namelist():
                    resolved = (extract / member).resolve()
                    if not resolved.is_relative_to(root):
                        raise DataError(f"{url}: archive member {member!r} escapes the target folder; refusing it.")
                zf.extractall(extract)
        except zipfile.BadZipFile:
            raise DataError(f"{url} did not return a valid zip archive.") from None
        inner = extract / name if (extract / name).is_dir() else extract
        load_beir(inner, drop_unknown=True, name=name)  # validate before publishing
        final = target_root / name
        if final.exists():
            return final  # another process finished first
        publish_folder(inner, final)
    return final


def resolve_dataset(
    name_or_path: str | Path,
    data_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    download: bool = True,
) -> Path:
    """Find a dataset folder: an existing path, else `<dir>/<name>` on the search path, else download it."""
    candidate = Path(name_or_path).expanduser()
    if candidate.is_dir():
        return candidate
    searched = data_search_path(data_dir, cache_dir)
    for folder in searched:
        if (folder / str(name_or_path)).is_dir():
            return folder / str(name_or_path)
    hint = (
        f"Dataset {str(name_or_path)!r} not found in: {', '.join(str(p) for p in searched)}. "
        "Put the BEIR folder in one of them, pass --data-dir DIR (or set IMRNN_DATA_DIR), or give the folder's path"
    )
    if not download:
        raise DataError(hint + ".")
    try:
        return download_beir(str(name_or_path), cache_dir)
    except DataError as err:
        raise DataError(f"{hint}; downloading it failed too ({err})") from None


def load_dataset(
    name_or_path: str | Path,
    data_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    download: bool = True,
    drop_unknown: bool = False,
) -> Dataset:
    """Resolve then load a dataset by name or path."""
    path = resolve_dataset(name_or_path, data_dir, cache_dir, download)
    return load_beir(path, drop_unknown=drop_unknown, name=Path(str(name_or_path)).name)


# --------------------------------------------------------------------------- splits


def _shuffled(ids: Sequence[str], seed: int) -> list[str]:
    """A seeded permutation that does not depend on the input order."""
    ordered = sorted(set(ids), key=_natural_key)
    random.Random(seed).shuffle(ordered)
    return ordered


def carve_validation(
    queries: QuerySet, fraction: float = 0.15, seed: int = 42, disjoint: bool = False
) -> tuple[QuerySet, QuerySet]:
    """Split a training query set into (train, validation) by a seeded fraction of queries.

    With `disjoint`, queries that share a relevant document stay on the same side, so validation measures
    generalisation to documents training never saw as relevant (no leakage through shared positives).
    """
    if not 0.0 < fraction < 1.0:
        raise DataError(f"Validation fraction must be in (0, 1), got {fraction}.")
    groups = _relevance_groups(queries) if disjoint else [[q] for q in queries.ids]
    order = random.Random(seed).sample(sorted(groups, key=lambda g: _natural_key(g[0])), len(groups))
    target = max(1, round(len(queries) * fraction))
    val: list[str] = []
    for group in order:
        if len(val) >= target:
            break
        val.extend(group)
    if len(val) >= len(queries):
        raise DataError(f"Split {queries.name!r} has {len(queries)} queries: too few to carve a validation part.")
    chosen = set(val)
    train = [q for q in queries.ids if q not in chosen]
    return queries.subset(sorted(train, key=_natural_key), queries.name), queries.subset(sorted(val, key=_natural_key), "validation")


def _relevance_groups(queries: QuerySet) -> list[list[str]]:
    """Connected components of queries linked by a shared relevant document (union-find)."""
    parent = {q: q for q in queries.ids}

    def root(q: str) -> str:
        while parent[q] != q:
            parent[q] = parent[parent[q]]
            q = parent[q]
        return q

    owner: dict[str, str] = {}
    for q in queries.ids:
        for doc, grade in queries.qrels[q].items():
            if grade > 0:
                if doc in owner:
                    parent[root(q)] = root(owner[doc])
                else:
                    owner[doc] = q
    groups: dict[str, list[str]] = {}
    for q in sorted(queries.ids, key=_natural_key):
        groups.setdefault(root(q), []).append(q)
    return list(groups.values())


def random_splits(
    queries: QuerySet, fractions: tuple[float, float, float] = (0.70, 0.15, 0.15), seed: int = 42
) -> tuple[QuerySet, QuerySet, QuerySet]:
    """The authors' protocol for single-split collections: seeded train/validation/test parts of the queries."""
    if len(fractions) != 3 or any(f <= 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise DataError(f"Fractions must be three positive numbers summing to 1, got {fractions}.")
    order = _shuffled(queries.ids, seed)
    n_train = round(len(order) * fractions[0])
    n_val = round(len(order) * fractions[1])
    parts = (order[:n_train], order[n_train : n_train + n_val], order[n_train + n_val :])
    names = ("train", "validation", "test")
    return tuple(queries.subset(sorted(p, key=_natural_key), n) for p, n in zip(parts, names))  # type: ignore[return-value]


def kfold(queries: QuerySet, k: int = 5, seed: int = 42) -> list[tuple[QuerySet, QuerySet]]:
    """K (train, test) pairs over queries; every query is in exactly one test fold."""
    if k < 2 or k > len(queries):
        raise DataError(f"k must be between 2 and the number of queries ({len(queries)}), got {k}.")
    order = _shuffled(queries.ids, seed)
    folds = [order[i::k] for i in range(k)]
    pairs = []
    for i, test in enumerate(folds):
        train = [q for j, fold in enumerate(folds) if j != i for q in fold]
        pairs.append(
            (queries.subset(sorted(train, key=_natural_key), "train"), queries.subset(sorted(test, key=_natural_key), f"fold{i}"))
        )
    return pairs
