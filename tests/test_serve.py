"""The HTTP service: the real `imrnn serve` on a free port, checked against the library, fuzzed by schemathesis
from its own OpenAPI schema, its /explain page rendered in headless Chromium, a short locust load; and the app
over a stand-in retriever for request batching, error isolation and a free event loop."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import TINY_DOCS, TINY_QUERIES
from imrnn.checkpoint import Checkpoint, save_checkpoint
from imrnn.cli import app
from imrnn.config import EncoderConfig, IMRNNConfig
from imrnn.data import Corpus
from imrnn.encode import Encoder
from imrnn.errors import ConfigError
from imrnn.explain import Explainer, Explanation
from imrnn.model import IMRNN
from imrnn.retriever import IMRNNRetriever, Ranking
from test_explain import random_adapter

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[serve]'")
uvicorn = pytest.importorskip("uvicorn", reason="the serve extra is not installed: pip install -e '.[serve]'")
from imrnn.serve import LIMITS, CorpusDocuments, Service, create_app  # noqa: E402 - needs the serve extra

CHROMIUM = Path("/usr/bin/chromium")
LOAD_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "load.py"
DOC_IDS = list(TINY_DOCS)
PASSAGES = [f"{title} {text}" for title, text in TINY_DOCS.values()]
LOOPBACK = {"NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
SCHEMATHESIS_CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,"
                       "response_headers_conformance,negative_data_rejection")

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- HTTP over loopback, never via a proxy

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass
class Reply:
    status: int
    body: Any
    headers: dict[str, str]


def call(url: str, body: Any = None, method: str | None = None, raw: bytes | None = None, timeout: float = 120) -> Reply:
    """One request; `body` is sent as JSON (or `raw` bytes as they are); JSON answers are parsed."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method or ("POST" if data is not None else "GET"),
                                     headers={"Content-Type": "application/json"} if data is not None else {})
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            status, payload, headers = response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as err:
        status, payload, headers = err.code, err.read(), dict(err.headers)
    is_json = headers.get("content-type", "").startswith("application/json")
    return Reply(status, json.loads(payload) if is_json else payload.decode(), headers)


def port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


# --------------------------------------------------------------------------- the real service, `imrnn serve`


@dataclass
class Site:
    url: str
    port: int
    checkpoint: Path
    root: Path
    process: subprocess.Popen

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()  # uvicorn shuts down gracefully on SIGTERM
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture(scope="module")
def site(tmp_path_factory, write_tiny_beir) -> Iterator[Site]:
    """`imrnn serve` in a subprocess over the tiny BEIR corpus and a re-ranking adapter, on a port the OS picks."""
    root = tmp_path_factory.mktemp("serve")
    write_tiny_beir(root / "data" / "tiny")
    checkpoint = save_checkpoint(Checkpoint(random_adapter(), EncoderConfig()), root / "ckpt")
    log = root / "serve.log"
    command = [sys.executable, "-c", "from imrnn.cli import main; main()", "serve", "--checkpoint", str(checkpoint),
               "--dataset", "tiny", "--data-dir", str(root / "data"), "--cache-dir", str(root / "cache"), "--no-download",
               "--vocabulary", "input", "--port", "0", "--threads", "1"]
    env = {k: v for k, v in os.environ.items() if k not in ("IMRNN_DATA_DIR", "IMRNN_CACHE_DIR")}
    with open(log, "w", encoding="utf-8") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env={**env, **LOOPBACK})
    found, deadline = None, time.monotonic() + 300
    while found is None and process.poll() is None and time.monotonic() < deadline:
        found = re.search(r"Uvicorn running on (http://127\.0\.0\.1:(\d+))", log.read_text(errors="replace"))
        time.sleep(0.2)
    if found is None:
        process.kill()
        pytest.fail(f"imrnn serve did not start:\n{log.read_text(errors='replace')[-3000:]}")
    running = Site(found.group(1), int(found.group(2)), checkpoint, root, process)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def reference(site) -> IMRNNRetriever:
    """The library itself over the same checkpoint and corpus: what the service must answer."""
    retriever = IMRNNRetriever.from_pretrained(site.checkpoint, cache_dir=site.root / "reference-cache")
    return retriever.index(dict(zip(DOC_IDS, PASSAGES)), progress=False)


def hits(result: dict) -> tuple[list[str], np.ndarray, np.ndarray]:
    return ([h["id"] for h in result["hits"]], np.array([h["score"] for h in result["hits"]]),
            np.array([h["base_score"] for h in result["hits"]]))


def assert_same(result: dict, ranking: Ranking) -> None:
    ids, scores, base = hits(result)
    assert ids == ranking.ids
    np.testing.assert_allclose(scores, ranking.scores, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(base, ranking.base_scores, rtol=1e-5, atol=1e-6)


def test_health_names_the_model_the_corpus_and_the_limits(site):
    reply = call(f"{site.url}/health")
    assert reply.status == 200
    assert reply.body["status"] == "ok" and reply.body["documents"] == len(DOC_IDS) and reply.body["dimension"] == 384
    assert reply.body["limits"]["queries"] == LIMITS.queries and reply.body["checkpoint"] == "ckpt"


def test_search_answers_what_the_library_answers(site, reference):
    queries = [TINY_QUERIES["q4"], TINY_QUERIES["q6"]]
    reply = call(f"{site.url}/search", {"queries": queries, "k": 5, "include_text": True})
    assert reply.status == 200, reply.body
    for result, query, ranking in zip(reply.body["results"], queries, reference.search(queries, k=5)):
        assert result["query"] == query
        assert_same(result, ranking)
        assert [h["text"] for h in result["hits"]] == [PASSAGES[DOC_IDS.index(i)] for i in ranking.ids]
    assert "text" not in call(f"{site.url}/search", {"queries": queries[:1]}).body["results"][0]["hits"][0]


def test_rerank_by_ids_and_by_texts_answers_what_the_library_answers(site, reference):
    ids = ["d1", "d16", "d11", "d9", "d6"]
    texts = [PASSAGES[DOC_IDS.index(i)] for i in ids]
    body = {"queries": [{"query": TINY_QUERIES["q4"], "ids": ids},
                        {"query": TINY_QUERIES["q6"], "documents": [{"id": i, "text": t} for i, t in zip(ids, texts)]},
                        {"query": TINY_QUERIES["q1"], "documents": [{"text": t} for t in texts]}],
            "k": 4, "include_text": True}
    reply = call(f"{site.url}/rerank", body)
    assert reply.status == 200, reply.body
    by_id, by_text, by_position = reply.body["results"]
    expected = reference.rerank_ids(reference.encoder.encode_queries([TINY_QUERIES["q4"]]), [ids], k=4)[0]
    assert_same(by_id, expected)
    full = reference.rerank(TINY_QUERIES["q6"], texts, ids)
    assert_same(by_text, Ranking(full.ids[:4], full.scores[:4], full.base_scores[:4]))
    assert [h["text"] for h in by_text["hits"]] == [texts[ids.index(i)] for i in full.ids[:4]]
    assert all(h["id"] in {"0", "1", "2", "3", "4"} for h in by_position["hits"]) and len(by_position["hits"]) == 4


def test_explain_json_is_the_library_explanation(site, reference):
    explainer = Explainer(reference.checkpoint, reference.encoder, vocabulary="input")
    documents = [{"id": i, "text": t} for i, t in zip(DOC_IDS, PASSAGES)]
    reply = call(f"{site.url}/explain", {"query": TINY_QUERIES["q4"], "documents": documents, "top": 5, "doc_words": 1})
    assert reply.status == 200, reply.body
    served = Explanation.from_dict(reply.body)
    local = explainer.explain(TINY_QUERIES["q4"], DOC_IDS, PASSAGES, top=5, doc_words=1)
    assert [c.doc_id for c in served.candidates] == [c.doc_id for c in local.candidates]
    assert served.promoted == local.promoted and served.num_candidates == len(DOC_IDS) and served.vocabulary == "input"
    for mine, theirs in zip(served.candidates, local.candidates):
        assert mine.adapted_score == pytest.approx(theirs.adapted_score, rel=1e-4, abs=1e-6)
        assert mine.base_score + mine.projection + mine.modulation + mine.refinement == pytest.approx(mine.adapted_score, abs=1e-5)
    over_corpus = Explanation.from_dict(call(f"{site.url}/explain", {"query": TINY_QUERIES["q4"], "top": 3}).body)
    assert over_corpus.num_candidates == len(DOC_IDS)  # the corpus is smaller than the first stage's K
    by_ids = Explanation.from_dict(call(f"{site.url}/explain", {"query": TINY_QUERIES["q4"], "ids": ["d16", "d1", "d11"]}).body)
    assert by_ids.num_candidates == 3 and {c.doc_id for c in by_ids.candidates} == {"d16", "d1", "d11"}


BAD_REQUESTS = [
    ("/search", {"queries": ["   "]}, 422, "non-space character"),
    ("/search", {"queries": ["x" * (LIMITS.query_chars + 1)]}, 422, f"at most {LIMITS.query_chars} characters"),
    ("/search", {"queries": []}, 422, "at least 1 item"),
    ("/search", {"queries": ["q"] * (LIMITS.queries + 1)}, 422, f"at most {LIMITS.queries} items"),
    ("/search", {"queries": ["q"], "k": 0}, 422, "body.k: Input should be greater than or equal to 1 (received 0)"),
    ("/search", {"queries": ["q"], "k": "10"}, 422, "valid integer"),
    ("/search", {"queries": ["q"], "include_text": 0}, 422, "valid boolean"),
    ("/search", {"queries": ["q"], "top": 3}, 422, "body.top: Extra inputs are not permitted"),
    ("/search", b'{"queries": ["q"', 422, "Invalid JSON"),
    ("/rerank", {"queries": [{"query": "q", "ids": ["d1", "nope"]}]}, 400, "'nope', which is not in the indexed corpus"),
    ("/rerank", {"queries": [{"query": "q"}]}, 422, "as documents (texts) or as ids, exactly one"),
    ("/rerank", {"queries": [{"query": "q", "ids": ["d1"], "documents": [{"text": "t"}]}]}, 422, "exactly one"),
    ("/rerank", {"queries": [{"query": "q", "documents": [{"text": "t"}] * 129}] * 2}, 422,
     f"at most {LIMITS.texts} document texts per request, got 258"),
    ("/rerank", {"queries": [{"query": "q", "documents": [{"id": "a", "text": "t"}, {"text": "u"}]}]}, 422,
     "give an id to every document or to none"),
    ("/rerank", {"queries": [{"query": "q", "documents": [{"id": "a", "text": "t"}, {"id": "a", "text": "u"}]}]}, 422,
     "ids must be unique"),
    ("/explain", {"query": "q", "ids": ["d1"], "documents": [{"text": "t"}]}, 422, "not both"),
    ("/explain", {"query": "q", "ids": ["d1", "gone"]}, 400, "'gone'"),
    ("/explain", {"query": "q", "top": LIMITS.top + 1}, 422, f"less than or equal to {LIMITS.top}"),
    ("/explain?query=", None, 422, "query.query: String should have at least 1 character"),
    ("/explain?query=peso&doc_words=9", None, 422, f"less than or equal to {LIMITS.doc_words}"),
    ("/nowhere", None, 404, "Not Found"),
]


@pytest.mark.parametrize("path, body, status, fragment", BAD_REQUESTS, ids=[f"{p} {f[:30]}" for p, _, _, f in BAD_REQUESTS])
def test_bad_requests_get_a_4xx_json_error_saying_what_was_wrong(site, path, body, status, fragment):
    reply = call(f"{site.url}{path}", raw=body) if isinstance(body, bytes) else call(f"{site.url}{path}", body)
    assert reply.status == status, reply.body
    assert set(reply.body) == {"error", "message", "details"}, reply.body
    assert fragment in reply.body["message"], reply.body["message"]


def test_wrong_method_and_oversized_body_are_4xx_json_too(site):
    wrong = call(f"{site.url}/search")
    assert wrong.status == 405 and wrong.body["error"] == "method_not_allowed" and wrong.headers["allow"] == "POST"
    huge = call(f"{site.url}/search", raw=b'{"queries": ["' + b"a" * (LIMITS.body_bytes + 1) + b'"]}')
    assert huge.status == 413 and f"at most {LIMITS.body_bytes} are accepted" in huge.body["message"]


def test_schemathesis_finds_no_failure_in_the_live_schema(site, tmp_path):
    """Every operation of /openapi.json, generated requests (boundary and schema-violating ones included): no 5xx,
    every status code, content type, header and body as the schema documents, and invalid data rejected."""
    report = tmp_path / "schemathesis.json"
    command = [sys.executable, "-m", "schemathesis.cli", "run", f"{site.url}/openapi.json", "--checks", SCHEMATHESIS_CHECKS,
               "--max-examples", "10", "--seed", "1", "--workers", "1", "--request-timeout", "120",
               "--report", "json", "--report-json-path", str(report)]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900, env={**os.environ, **LOOPBACK})
    result = json.loads(report.read_text())
    cases = result["test_cases"]
    print(f"schemathesis: {cases['generated']} generated requests over {result['operations']['tested']} operations, "
          f"{cases['with_failures']} with failures, {len(result['errors'])} errors")
    assert result["failures"] == [] and result["errors"] == [] and done.returncode == 0, done.stdout[-6000:]
    assert result["operations"]["tested"] == 5 and cases["generated"] >= 100


def _chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-proxy-server", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}"]
    return subprocess.run([str(CHROMIUM), *flags, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is absent: apt-get install -y chromium to run this test")
def test_explain_page_renders_in_headless_chromium(site, tmp_path):
    page = f"{site.url}/explain?" + urllib.parse.urlencode({"query": TINY_QUERIES["q4"], "top": 5, "doc_words": 1})
    shot = tmp_path / "explain.png"
    done = _chromium(f"--screenshot={shot}", "--window-size=1280,1600", page, profile=tmp_path / "profile")
    assert shot.is_file(), done.stderr[-2000:]
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000  # a rendered page, not a blank one
    dom = _chromium("--dump-dom", page, profile=tmp_path / "profile").stdout
    assert "Why the adapters re-ranked this query" in dom and "Ranking before" in dom
    assert "currency" in dom and "Mexico" in dom and "<script" not in dom.lower()


def test_load_smoke_with_locust(site, tmp_path):
    """The load test script, briefly: concurrent clients get answers and no errors."""
    queries = tmp_path / "queries.json"
    queries.write_text(json.dumps(list(TINY_QUERIES.values())))
    out = tmp_path / "load.json"
    done = subprocess.run([sys.executable, str(LOAD_SCRIPT), "--url", site.url, "--queries", str(queries), "--users", "8",
                           "--duration", "3", "--output", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["requests"] > 0 and result["errors"] == 0 and result["routes"]["POST /search"]["requests"] > 0
    assert result["machine"]["cores"] == os.cpu_count()


def test_serve_command_fails_cleanly_on_a_missing_checkpoint(tmp_path):
    result = CliRunner().invoke(app, ["serve", "--checkpoint", str(tmp_path / "missing"), "--port", "0"])
    assert result.exit_code == 2 and "Traceback" not in result.output and "error:" in result.stderr


def test_the_service_stops_and_frees_its_port(site):
    assert not port_is_free(site.port)
    site.stop()
    assert site.process.returncode is not None and port_is_free(site.port)


# --------------------------------------------------------------------------- the app over a stand-in retriever


class SlowRetriever:
    """A stand-in retriever: each search takes `delay` seconds (in the worker thread), is recorded, and fails on
    the query "bad"; hits are "<query>#<i>" so a test can tell whose answer is whose."""

    candidates = 100

    def __init__(self, delay: float) -> None:
        self.checkpoint = Checkpoint(IMRNN(IMRNNConfig()).eval(), EncoderConfig())
        self.encoder = Encoder(self.checkpoint.encoder)  # never loads the model: nothing here encodes
        self.delay, self.calls = delay, []

    def search(self, queries, k=10):
        self.calls.append(list(queries))
        time.sleep(self.delay)
        if "bad" in queries:
            raise ConfigError("the query 'bad' is refused")
        return [Ranking([f"{q}#{i}" for i in range(k)], np.arange(k, 0, -1, dtype=np.float32), np.zeros(k, np.float32))
                for q in queries]


@contextmanager
def served(service: Service) -> Iterator[str]:
    """The app under uvicorn in a thread of this process, on a port the OS picks; stopped on exit."""
    server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=0, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "uvicorn did not start"
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    assert not thread.is_alive() and port_is_free(port)


def stand_in(delay: float, documents: bool = True) -> tuple[Service, SlowRetriever]:
    retriever = SlowRetriever(delay)
    corpus = Corpus(np.array(["a", "b"], dtype=object), ["", ""], ["first", "second"])
    docs = CorpusDocuments(corpus, np.zeros((2, 384), np.float32)) if documents else None
    return Service(retriever, Explainer(retriever.checkpoint, retriever.encoder, vocabulary="input"), docs, "stand-in"), retriever


def in_threads(*jobs) -> list[Any]:
    results: list[Any] = [None] * len(jobs)

    def work(i: int) -> None:
        results[i] = jobs[i]()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return results


def wait_for(condition, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_concurrent_searches_are_batched_and_each_gets_its_own_answer():
    service, retriever = stand_in(delay=1.5)
    with served(service) as url:
        first = threading.Thread(target=call, args=(f"{url}/search", {"queries": ["first"]}))
        first.start()
        wait_for(lambda: retriever.calls)  # the model is busy: the next requests queue up together
        asked = [(f"q{i}", 2 + i) for i in range(6)]
        replies = in_threads(*(lambda q=q, k=k: call(f"{url}/search", {"queries": [q, q + "!"], "k": k}) for q, k in asked))
        first.join()
    assert len(retriever.calls) == 2 and sorted(retriever.calls[1]) == sorted(x for q, _ in asked for x in (q, q + "!"))
    for (query, k), reply in zip(asked, replies):
        assert reply.status == 200
        for result, expected in zip(reply.body["results"], (query, query + "!")):
            assert result["query"] == expected and [h["id"] for h in result["hits"]] == [f"{expected}#{i}" for i in range(k)]


def test_one_bad_request_in_a_batch_fails_alone():
    service, retriever = stand_in(delay=0.6)
    with served(service) as url:
        first = threading.Thread(target=call, args=(f"{url}/search", {"queries": ["first"]}))
        first.start()
        wait_for(lambda: retriever.calls)
        replies = in_threads(*(lambda q=q: call(f"{url}/search", {"queries": [q]}) for q in ("good", "bad", "fine")))
        first.join()
    assert [r.status for r in replies] == [200, 400, 200]
    assert replies[1].body["message"] == "the query 'bad' is refused"


def test_model_work_does_not_block_the_event_loop():
    service, retriever = stand_in(delay=2.0)
    with served(service) as url:
        slow = threading.Thread(target=call, args=(f"{url}/search", {"queries": ["slow"]}))
        slow.start()
        wait_for(lambda: retriever.calls)
        health = call(f"{url}/health")
        still_searching = slow.is_alive()
        slow.join()
    assert health.status == 200 and health.body["checkpoint"] == "stand-in" and still_searching


def test_a_service_without_documents_says_how_to_get_them():
    service, _ = stand_in(delay=0.0, documents=False)
    with served(service) as url:
        search = call(f"{url}/search", {"queries": ["q"]})
        by_ids = call(f"{url}/rerank", {"queries": [{"query": "q", "ids": ["a"]}]})
        health = call(f"{url}/health")
    assert search.status == 409 and "--dataset" in search.body["message"] and search.body["error"] == "conflict"
    assert by_ids.status == 409 and "send the documents' texts" in by_ids.body["message"]
    assert health.body["documents"] is None
