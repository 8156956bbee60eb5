"""LangChain integration: IMRNN as a retriever, as a re-ranker of any other retriever's documents, and the
checkpoint's frozen encoder as an embedding model.

- `IMRNNLangChainRetriever` (a `BaseRetriever`): the frozen first stage over an indexed `imrnn.IMRNNRetriever`,
  re-ranked by the adapters; `k` documents per query (constructor or `invoke(query, k=...)`).
- `IMRNNReranker` (a `BaseDocumentCompressor`, for `ContextualCompressionRetriever`): re-ranks the documents another
  retriever found, using the embedding a document carries in `metadata["embedding"]` and embedding its text
  otherwise, all of one query's documents in one batched pass.
- `IMRNNEmbeddings` (an `Embeddings`): the checkpoint's encoder, for vector stores whose vectors IMRNN re-ranks.

Needs the extra: `pip install 'imrnn[langchain]'`.
"""

from __future__ import annotations

from typing import Any, Sequence

try:
    from langchain_core.callbacks import CallbackManagerForRetrieverRun, Callbacks
    from langchain_core.documents import BaseDocumentCompressor, Document
    from langchain_core.embeddings import Embeddings
    from langchain_core.retrievers import BaseRetriever
    from pydantic import ConfigDict, Field, model_validator
except ImportError as err:  # the optional extra is missing
    raise ImportError(f"imrnn.integrations.langchain needs langchain-core ({err}); install it with "
                      "pip install 'imrnn[langchain]'") from err

from ..encode import Encoder
from ..retriever import IMRNNRetriever
from . import candidate_embeddings, rerank_candidates

__all__ = ["IMRNNEmbeddings", "IMRNNLangChainRetriever", "IMRNNReranker"]


def _scored(document: Document, doc_id: str | None, score: float, base_score: float) -> Document:
    """A copy of `document` whose metadata also holds the adapted `relevance_score` and the frozen `base_score`."""
    metadata = {**document.metadata, "relevance_score": float(score), "base_score": float(base_score)}
    return Document(page_content=document.page_content, metadata=metadata, id=doc_id)


class IMRNNEmbeddings(Embeddings):
    """The checkpoint's frozen encoder (default: the bundled all-MiniLM-L6-v2) as a LangChain embedding model.

    Pass `retriever.encoder` so that stored vectors are the ones the adapters were trained on."""

    def __init__(self, encoder: Encoder | None = None) -> None:
        if encoder is not None and not isinstance(encoder, Encoder):
            raise TypeError(f"encoder must be an imrnn Encoder (e.g. retriever.encoder), got {type(encoder).__name__}.")
        self.encoder = encoder or Encoder()

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return self.encoder.encode(list(texts), self.encoder.config.passage_prefix).tolist()

    def embed_query(self, text: str) -> list[float]:
        return self.encoder.encode_queries([text])[0].tolist()


class IMRNNLangChainRetriever(BaseRetriever):
    """LangChain retriever over an indexed `imrnn.IMRNNRetriever`: frozen top-`candidates`, re-ranked, best `k`.

    `documents` maps every indexed id to its `Document` (the imrnn index keeps vectors, not texts); results are
    copies with `relevance_score` (adapted) and `base_score` (frozen cosine) added to their metadata.
    `from_documents` indexes a list of documents in one step."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    retriever: IMRNNRetriever
    documents: dict[str, Document]
    k: int = Field(default=4, ge=1)

    @model_validator(mode="after")
    def _every_indexed_id_has_a_document(self) -> "IMRNNLangChainRetriever":
        if self.retriever.doc_ids is None:
            raise ValueError("The IMRNNRetriever is not indexed: call retriever.index(...) first, or build this "
                             "retriever with IMRNNLangChainRetriever.from_documents(documents, retriever).")
        missing = set(self.retriever.doc_ids.tolist()) - self.documents.keys()
        if missing:
            raise ValueError(f"{len(missing)} indexed document ids have no Document in `documents` (e.g. "
                             f"{sorted(missing)[:3]}); map every id given to index() to its Document.")
        return self

    @classmethod
    def from_documents(cls, documents: Sequence[Document], retriever: IMRNNRetriever, k: int = 4,
                       embedding_key: str | None = "embedding", **kwargs: Any) -> "IMRNNLangChainRetriever":
        """Index `documents` into `retriever` and wrap it. A document's id is `Document.id`, else its position.

        When some documents carry a stored embedding in `metadata[embedding_key]` (from the checkpoint's
        encoder), those vectors are indexed and only the others' texts are embedded; otherwise the texts are
        embedded through imrnn's on-disk embedding cache."""
        docs = list(documents)
        if not docs:
            raise ValueError("from_documents() needs at least one Document.")
        ids = [doc.id if doc.id is not None else str(position) for position, doc in enumerate(docs)]
        stored = [doc.metadata.get(embedding_key) for doc in docs] if embedding_key else []
        if any(vector is not None for vector in stored):
            retriever.index_embeddings(candidate_embeddings(retriever, [doc.page_content for doc in docs], stored), ids)
        else:
            retriever.index([doc.page_content for doc in docs], ids=ids, progress=False)
        return cls(retriever=retriever, documents=dict(zip(ids, docs)), k=k, **kwargs)

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun,
                                k: int | None = None) -> list[Document]:
        ranking = self.retriever.search(query, k=self.k if k is None else k)[0]
        return [_scored(self.documents[doc_id], doc_id, score, base)
                for doc_id, score, base in zip(ranking.ids, ranking.scores, ranking.base_scores)]


class IMRNNReranker(BaseDocumentCompressor):
    """Re-ranks another retriever's documents with IMRNN adapters (use in `ContextualCompressionRetriever`).

    A document's vector is `metadata[embedding_key]` when present (it must come from the checkpoint's encoder,
    e.g. `IMRNNEmbeddings`), else its embedded `page_content`. Returns the best `top_n` (all when None) as copies
    with `relevance_score` (adapted) and `base_score` (frozen cosine) in their metadata."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    retriever: IMRNNRetriever
    top_n: int | None = Field(default=None, ge=1)
    embedding_key: str | None = "embedding"

    def compress_documents(self, documents: Sequence[Document], query: str,
                           callbacks: Callbacks | None = None) -> list[Document]:
        docs = list(documents)
        if not docs:
            return []
        stored = [doc.metadata.get(self.embedding_key) for doc in docs] if self.embedding_key else [None] * len(docs)
        order, scores, base = rerank_candidates(self.retriever, query, [doc.page_content for doc in docs], stored)
        return [_scored(docs[i], docs[i].id, score, base_score)
                for i, score, base_score in zip(order[: self.top_n], scores, base)]
