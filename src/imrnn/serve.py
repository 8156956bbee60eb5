"""HTTP service: one loaded checkpoint behind FastAPI (search, re-rank, explain), served by uvicorn.

    service = Service.open("checkpoints/scifact", dataset="scifact")   # model and corpus loaded once
    app = create_app(service)                                          # the ASGI app (uvicorn, tests)
    serve("checkpoints/scifact", dataset="scifact", port=8000)         # `imrnn serve`

Routes: `POST /search`, `POST /rerank` (document texts or ids of indexed documents), `POST /explain` (JSON),
`GET /explain?query=...` (the HTML report of `imrnn.report.render_html`), `GET /health`, and the OpenAPI
schema at `/openapi.json`. Request sizes are bounded by `LIMITS` (declared in the schema where JSON Schema can
say it); a bad request gets a 4xx JSON `ErrorBody` naming what was wrong, and every `IMRNNError` the library
raises becomes a 4xx. Model work runs in worker threads behind one capacity limiter, so the event loop keeps
answering while torch computes, and concurrent requests never oversubscribe torch's own threads; concurrent
/search requests are coalesced into one batched model call (see `_SearchBatcher`).

The app only needs a `Retriever` (what `IMRNNRetriever` offers) and, for search by corpus and ids, `Documents`
(texts and embeddings by id): a retriever whose first stage is a vector store plugs in the same way. Needs the
`serve` extra (fastapi, uvicorn).
"""

from __future__ import annotations

import asyncio
import functools
import http
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Mapping, Protocol, Sequence, TypeVar

import numpy as np

try:
    import anyio
    from fastapi import FastAPI, Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse
    from pydantic import AfterValidator, BaseModel, ConfigDict, Discriminator, Field, StringConstraints, Tag, model_validator
    from starlette.exceptions import HTTPException
except ImportError as err:  # pragma: no cover - depends on the installed extras
    raise ImportError(f"imrnn's HTTP service needs the serve extra: pip install 'imrnn[serve]' ({err}).") from err

from . import __version__
from .checkpoint import Checkpoint
from .data import Corpus
from .encode import Encoder
from .errors import ConfigError, IMRNNError
from .explain import Explainer, Explanation
from .retriever import IMRNNRetriever, Ranking

__all__ = ["LIMITS", "CorpusDocuments", "Documents", "Limits", "NoDocumentsError", "Retriever", "Service", "create_app", "serve"]

_T = TypeVar("_T")


@dataclass(frozen=True)
class Limits:
    """Bounds on one request; `/health` reports them and the OpenAPI schema declares them."""

    query_chars: int = 2_000  # characters per query
    queries: int = 64  # queries per batch (/search, /rerank)
    candidates: int = 1_000  # candidates (document ids or texts) per query
    texts: int = 256  # document texts per request, all queries together (each is embedded on the fly)
    text_chars: int = 20_000  # characters per document text
    id_chars: int = 256  # characters per document id
    k: int = 1_000  # results per query
    top: int = 50  # candidates shown by an explanation
    concepts: int = 50  # concepts per list in an explanation
    doc_words: int = 5  # documents given word attributions in an explanation
    body_bytes: int = 8 * 1024 * 1024  # request body


LIMITS = Limits()


class NoDocumentsError(ConfigError):
    """The request needs indexed documents (search, candidates by id) and the service has none."""


# --------------------------------------------------------------------------- what the app serves


class Retriever(Protocol):
    """What the service needs of a retriever: `IMRNNRetriever`, or one whose first stage is a vector store."""

    encoder: Encoder
    checkpoint: Checkpoint
    candidates: int

    def search(self, queries: Sequence[str], k: int = 10) -> list[Ranking]: ...

    def rerank(self, query: str, documents: Sequence[str], ids: Sequence[str] | None = None) -> Ranking: ...

    def rerank_ids(self, query_embs: np.ndarray, candidates: Sequence[Sequence[str]], k: int | None = None) -> list[Ranking]: ...


class Documents(Protocol):
    """The indexed documents, by id: their texts (returned and explained) and frozen embeddings (explained)."""

    def __len__(self) -> int: ...

    def texts(self, ids: Sequence[str]) -> list[str]: ...

    def embeddings(self, ids: Sequence[str]) -> np.ndarray: ...


class CorpusDocuments:
    """`Documents` over a corpus in memory and its embedding rows (the ones `IMRNNRetriever.index_embeddings` got)."""

    def __init__(self, corpus: Corpus, embeddings: np.ndarray) -> None:
        if len(corpus) != len(embeddings):
            raise ConfigError(f"Got {len(corpus)} documents but {len(embeddings)} embedding rows; give one row per document.")
        self.corpus = corpus
        self.doc_embs = embeddings
        self.row_of = {str(doc_id): row for row, doc_id in enumerate(corpus.ids.tolist())}

    def __len__(self) -> int:
        return len(self.corpus)

    def rows(self, ids: Sequence[str]) -> np.ndarray:
        missing = [doc_id for doc_id in ids if doc_id not in self.row_of]
        if missing:
            raise ConfigError(f"{len(missing)} document id(s) are not in the indexed corpus (first: {missing[0][:80]!r}); "
                              "pass ids the service indexed, or send the documents' texts instead.")
        return np.fromiter((self.row_of[doc_id] for doc_id in ids), dtype=np.int64, count=len(ids))

    def texts(self, ids: Sequence[str]) -> list[str]:
        return [f"{self.corpus.titles[row]} {self.corpus.texts[row]}".strip() for row in self.rows(ids)]

    def embeddings(self, ids: Sequence[str]) -> np.ndarray:
        return np.asarray(self.doc_embs[self.rows(ids)], dtype=np.float32)


@dataclass
class Service:
    """A retriever, its explainer and (optionally) the indexed documents: the model work behind every route.

    Not thread-safe: `create_app` runs its calls one at a time."""

    retriever: Retriever
    explainer: Explainer
    documents: Documents | None = None
    name: str = "imrnn"

    @classmethod
    def open(cls, checkpoint: str | Path, dataset: str | Path | None = None, *, candidates: int = 100,
             vocabulary: str = "encoder", data_dir: str | Path | None = None, cache_dir: str | Path | None = None,
             download: bool = True, device: str = "cpu", batch_size: int | None = None, progress: bool = True) -> "Service":
        """Load a checkpoint once; with `dataset`, also index its corpus (embeddings come from the cache)."""
        from .workspace import Workspace

        retriever = IMRNNRetriever.from_pretrained(checkpoint, device, candidates=candidates, cache_dir=cache_dir,
                                                   batch_size=batch_size)
        documents = None
        if dataset is not None:
            workspace = Workspace.open(dataset, retriever.encoder, candidates, data_dir=data_dir, cache_dir=cache_dir,
                                       download=download, progress=progress)
            retriever.index_embeddings(workspace.doc_embs, workspace.dataset.corpus.ids)
            documents = CorpusDocuments(workspace.dataset.corpus, workspace.doc_embs)
        explainer = Explainer(retriever.checkpoint, retriever.encoder, vocabulary=vocabulary, cache_dir=cache_dir,
                              device=device, progress=progress)
        return cls(retriever, explainer, documents, Path(checkpoint).name)

    def warm(self) -> None:
        """Load the encoder and build the concept vocabulary now, so that no request pays for them."""
        self.retriever.encoder.encode_queries(["warm-up"])
        self.explainer.vocabulary  # noqa: B018 - a cached property: built (or read from the cache) once

    def indexed(self, what: str) -> Documents:
        if self.documents is None:
            raise NoDocumentsError(f"{what} needs indexed documents and this service has none: start it with "
                                   "`imrnn serve --dataset NAME`, or send the documents' texts.")
        return self.documents

    def explain(self, query: str, ids: Sequence[str] | None = None, texts: Sequence[str] | None = None, *,
                top: int = 10, concepts: int = 10, doc_words: int = 1) -> Explanation:
        """Explain the re-ranking of the given documents (`texts`, or `ids` of indexed ones), or, given neither, of
        the first stage's top `retriever.candidates` in the indexed corpus."""
        embs = None
        if texts is None:
            documents = self.indexed("Explaining without document texts")
            if ids is None:
                ids = self.retriever.search([query], k=self.retriever.candidates)[0].ids
            texts, embs = documents.texts(ids), documents.embeddings(ids)
        elif ids is None:
            ids = [str(i) for i in range(len(texts))]
        return self.explainer.explain(query, list(ids), list(texts), embs, top=top, concepts=concepts, doc_words=doc_words)


# --------------------------------------------------------------------------- request and response models


def _not_blank(text: str) -> str:
    if not text.strip():
        raise ValueError("must contain a non-space character")
    return text


QueryText = Annotated[str, StringConstraints(min_length=1, max_length=LIMITS.query_chars), AfterValidator(_not_blank)]
DocId = Annotated[str, StringConstraints(min_length=1, max_length=LIMITS.id_chars)]
DocText = Annotated[str, StringConstraints(min_length=1, max_length=LIMITS.text_chars)]
K = Annotated[int, Field(ge=1, le=LIMITS.k, description="Results per query.")]


class _Strict(BaseModel):
    """Requests: unknown fields are errors, and no type is coerced (0 is not false, "10" is not 10)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class DocumentIn(_Strict):
    """A candidate document given as text; `id` defaults to its position ("0", "1", ...)."""

    id: DocId | None = None
    text: DocText


def _document_ids(documents: Sequence[DocumentIn]) -> list[str]:
    """Given ids, or positions when none are given; all or none must have an id, and ids must be unique."""
    given = [d.id for d in documents if d.id is not None]
    if given and len(given) != len(documents):
        raise ValueError(f"{len(given)} of {len(documents)} documents have an id: give an id to every document or to none")
    ids = given or [str(i) for i in range(len(documents))]
    if len(set(ids)) != len(ids):
        raise ValueError("document ids must be unique: a ranking lists each document once")
    return ids


class TextCandidates(_Strict):
    """One query and its candidates as texts (embedded on the fly)."""

    query: QueryText
    documents: list[DocumentIn] = Field(min_length=1, max_length=LIMITS.candidates)

    @model_validator(mode="after")
    def _ids(self) -> "TextCandidates":
        _document_ids(self.documents)
        return self


class IdCandidates(_Strict):
    """One query and its candidates as ids of indexed documents (their stored embeddings are re-ranked)."""

    query: QueryText
    ids: list[DocId] = Field(min_length=1, max_length=LIMITS.candidates)


def _candidate_kind(item: Any) -> str | None:
    """Which candidates a rerank item holds: "documents" (texts) or "ids"; None when it has neither or both."""
    keys = {key for key in ("documents", "ids") if (item.get(key) if isinstance(item, dict) else getattr(item, key, None)) is not None}
    return keys.pop() if len(keys) == 1 else None


Candidates = Annotated[
    Annotated[TextCandidates, Tag("documents")] | Annotated[IdCandidates, Tag("ids")],
    Discriminator(_candidate_kind, custom_error_type="candidates",
                  custom_error_message="each query needs its candidates as documents (texts) or as ids, exactly one of them"),
]


class SearchRequest(_Strict):
    queries: list[QueryText] = Field(min_length=1, max_length=LIMITS.queries)
    k: K = 10
    include_text: bool = Field(False, description="Return each hit's document text.")


class RerankRequest(_Strict):
    queries: list[Candidates] = Field(min_length=1, max_length=LIMITS.queries)
    k: K | None = Field(None, description="Results per query (default: all candidates).")
    include_text: bool = Field(False, description="Return each hit's document text.")

    @model_validator(mode="after")
    def _texts(self) -> "RerankRequest":
        total = sum(len(q.documents) for q in self.queries if isinstance(q, TextCandidates))
        if total > LIMITS.texts:
            raise ValueError(f"at most {LIMITS.texts} document texts per request, got {total}: split the batch, or send ids "
                             "of indexed documents")
        return self


class ExplainRequest(_Strict):
    """Explain one query's re-ranking: of `documents` (texts), of `ids` (indexed documents), or, given neither, of
    the first stage's candidates in the indexed corpus."""

    query: QueryText
    documents: list[DocumentIn] | None = Field(None, min_length=1, max_length=LIMITS.texts)
    ids: list[DocId] | None = Field(None, min_length=1, max_length=LIMITS.candidates)
    top: int = Field(10, ge=1, le=LIMITS.top, description="Show the adapted and the base top-N candidates.")
    concepts: int = Field(10, ge=0, le=LIMITS.concepts, description="Concepts per list.")
    doc_words: int = Field(1, ge=0, le=LIMITS.doc_words, description="Documents given word attributions.")

    @model_validator(mode="after")
    def _one_source(self) -> "ExplainRequest":
        if self.documents is not None and self.ids is not None:
            raise ValueError("give documents (texts) or ids (indexed documents), not both")
        if self.documents is not None:
            _document_ids(self.documents)
        elif self.ids is not None and len(set(self.ids)) != len(self.ids):
            raise ValueError("ids must be unique: an explanation lists each document once")
        return self


class Hit(BaseModel):
    id: str
    score: float = Field(description="Adapted score (IMRNN).")
    base_score: float = Field(description="The frozen retriever's cosine.")
    text: str | None = Field(None, description="The document's text, when include_text is set.")


class QueryResult(BaseModel):
    query: str
    hits: list[Hit]


class Results(BaseModel):
    results: list[QueryResult]


class Health(BaseModel):
    status: str
    version: str
    checkpoint: str
    encoder: str
    dimension: int
    candidates: int = Field(description="First-stage candidates re-ranked per query.")
    documents: int | None = Field(description="Indexed documents (null: none; search and ids need them).")
    limits: dict[str, int]


class ErrorDetail(BaseModel):
    location: str
    message: str


class ErrorBody(BaseModel):
    """Every 4xx answer: a short code, a message saying what was wrong and how to fix it, and per-field details."""

    error: str
    message: str
    details: list[ErrorDetail] = []


# --------------------------------------------------------------------------- the app


def _result(query: str, ranking: Ranking, texts: Sequence[str] | None = None) -> QueryResult:
    shown = texts if texts is not None else [None] * len(ranking.ids)
    return QueryResult(query=query, hits=[Hit(id=i, score=float(s), base_score=float(b), text=t)
                                          for i, s, b, t in zip(ranking.ids, ranking.scores, ranking.base_scores, shown)])


def _head(ranking: Ranking, k: int) -> Ranking:
    return Ranking(ranking.ids[:k], ranking.scores[:k], ranking.base_scores[:k])


@dataclass
class _Waiting:
    """A /search request waiting for the next batch."""

    queries: list[str]
    k: int
    future: asyncio.Future = field(repr=False)


def _search_batch(retriever: Retriever, batch: Sequence[_Waiting]) -> list[list[Ranking] | Exception]:
    """One search for the queries of every request of `batch` (all of one first-stage depth), split back per request.
    Should it fail, each request runs alone, so that one request's error never fails the others."""
    if len(batch) > 1:
        try:
            rankings = iter(retriever.search([q for w in batch for q in w.queries], k=max(w.k for w in batch)))
            return [[_head(next(rankings), w.k) for _ in w.queries] for w in batch]
        except IMRNNError:
            pass
    out: list[list[Ranking] | Exception] = []
    for waiting in batch:
        try:
            out.append(retriever.search(waiting.queries, k=waiting.k))
        except Exception as err:  # noqa: BLE001 - handed to that request, whose handler answers it
            out.append(err)
    return out


class _SearchBatcher:
    """Coalesces concurrent /search requests: while one batch runs in a worker thread, the requests that arrive wait
    together and go as the next batch (one encoder pass and one re-ranking pass for all of them). Nothing waits for
    company: a request that finds the model idle runs at once. Requests are grouped by first-stage depth
    (max(candidates, k)), so a batch returns exactly what each request would get alone, up to float rounding."""

    def __init__(self, service: Service, limiter: anyio.CapacityLimiter, max_queries: int = 4 * LIMITS.queries) -> None:
        self.service, self.limiter, self.max_queries = service, limiter, max_queries
        self.waiting: list[_Waiting] = []
        self.task: asyncio.Task | None = None

    async def search(self, queries: list[str], k: int) -> list[Ranking]:
        loop = asyncio.get_running_loop()
        waiting = _Waiting(queries, k, loop.create_future())
        self.waiting.append(waiting)
        if self.task is None:
            self.task = loop.create_task(self._drain())
        return await waiting.future

    def _depth(self, waiting: _Waiting) -> int:
        return max(self.service.retriever.candidates, waiting.k)

    def _next_batch(self) -> list[_Waiting]:
        depth, size = self._depth(self.waiting[0]), 0
        batch, rest = [], []
        for waiting in self.waiting:
            if self._depth(waiting) == depth and (not batch or size + len(waiting.queries) <= self.max_queries):
                batch.append(waiting)
                size += len(waiting.queries)
            else:
                rest.append(waiting)
        self.waiting = rest
        return batch

    async def _drain(self) -> None:
        try:
            while self.waiting:
                batch = self._next_batch()
                try:
                    results = await anyio.to_thread.run_sync(_search_batch, self.service.retriever, batch, limiter=self.limiter)
                except Exception as err:  # noqa: BLE001 - a failure of the batch call itself reaches every request
                    results = [err] * len(batch)
                for waiting, result in zip(batch, results):
                    if waiting.future.done():  # the client went away
                        continue
                    if isinstance(result, Exception):
                        waiting.future.set_exception(result)
                    else:
                        waiting.future.set_result(result)
        finally:
            self.task = None


def _rerank(service: Service, request: RerankRequest) -> Results:
    """Text candidates one query at a time (each embeds its texts); id candidates in one batched pass."""
    by_id = [i for i, q in enumerate(request.queries) if isinstance(q, IdCandidates)]
    out: dict[int, QueryResult] = {}
    if by_id:
        documents = service.indexed("Re-ranking candidates given by id")
        queries = [request.queries[i] for i in by_id]
        embs = service.retriever.encoder.encode_queries([q.query for q in queries])
        rankings = service.retriever.rerank_ids(embs, [q.ids for q in queries], k=request.k)
        out.update((i, _result(q.query, r, documents.texts(r.ids) if request.include_text else None))
                   for i, q, r in zip(by_id, queries, rankings))
    for i, item in enumerate(request.queries):
        if isinstance(item, TextCandidates):
            ids = _document_ids(item.documents)
            ranking = service.retriever.rerank(item.query, [d.text for d in item.documents], ids)
            if request.k is not None:
                ranking = _head(ranking, request.k)
            text_of = dict(zip(ids, (d.text for d in item.documents)))
            out[i] = _result(item.query, ranking, [text_of[d] for d in ranking.ids] if request.include_text else None)
    return Results(results=[out[i] for i in range(len(request.queries))])


def _explain(service: Service, request: ExplainRequest) -> Explanation:
    texts = [d.text for d in request.documents] if request.documents is not None else None
    ids = _document_ids(request.documents) if request.documents is not None else request.ids
    return service.explain(request.query, ids, texts, top=request.top, concepts=request.concepts, doc_words=request.doc_words)


def _error(status: int, message: str, details: Sequence[ErrorDetail] = (), headers: Mapping[str, str] | None = None) -> JSONResponse:
    code = http.HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
    body = ErrorBody(error=code, message=message, details=list(details))
    return JSONResponse(body.model_dump(), status_code=status, headers=dict(headers or {}))


def _detail(error: Mapping[str, Any]) -> ErrorDetail:
    """One pydantic error as location + message, with (a clipped repr of) what was received."""
    loc = [str(part) for part in error.get("loc", ())]
    if error.get("type") == "json_invalid":
        return ErrorDetail(location="body", message=f"Invalid JSON at character {loc[-1]}: {error.get('ctx', {}).get('error', '')}")
    message = error.get("msg", "invalid")
    if error.get("type") != "missing" and "input" in error:
        text = repr(error["input"])
        message += f" (received {text[:80]}{'...' if len(text) > 80 else ''})"
    return ErrorDetail(location=".".join(loc), message=message)


async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    details = [_detail(e) for e in exc.errors()]
    shown = "; ".join(f"{d.location}: {d.message}" for d in details[:5]) + ("; ..." if len(details) > 5 else "")
    return _error(422, f"The request does not match the schema ({len(details)} problem(s)): {shown}. "
                       "See GET /openapi.json for the expected request.", details)


async def _http_error(_request: Request, exc: HTTPException) -> JSONResponse:
    return _error(exc.status_code, str(exc.detail), headers=exc.headers)


async def _library_error(_request: Request, exc: IMRNNError) -> JSONResponse:
    return _error(409 if isinstance(exc, NoDocumentsError) else 400, str(exc))


class _BodyLimit:
    """ASGI middleware: a request body larger than `limit` bytes is refused with 413 before anything parses it.

    The rest of the body is read and dropped (up to 4x `limit`; past that the connection is simply closed), so that
    a client still sending it reads the 413 rather than a reset connection."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        received = 0

        async def counted() -> dict:
            nonlocal received
            if declared.isdigit() and int(declared) > self.limit:
                await self._drop_rest(receive)
                raise HTTPException(413, self._message(int(declared)))
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                if message.get("more_body", False):
                    await self._drop_rest(receive)
                raise HTTPException(413, self._message(received))
            return message

        await self.app(scope, counted, send)

    async def _drop_rest(self, receive: Callable) -> None:
        dropped = 0
        while dropped <= 4 * self.limit:
            message = await receive()
            dropped += len(message.get("body", b""))
            if not message.get("more_body", False):
                return

    def _message(self, size: int) -> str:
        return f"The request body has {size} bytes; at most {self.limit} are accepted. Split the request into smaller batches."


_ERRORS: dict[int | str, dict[str, Any]] = {"4XX": {"model": ErrorBody, "description": "The request was wrong; the body says how."}}
# Routes answering HTML document their JSON errors explicitly (a `model` would take the route's media type).
_HTML_ERRORS: dict[int | str, dict[str, Any]] = {"4XX": {
    "description": _ERRORS["4XX"]["description"],
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
}}


def create_app(service: Service) -> FastAPI:
    """The FastAPI app over a loaded `Service`. Its model work runs in worker threads, one call at a time (the
    service is not thread-safe, and one call already uses all of torch's threads)."""
    limiter = anyio.CapacityLimiter(1)
    app = FastAPI(title="imrnn", version=__version__, description=(
        "Interpretable re-ranking with IMRNN adapters over a frozen dense retriever: search an indexed corpus, "
        "re-rank candidates from any first stage, and explain why a ranking changed."))
    app.add_middleware(_BodyLimit, limit=LIMITS.body_bytes)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(IMRNNError, _library_error)

    batcher = _SearchBatcher(service, limiter)

    async def run(work: Callable[..., _T], *args: Any) -> _T:
        return await anyio.to_thread.run_sync(functools.partial(work, service, *args), limiter=limiter)

    @app.get("/health", response_model=Health)
    async def health() -> Health:
        """The service is up; what it serves and the request limits."""
        encoder = service.retriever.encoder
        return Health(status="ok", version=__version__, checkpoint=service.name, encoder=encoder.config.model,
                      dimension=service.retriever.checkpoint.model_config.embedding_dim,
                      candidates=service.retriever.candidates,
                      documents=None if service.documents is None else len(service.documents), limits=asdict(LIMITS))

    @app.post("/search", response_model=Results, response_model_exclude_none=True, responses=_ERRORS)
    async def search(request: SearchRequest) -> Results:
        """Top-k indexed documents per query: the frozen first stage's candidates re-ranked by the adapters."""
        documents = service.indexed("Search")
        rankings = await batcher.search(request.queries, request.k)
        return Results(results=[_result(q, r, documents.texts(r.ids) if request.include_text else None)
                                for q, r in zip(request.queries, rankings)])

    @app.post("/rerank", response_model=Results, response_model_exclude_none=True, responses=_ERRORS)
    async def rerank(request: RerankRequest) -> Results:
        """Re-rank candidates found elsewhere, per query: texts (embedded now) or ids of indexed documents."""
        return await run(_rerank, request)

    @app.post("/explain", response_model=Explanation, responses=_ERRORS)
    async def explain(request: ExplainRequest) -> Explanation:
        """Why the adapters re-ranked one query's candidates: score split, concepts, word attributions."""
        return await run(_explain, request)

    @app.get("/explain", response_class=HTMLResponse, responses=_HTML_ERRORS)
    async def explain_page(query: Annotated[QueryText, Query(description="The query to explain.")],
                           top: Annotated[int, Query(ge=1, le=LIMITS.top)] = 10,
                           concepts: Annotated[int, Query(ge=0, le=LIMITS.concepts)] = 10,
                           doc_words: Annotated[int, Query(ge=0, le=LIMITS.doc_words)] = 1) -> HTMLResponse:
        """The HTML report explaining one query over the indexed corpus's first-stage candidates."""
        from .report import render_html

        request = ExplainRequest(query=query, top=top, concepts=concepts, doc_words=doc_words)
        return HTMLResponse(render_html(await run(_explain, request), top=top))

    return app


def serve(checkpoint: str | Path, dataset: str | Path | None = None, host: str = "127.0.0.1", port: int = 8000, *,
          candidates: int = 100, vocabulary: str = "encoder", data_dir: str | Path | None = None,
          cache_dir: str | Path | None = None, download: bool = True, device: str = "cpu", threads: int | None = None,
          log_level: str = "info", log: Callable[[str], None] = print) -> None:
    """`imrnn serve`: load the checkpoint (and dataset) once, warm the model, then serve until interrupted.
    `port=0` picks a free port; uvicorn logs the one it bound. `threads` sets torch's intra-op threads (default:
    torch's choice, one per core); on a machine shared with other busy processes 1 is much faster."""
    try:
        import uvicorn
    except ImportError as err:  # pragma: no cover - depends on the installed extras
        raise ImportError(f"imrnn serve needs the serve extra: pip install 'imrnn[serve]' ({err}).") from err
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"threads must be at least 1, got {threads}.")
        import torch

        torch.set_num_threads(threads)
    service = Service.open(checkpoint, dataset, candidates=candidates, vocabulary=vocabulary, data_dir=data_dir,
                           cache_dir=cache_dir, download=download, device=device)
    log(f"loaded {service.name}: {'no' if service.documents is None else len(service.documents)} indexed documents; warming up")
    service.warm()
    uvicorn.run(create_app(service), host=host, port=port, log_level=log_level)
