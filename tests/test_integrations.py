"""LangChain and LlamaIndex integrations: LangChain's standard retriever and embeddings suites, the re-ranker
inside ContextualCompressionRetriever, the node postprocessor inside a real VectorStoreIndex query engine (bundled
MiniLM, MockLLM: no network), stored embeddings vs texts, clear errors, and the README's integration examples."""

from __future__ import annotations

import asyncio
import importlib
import re
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("langchain_core", reason="needs the langchain extra: pip install -e '.[dev]'")
pytest.importorskip("llama_index.core", reason="needs the llama-index extra: pip install -e '.[dev]'")

from langchain_classic.retrievers import ContextualCompressionRetriever
from langchain_core.documents import Document
from langchain_core.vectorstores import InMemoryVectorStore
from langchain_tests.integration_tests import EmbeddingsIntegrationTests, RetrieversIntegrationTests
from langchain_tests.unit_tests import EmbeddingsUnitTests
from llama_index.core import Document as LlamaDocument
from llama_index.core import VectorStoreIndex
from llama_index.core.llms import MockLLM
from llama_index.core.query_engine import RetrieverQueryEngine
from llama_index.core.schema import NodeWithScore, TextNode
from pydantic import ValidationError

from conftest import TINY_DOCS, randomised
from imrnn.checkpoint import Checkpoint, save_checkpoint
from imrnn.config import EncoderConfig, IMRNNConfig
from imrnn.errors import ConfigError
from imrnn.integrations.langchain import IMRNNEmbeddings, IMRNNLangChainRetriever, IMRNNReranker
from imrnn.integrations.llama_index import IMRNNEmbedding, IMRNNNodePostprocessor
from imrnn.model import IMRNN
from imrnn.retriever import IMRNNRetriever

README = Path(__file__).resolve().parents[1] / "README.md"
IDS = list(TINY_DOCS)
TEXTS = [text for _, text in TINY_DOCS.values()]
QUERY = "What is the currency of Mexico?"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def imrnn_retriever(tmp_path_factory) -> IMRNNRetriever:
    """A randomised (really re-ranking) adapter over the bundled MiniLM, indexed with the twenty tiny documents."""
    model = randomised(IMRNN(IMRNNConfig(embedding_dim=384, hidden_dim=16)))
    # batch_size=1: no padding, so a text's embedding never depends on which texts share its batch, and the
    # stored-vector and text paths can be compared to float32 rounding
    retriever = IMRNNRetriever(Checkpoint(model, EncoderConfig()), candidates=20, batch_size=1,
                               cache_dir=tmp_path_factory.mktemp("integrations-cache"))
    return retriever.index(dict(zip(IDS, TEXTS)), progress=False)


@pytest.fixture(scope="module")
def lc_docs() -> list[Document]:
    return [Document(page_content=text, id=doc_id, metadata={"title": title})
            for doc_id, (title, text) in TINY_DOCS.items()]


def scores_by_id(ids, scores) -> dict[str, float]:
    return {str(doc_id): float(score) for doc_id, score in zip(ids, scores)}


def assert_same_ranking(ids, scores, expected_ids, expected_scores) -> None:
    """Same documents with the same scores (to float32 rounding), listed best first; near-ties may swap places."""
    assert np.all(np.diff(np.asarray(scores, dtype=np.float64)) <= 1e-6)
    got, want = scores_by_id(ids, scores), scores_by_id(expected_ids, expected_scores)
    assert got.keys() == want.keys()
    np.testing.assert_allclose([got[i] for i in want], list(want.values()), atol=1e-5)


# --------------------------------------------------------------------------- LangChain's standard test suites


@pytest.mark.asyncio  # the suites' async tests run under pytest-asyncio (strict mode); sync ones ignore the mark
@pytest.mark.filterwarnings("ignore:The test <Function .*is marked with '@pytest.mark.asyncio' but it is not an async")
class TestIMRNNLangChainRetrieverStandard(RetrieversIntegrationTests):
    @pytest.fixture(autouse=True)
    def _built(self, imrnn_retriever, lc_docs) -> None:
        self.params = {"retriever": imrnn_retriever, "documents": {doc.id: doc for doc in lc_docs}}

    @property
    def retriever_constructor(self) -> type[IMRNNLangChainRetriever]:
        return IMRNNLangChainRetriever

    @property
    def retriever_constructor_params(self) -> dict:
        return self.params

    @property
    def retriever_query_example(self) -> str:
        return QUERY


class _IMRNNEmbeddingsParams:
    """What both embeddings suites need: IMRNNEmbeddings over the test retriever's encoder."""

    @pytest.fixture(autouse=True)
    def _built(self, imrnn_retriever) -> None:
        self.params = {"encoder": imrnn_retriever.encoder}

    @property
    def embeddings_class(self) -> type[IMRNNEmbeddings]:
        return IMRNNEmbeddings

    @property
    def embedding_model_params(self) -> dict:
        return self.params


@pytest.mark.asyncio
@pytest.mark.filterwarnings("ignore:The test <Function .*is marked with '@pytest.mark.asyncio' but it is not an async")
class TestIMRNNEmbeddingsStandard(_IMRNNEmbeddingsParams, EmbeddingsIntegrationTests):
    pass


class TestIMRNNEmbeddingsUnitStandard(_IMRNNEmbeddingsParams, EmbeddingsUnitTests):
    pass


# --------------------------------------------------------------------------- LangChain


def test_langchain_retriever_returns_imrnn_search_results_with_scores(imrnn_retriever, lc_docs):
    retriever = IMRNNLangChainRetriever(retriever=imrnn_retriever, documents={doc.id: doc for doc in lc_docs}, k=5)
    found = retriever.invoke(QUERY)
    expected = imrnn_retriever.search(QUERY, k=5)[0]
    assert [doc.id for doc in found] == expected.ids
    np.testing.assert_allclose([doc.metadata["relevance_score"] for doc in found], expected.scores, atol=1e-6)
    np.testing.assert_allclose([doc.metadata["base_score"] for doc in found], expected.base_scores, atol=1e-6)
    by_id = {doc.id: doc for doc in lc_docs}
    assert all(doc.page_content == by_id[doc.id].page_content and doc.metadata["title"] == by_id[doc.id].metadata["title"]
               for doc in found)
    assert "relevance_score" not in lc_docs[0].metadata  # results are copies
    assert len(retriever.invoke(QUERY, k=2)) == 2 and len(retriever.batch([QUERY, "capital of Japan"])) == 2


def test_langchain_from_documents_indexes_stored_embeddings_or_texts(imrnn_retriever, lc_docs, tmp_path):
    fresh = IMRNNRetriever(imrnn_retriever.checkpoint, candidates=20, batch_size=1, cache_dir=tmp_path)
    fresh.encoder = imrnn_retriever.encoder  # the same loaded model (saves a second load)
    by_text = IMRNNLangChainRetriever.from_documents(lc_docs, fresh, k=6).invoke(QUERY)
    vectors = np.array(fresh.doc_embs).tolist()  # the vectors the text indexing computed (ids in lc_docs order)
    # half the documents carry their vector: those are indexed as given, the rest embedded
    carrying = [Document(doc.page_content, id=doc.id, metadata={"embedding": vec} if i % 2 else {})
                for i, (doc, vec) in enumerate(zip(lc_docs, vectors))]
    by_vector = IMRNNLangChainRetriever.from_documents(carrying, fresh, k=6).invoke(QUERY)
    assert_same_ranking([d.id for d in by_vector], [d.metadata["relevance_score"] for d in by_vector],
                        [d.id for d in by_text], [d.metadata["relevance_score"] for d in by_text])
    positional = IMRNNLangChainRetriever.from_documents([Document("Bees make honey."), Document("Paris is in France.")],
                                                        fresh, k=1)
    assert [doc.id for doc in positional.invoke("capital of France")] in (["0"], ["1"])


def test_langchain_retriever_refuses_bad_construction(imrnn_retriever, lc_docs):
    docs = {doc.id: doc for doc in lc_docs}
    unindexed = IMRNNRetriever(imrnn_retriever.checkpoint)
    with pytest.raises(ValidationError, match=r"not indexed: call retriever.index"):
        IMRNNLangChainRetriever(retriever=unindexed, documents=docs)
    with pytest.raises(ValidationError, match=r"1 indexed document ids have no Document .*'d9'"):
        IMRNNLangChainRetriever(retriever=imrnn_retriever, documents={k: v for k, v in docs.items() if k != "d9"})
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        IMRNNLangChainRetriever(retriever=imrnn_retriever, documents=docs, k=0)
    with pytest.raises(ConfigError, match="k must be at least 1, got 0"):
        IMRNNLangChainRetriever(retriever=imrnn_retriever, documents=docs).invoke(QUERY, k=0)
    with pytest.raises(ValueError, match="at least one Document"):
        IMRNNLangChainRetriever.from_documents([], imrnn_retriever)
    with pytest.raises(TypeError, match="imrnn Encoder .*got str"):
        IMRNNEmbeddings("all-MiniLM-L6-v2")


def test_reranker_matches_imrnn_rerank_and_keeps_top_n(imrnn_retriever, lc_docs):
    docs = lc_docs[:8] + [lc_docs[15]]  # the peso document among eight others
    reranked = IMRNNReranker(retriever=imrnn_retriever).compress_documents(docs, QUERY)
    expected = imrnn_retriever.rerank(QUERY, [doc.page_content for doc in docs], ids=[doc.id for doc in docs])
    assert_same_ranking([d.id for d in reranked], [d.metadata["relevance_score"] for d in reranked],
                        expected.ids, expected.scores)
    np.testing.assert_allclose([d.metadata["base_score"] for d in reranked],
                               [scores_by_id(expected.ids, expected.base_scores)[d.id] for d in reranked], atol=1e-5)
    assert [d.id for d in reranked] != [d.id for d in docs]  # the adapter really re-orders
    top = IMRNNReranker(retriever=imrnn_retriever, top_n=3).compress_documents(docs, QUERY)
    assert [d.id for d in top] == [d.id for d in reranked[:3]] and top[0].metadata["title"] == reranked[0].metadata["title"]
    assert IMRNNReranker(retriever=imrnn_retriever).compress_documents([], QUERY) == []


def test_reranker_uses_stored_embeddings_and_embeds_the_rest(imrnn_retriever, lc_docs):
    """A document whose stored vector is the peso text's scores as the peso document, whatever its own text says."""
    peso_vector = IMRNNEmbeddings(imrnn_retriever.encoder).embed_documents([TINY_DOCS["d16"][1]])[0]
    docs = [Document("Bees make honey in wax combs.", id="decoy", metadata={"embedding": peso_vector}),
            lc_docs[15], lc_docs[0], lc_docs[6]]
    reranked = {d.id: d.metadata["relevance_score"] for d in IMRNNReranker(retriever=imrnn_retriever).compress_documents(docs, QUERY)}
    assert reranked["decoy"] == pytest.approx(reranked["d16"], abs=1e-5)
    ignoring = IMRNNReranker(retriever=imrnn_retriever, embedding_key=None).compress_documents(docs, QUERY)
    assert {d.id: d.metadata["relevance_score"] for d in ignoring}["decoy"] != pytest.approx(reranked["d16"], abs=1e-3)


@pytest.mark.parametrize("vector, message", [
    ([0.1] * 10, r"must be 384-d vectors .*got shape \(10,\) \(candidate 1\)"),
    (["a"] * 384, r"must be 384 numbers each"),
    ([float("nan")] * 384, r"stored embedding of candidate 1 holds NaN"),
])
def test_reranker_explains_a_bad_stored_embedding(imrnn_retriever, lc_docs, vector, message):
    docs = [lc_docs[0], Document("text", metadata={"embedding": vector})]
    with pytest.raises(ConfigError, match=message):
        IMRNNReranker(retriever=imrnn_retriever).compress_documents(docs, QUERY)


def test_reranker_in_contextual_compression_retriever(imrnn_retriever, lc_docs):
    store = InMemoryVectorStore.from_documents(lc_docs, IMRNNEmbeddings(imrnn_retriever.encoder))
    base = store.as_retriever(search_kwargs={"k": 8})
    reranker = IMRNNReranker(retriever=imrnn_retriever, top_n=3)
    compressed = ContextualCompressionRetriever(base_compressor=reranker, base_retriever=base)
    first_stage = base.invoke(QUERY)
    expected = reranker.compress_documents(first_stage, QUERY)
    found = compressed.invoke(QUERY)
    assert [d.id for d in found] == [d.id for d in expected] and len(found) == 3
    assert [d.id for d in found] != [d.id for d in first_stage[:3]]  # re-ranked, not the vector store's order
    assert [d.id for d in asyncio.run(compressed.ainvoke(QUERY))] == [d.id for d in found]


@pytest.mark.parametrize("module, package, extra", [
    ("imrnn.integrations.langchain", "langchain_core", "imrnn[langchain]"),
    ("imrnn.integrations.llama_index", "llama_index", "imrnn[llama-index]"),
])
def test_missing_extra_names_the_install_command(monkeypatch, module, package, extra):
    for name in [name for name in sys.modules if name == package or name.startswith(package + ".")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, module)
    with pytest.raises(ImportError, match=re.escape(f"pip install '{extra}'")):
        importlib.import_module(module)


# --------------------------------------------------------------------------- LlamaIndex


@pytest.fixture(scope="module")
def llama_index(imrnn_retriever) -> VectorStoreIndex:
    documents = [LlamaDocument(text=text, id_=doc_id) for doc_id, text in zip(IDS, TEXTS)]
    return VectorStoreIndex.from_documents(documents, embed_model=IMRNNEmbedding(imrnn_retriever.encoder))


def test_postprocessor_reranks_inside_a_vector_store_query_engine(imrnn_retriever, llama_index):
    """The real query engine: retrieve 8 by MiniLM, re-rank by IMRNN, synthesise (MockLLM echoes its prompt)."""
    plain = llama_index.as_query_engine(llm=MockLLM(), similarity_top_k=8).query(QUERY)
    engine = llama_index.as_query_engine(llm=MockLLM(), similarity_top_k=8,
                                         node_postprocessors=[IMRNNNodePostprocessor(retriever=imrnn_retriever, top_n=3)])
    response = engine.query(QUERY)
    retrieved = [item.node for item in plain.source_nodes]
    expected = imrnn_retriever.rerank(QUERY, [node.get_content() for node in retrieved],
                                      ids=[node.ref_doc_id for node in retrieved])
    got_ids = [item.node.ref_doc_id for item in response.source_nodes]
    assert len(got_ids) == 3
    assert_same_ranking(got_ids, [item.score for item in response.source_nodes], expected.ids[:3], expected.scores[:3])
    assert got_ids != [node.ref_doc_id for node in retrieved[:3]]  # not the vector store's order
    prompt = str(response)  # the synthesiser saw exactly the re-ranked nodes, in that order
    positions = [prompt.index(TINY_DOCS[doc_id][1]) for doc_id in got_ids]
    assert positions == sorted(positions) and all(TINY_DOCS[d][1] not in prompt for d in set(IDS) - set(got_ids))


def test_postprocessor_in_async_query_and_retriever_query_engine(imrnn_retriever, llama_index):
    post = IMRNNNodePostprocessor(retriever=imrnn_retriever, top_n=4)
    engine = llama_index.as_query_engine(llm=MockLLM(), similarity_top_k=8, node_postprocessors=[post])
    explicit = RetrieverQueryEngine.from_args(llama_index.as_retriever(similarity_top_k=8), llm=MockLLM(),
                                              node_postprocessors=[post])
    sync = [(item.node.ref_doc_id, item.score) for item in engine.query(QUERY).source_nodes]
    for response in (asyncio.run(engine.aquery(QUERY)), explicit.query(QUERY)):
        assert [item.node.ref_doc_id for item in response.source_nodes] == [i for i, _ in sync] and len(sync) == 4
        np.testing.assert_allclose([item.score for item in response.source_nodes], [s for _, s in sync], atol=1e-6)


def test_postprocessor_uses_node_embeddings_when_present(imrnn_retriever):
    embed = IMRNNEmbedding(imrnn_retriever.encoder)
    nodes = [NodeWithScore(node=TextNode(text=text, id_=doc_id), score=0.0) for doc_id, text in zip(IDS[:10], TEXTS[:10])]
    vectors = embed.get_text_embedding_batch(TEXTS[:10])
    with_vectors = [NodeWithScore(node=TextNode(text=text, id_=doc_id, embedding=vector), score=0.0)
                    for doc_id, text, vector in zip(IDS[:10], TEXTS[:10], vectors)]
    post = IMRNNNodePostprocessor(retriever=imrnn_retriever)
    by_text = post.postprocess_nodes(nodes, query_str=QUERY)
    by_vector = post.postprocess_nodes(with_vectors, query_str=QUERY)
    assert_same_ranking([n.node.node_id for n in by_vector], [n.score for n in by_vector],
                        [n.node.node_id for n in by_text], [n.score for n in by_text])
    # a node whose stored vector belongs to another text is scored by the vector
    decoy = NodeWithScore(node=TextNode(text="Bees make honey.", id_="decoy", embedding=vectors[0]), score=0.0)
    scored = {n.node.node_id: n.score for n in post.postprocess_nodes(with_vectors + [decoy], query_str=QUERY)}
    assert scored["decoy"] == pytest.approx(scored[IDS[0]], abs=1e-5)
    text_only = IMRNNNodePostprocessor(retriever=imrnn_retriever, use_node_embeddings=False)
    assert {n.node.node_id: n.score for n in text_only.postprocess_nodes([decoy], query_str=QUERY)}["decoy"] != \
        pytest.approx(scored[IDS[0]], abs=1e-3)
    assert embed.get_query_embedding(QUERY) == pytest.approx(imrnn_retriever.encoder.encode_queries([QUERY])[0].tolist())


def test_postprocessor_refuses_bad_input(imrnn_retriever):
    post = IMRNNNodePostprocessor(retriever=imrnn_retriever)
    node = NodeWithScore(node=TextNode(text="Bees make honey.", embedding=[0.5] * 8), score=1.0)
    with pytest.raises(ConfigError, match="re-ranks for a query but got none"):
        post.postprocess_nodes([node])
    with pytest.raises(ConfigError, match=r"must be 384-d vectors .*got shape \(8,\)"):
        post.postprocess_nodes([node], query_str=QUERY)
    assert post.postprocess_nodes([], query_str=QUERY) == []
    with pytest.raises(ValidationError):
        IMRNNNodePostprocessor(retriever=imrnn_retriever, top_n=0)


# --------------------------------------------------------------------------- README


def readme_integration_blocks() -> list[str]:
    section = re.search(r"## LangChain and LlamaIndex\n(.*?)\n## ", README.read_text(), re.S)
    assert section, "README must keep its section 'LangChain and LlamaIndex'"
    return re.findall(r"```python\n(.*?)```", section.group(1), re.S)


def test_readme_integration_examples_run(tmp_path, monkeypatch, capsys):
    """Every Python block of the README's integration section, in order, on an untrained (identity) checkpoint."""
    blocks = readme_integration_blocks()
    assert len(blocks) == 3
    save_checkpoint(Checkpoint(IMRNN(IMRNNConfig(embedding_dim=384)), EncoderConfig()), tmp_path / "checkpoints" / "scifact")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("IMRNN_CACHE_DIR", str(tmp_path / "cache"))
    namespace: dict = {}
    for number, block in enumerate(blocks):
        exec(compile(block, f"README.md (integration example {number + 1})", "exec"), namespace)
    printed = capsys.readouterr().out.splitlines()
    # an untrained adapter is the frozen MiniLM: the peso first, the insulin document for the hormone query
    assert printed[0].startswith("d1 ") and len([line for line in printed if line.startswith("d")]) == 2
    assert "['d2']" in printed and printed.count("['d2']") == 2
    sources = namespace["response"].source_nodes
    assert len(sources) == 2 and "peso" in sources[0].node.get_content()
    assert printed[-2].endswith(sources[0].node.get_content())
