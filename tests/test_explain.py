"""Explanations: exact score split, back-projection vs a slow reference, JSON round trips, safe HTML, the
deletion test, word attribution, the CLI, and the report rendered in headless Chromium."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import TINY_DOCS, TINY_QUERIES
from imrnn.checkpoint import Checkpoint, save_checkpoint
from imrnn.cli import app
from imrnn.config import IMRNNConfig
from imrnn.encode import Encoder
from imrnn.explain import (
    CONCEPT_NOISE,
    ConceptVocabulary,
    DeletionReport,
    Explainer,
    ExplainError,
    Explanation,
    delete_words,
    encoder_vocabulary,
    pseudo_inverse,
    vocabulary_tokens,
    words,
)
from imrnn.model import IMRNN
from imrnn.report import deletion_markdown, render_html, save_plots

CHROMIUM = Path("/usr/bin/chromium")
DOC_IDS = list(TINY_DOCS)
DOC_TEXTS = [f"{title} {text}" for title, text in TINY_DOCS.values()]
ENV = {"IMRNN_DATA_DIR": None, "IMRNN_CACHE_DIR": None, "XDG_CACHE_HOME": None}


def random_adapter(seed: int = 0, **config) -> IMRNN:
    """An adapter whose heads and projection are randomised, so that it really modulates and re-ranks."""
    torch.manual_seed(seed)
    model = IMRNN(IMRNNConfig(feedback_docs=3, **config))
    with torch.no_grad():
        for head in (model.query_adapter, model.doc_adapter):
            head.out.weight.normal_(0.0, 0.08)
            head.out.bias.normal_(0.0, 0.08)
        model.projection.weight.add_(0.05 * torch.randn_like(model.projection.weight))
    return model.eval()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def doc_embs(encoder) -> np.ndarray:
    return encoder.encode(DOC_TEXTS)


@pytest.fixture(scope="module")
def vocab(encoder) -> ConceptVocabulary:
    """A small concept vocabulary (the tiny corpus's words) embedded through the full encoder, built in ~1 s."""
    tokens = sorted({w.lower() for text in DOC_TEXTS for w in (text[s:e] for s, e in words(text)) if len(w) >= 3 and w.isalpha()})
    return ConceptVocabulary.from_vectors(tokens, encoder.encode(tokens), "encoder")


@pytest.fixture(scope="module")
def explainer(encoder, vocab) -> Explainer:
    return Explainer(Checkpoint(random_adapter(), encoder.config), encoder, vocabulary=vocab)


@pytest.fixture(scope="module")
def explanation(explainer, doc_embs) -> Explanation:
    return explainer.explain(TINY_QUERIES["q4"], DOC_IDS, DOC_TEXTS, doc_embs, query_id="q4", top=5, doc_words=2)


# --------------------------------------------------------------------------- numbers


def test_score_parts_sum_to_the_change_and_match_the_model(explainer, explanation, encoder, doc_embs):
    model = explainer.model
    q = torch.from_numpy(encoder.encode([TINY_QUERIES["q4"]]))
    d = torch.from_numpy(doc_embs)
    with torch.no_grad():
        scores = model(q, d[None]).scores[0].numpy()
    by_id = dict(zip(DOC_IDS, scores))
    assert explanation.num_candidates == 20
    for c in explanation.candidates:
        assert c.base_score + c.projection + c.modulation + c.refinement == pytest.approx(c.adapted_score, abs=1e-5)
        assert c.adapted_score == pytest.approx(float(by_id[c.doc_id]), abs=1e-5)
        assert c.rank_shift == c.base_rank - c.adapted_rank
        assert len(c.query_weights) == len(explanation.query_words)
    assert [c.adapted_rank for c in explanation.candidates] == sorted(c.adapted_rank for c in explanation.candidates)
    shown = {c.doc_id for c in explanation.candidates}
    assert {c.doc_id for c in explanation.candidates if c.adapted_rank <= 5} | {c.doc_id for c in explanation.candidates if c.base_rank <= 5} == shown
    assert any(c.rank_shift != 0 for c in explanation.candidates)  # the randomised adapter really re-ranks


def test_modulation_part_equals_query_adapter_only_score(encoder, vocab, doc_embs):
    """With A_d switched off the refinement part is 0 and the modulation part is exactly <q~, d^> - <q~, d~>."""
    model = random_adapter(1, use_doc_adapter=False)
    exp = Explainer(Checkpoint(model, encoder.config), encoder, vocabulary=vocab).explain(
        TINY_QUERIES["q1"], DOC_IDS, DOC_TEXTS, doc_embs, top=20, doc_words=0)
    q = torch.from_numpy(encoder.encode([TINY_QUERIES["q1"]]))
    d = torch.from_numpy(doc_embs)
    with torch.no_grad():
        out = model(q, d[None])
        plain = (model.project(d) @ model.project(q)[0]).numpy()  # <q~, d~>
    full = dict(zip(DOC_IDS, out.scores[0].numpy()))
    for c in exp.candidates:
        assert c.refinement == pytest.approx(0.0, abs=1e-6)
        assert c.modulation == pytest.approx(float(full[c.doc_id] - plain[DOC_IDS.index(c.doc_id)]), abs=1e-5)


def test_untrained_adapter_changes_nothing_and_has_no_concepts(encoder, vocab, doc_embs):
    exp = Explainer(Checkpoint(IMRNN(IMRNNConfig()).eval(), encoder.config), encoder, vocabulary=vocab).explain(
        TINY_QUERIES["q2"], DOC_IDS, DOC_TEXTS, doc_embs, doc_words=0)
    assert exp.promoted is None and exp.pulled_toward == () and exp.pushed_from == ()
    for c in exp.candidates:
        assert c.rank_shift == 0 and c.toward == () and c.away == ()
        assert abs(c.modulation) < 1e-6 and abs(c.refinement) < 1e-6 and abs(c.projection) < 1e-5


def perturbed(array: np.ndarray, seed: int, scale: float = 1e-6) -> np.ndarray:
    """`array` with relative noise of float-rounding size: what another CPU's kernels could have produced."""
    rng = np.random.default_rng(seed)
    return (array * (1.0 + scale * rng.standard_normal(array.shape))).astype(np.float32)


class RoundingPerturbedEncoder(Encoder):
    """The real bundled encoder whose embeddings carry relative noise near 1e-6 (they are no longer exactly unit)."""

    def __init__(self, encoder: Encoder, seed: int) -> None:
        super().__init__(encoder.config, encoder.device, encoder.batch_size)
        self._model, self.seed = encoder.model, seed

    def encode(self, texts, prefix="", progress=False):
        return perturbed(super().encode(texts, prefix, progress), self.seed)


@pytest.mark.parametrize("seed", range(4))
def test_untrained_adapter_outcome_does_not_depend_on_rounding(encoder, vocab, doc_embs, seed):
    """Which concepts exist and which ranking the identity adapter gives must not depend on the last bits: with
    inputs perturbed at rounding level the adapter's moves are pure rounding noise (on some CPUs they are noise
    even unperturbed), and an absolute weight threshold (the old 1e-9) turned that noise into ten concepts."""
    noisy = RoundingPerturbedEncoder(encoder, seed)
    exp = Explainer(Checkpoint(IMRNN(IMRNNConfig()).eval(), encoder.config), noisy, vocabulary=vocab).explain(
        TINY_QUERIES["q2"], DOC_IDS, DOC_TEXTS, perturbed(doc_embs, seed + 100), top=20, doc_words=0)
    assert exp.promoted is None and exp.pulled_toward == () and exp.pushed_from == ()
    assert all(c.rank_shift == 0 and c.toward == () and c.away == () for c in exp.candidates)


def test_a_real_move_keeps_its_concepts_under_rounding_noise(explainer, encoder, doc_embs):
    """The noise floor is relative: a trained-like adapter's concepts are the same with perturbed inputs."""
    clean = explainer.explain(TINY_QUERIES["q4"], DOC_IDS, DOC_TEXTS, doc_embs, top=5, doc_words=0)
    noisy = Explainer(explainer.checkpoint, RoundingPerturbedEncoder(encoder, 7), vocabulary=explainer.vocabulary).explain(
        TINY_QUERIES["q4"], DOC_IDS, DOC_TEXTS, perturbed(doc_embs, 8), top=5, doc_words=0)
    assert [c.token for c in noisy.pulled_toward] == [c.token for c in clean.pulled_toward] != []
    assert [(c.doc_id, c.adapted_rank) for c in noisy.candidates] == [(c.doc_id, c.adapted_rank) for c in clean.candidates]


def test_back_projection_equals_minimum_norm_least_squares(encoder, vocab):
    """P^+ v equals the slow obvious computation: per vector, the minimum-norm x with P x closest to v."""
    model = random_adapter(2, working_dim=48, identity_init=False)
    ex = Explainer(Checkpoint(model, encoder.config), encoder, vocabulary=vocab)
    first = ex.pseudo_inverse
    assert ex.pseudo_inverse is first and first.shape == (384, 48)  # computed once per explainer
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(5, 48)).astype(np.float32)
    fast = ex.back_project(vectors)
    weight = model.projection.weight.detach().double().numpy()
    for v, got in zip(vectors, fast):
        slow = np.linalg.lstsq(weight, v.astype(np.float64), rcond=None)[0]
        np.testing.assert_allclose(got, slow, rtol=1e-4, atol=1e-5)
    square = random_adapter(3).projection.weight
    np.testing.assert_allclose(pseudo_inverse(square), np.linalg.inv(square.detach().double().numpy()), atol=1e-8)


def test_concept_weights_are_back_projected_moves_along_tokens(explainer, explanation, vocab):
    weights = explainer.concept_weights(np.eye(384, dtype=np.float32)[:2])
    back = explainer.pseudo_inverse.T[:2]
    expected = back @ vocab.vectors.T
    floor = CONCEPT_NOISE * np.linalg.norm(back, axis=1, keepdims=True)  # weights below it are rounding noise: 0
    clear = np.abs(expected) > 2 * floor
    np.testing.assert_allclose(weights[clear], expected[clear], rtol=1e-5, atol=1e-6)
    assert np.all((weights[~clear] == 0) | np.isclose(weights[~clear], expected[~clear], rtol=1e-5, atol=1e-6))
    for concepts, sign in ((explanation.pulled_toward, 1), (explanation.pushed_from, -1)):
        assert concepts and all(sign * c.weight > 0 for c in concepts)
        assert [abs(c.weight) for c in concepts] == sorted((abs(c.weight) for c in concepts), reverse=True)
        assert all(c.token in vocab.tokens for c in concepts)


def test_vocabulary_filter_keeps_whole_words_only(encoder):
    tokens, ids = vocabulary_tokens(encoder.model.tokenizer)
    assert 15000 < len(tokens) == len(ids) < 30522
    assert not any(t.startswith(("##", "[")) for t in tokens)
    assert all(len(t) >= 3 and any(ch.isalpha() for ch in t) for t in tokens)
    assert {"currency", "mexico", "protein"} <= set(tokens)


def test_encoder_vocabulary_is_cached_on_disk(encoder, tmp_path, monkeypatch):
    import imrnn.explain.vocabulary as explain_module

    small = (["currency", "mexico", "peso", "planet", "insulin"], [0, 1, 2, 3, 4])
    monkeypatch.setattr(explain_module, "vocabulary_tokens", lambda tokenizer: small)
    first = encoder_vocabulary(encoder, tmp_path, progress=False)
    assert len(list((tmp_path / "concepts").glob("*.npy"))) == 1 and not list((tmp_path / "concepts").glob(".*tmp*"))
    monkeypatch.setattr(encoder, "encode", lambda *a, **k: pytest.fail("the cached matrix must be reused"))
    second = encoder_vocabulary(encoder, tmp_path, progress=False)
    assert second.tokens == first.tokens and np.array_equal(second.vectors, first.vectors)


def test_word_attribution_gradient_pipeline_reproduces_the_encoder(explainer, explanation, encoder):
    embs, leaf, offsets = explainer._embed_with_grad(DOC_TEXTS[:3], "")
    np.testing.assert_allclose(embs.detach().numpy(), encoder.encode(DOC_TEXTS[:3]), atol=1e-5)
    assert leaf.shape[:2] == offsets.shape[:2]
    attributed = [c for c in explanation.candidates if c.doc_words]
    assert len(attributed) == 2
    for cand in attributed:
        assert [w.text for w in cand.doc_words] == [cand.text[s:e] for s, e in words(cand.text)]
        assert any(w.weight != 0 for w in cand.doc_words)


def test_words_and_deletions_keep_the_users_text():
    text = "Does COVID-19 raise the patient's risk, or not?"
    assert [text[s:e] for s, e in words(text)] == ["Does", "COVID-19", "raise", "the", "patient's", "risk", "or", "not"]
    assert delete_words(text, words(text), [1, 3]) == "Does raise patient's risk, or not?"


# --------------------------------------------------------------------------- serialisation and reports


def test_explanation_json_round_trips_exactly(explanation):
    text = explanation.to_json(indent=2)
    again = Explanation.from_json(text)
    assert again == explanation
    assert again.to_json(indent=2) == text
    json.loads(text)  # valid JSON (no NaN)
    with pytest.raises(ExplainError, match="expected"):
        Explanation.from_json(json.dumps({"query": "x"}))


def test_script_in_a_document_cannot_break_the_html(explainer):
    evil = '</title><script>alert("x")</script><img src=x onerror="alert(1)">'
    exp = explainer.explain(f"<b>currency</b> of Mexico {evil}", ["<i>id</i>", "d2", "d3"],
                            [f"The peso {evil} is the currency of Mexico.", DOC_TEXTS[1], DOC_TEXTS[2]], top=3, doc_words=3)
    page = render_html(exp)
    assert "<script" not in page.lower() and "<img" not in page.lower() and "<i>id" not in page and "<b>currency" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert page.count("<title>") == 1 and "&lt;i&gt;id&lt;/i&gt;" in page


def test_plots_are_written_and_need_the_plots_extra(explanation, tmp_path, monkeypatch):
    paths = save_plots(explanation, tmp_path / "plots")
    assert [p.name for p in paths] == ["rank_shift.png", "concepts.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"imrnn\[plots\]"):
        save_plots(explanation, tmp_path / "again")


# --------------------------------------------------------------------------- faithfulness


def test_deletion_test_runs_and_round_trips(explainer, doc_embs):
    ids = ["q1", "q2", "q4", "q6", "q9"]
    texts = [TINY_QUERIES[q] for q in ids]
    candidates = np.tile(np.arange(20), (len(ids), 1))
    candidates[0, -2:] = -1  # padding is ignored
    report = explainer.deletion_test(ids, texts, doc_embs, candidates, DOC_IDS, n=2, draws=4, top=5, chunk=5)
    assert len(report.pairs) + sum(report.skipped.values()) == len(ids)
    assert report.pairs, report.skipped
    for pair in report.pairs:
        assert len(pair.token_deleted) == 2 == len(pair.concept_deleted) and len(pair.random_drops) == 4
        assert np.isfinite([pair.token_drop, pair.concept_drop, *pair.random_drops]).all()
    summary = report.summary()
    assert 0.0 <= summary["token_share"] <= 1.0 and summary["pairs"] == len(report.pairs)
    assert DeletionReport.from_json(report.to_json()) == report
    again = explainer.deletion_test(ids[::-1], texts[::-1], doc_embs, candidates[::-1], DOC_IDS, n=2, draws=4, top=5, chunk=2)
    # seeded per query: order and batching change nothing but float rounding from padding
    for a, b in zip(report.pairs, sorted(again.pairs, key=lambda p: ids.index(p.query_id))):
        assert (a.query_id, a.doc_id, a.token_deleted, a.concept_deleted) == (b.query_id, b.doc_id, b.token_deleted, b.concept_deleted)
        np.testing.assert_allclose([a.token_drop, *a.random_drops], [b.token_drop, *b.random_drops], atol=1e-4)
    assert "| token attribution (occlusion) |" in deletion_markdown(report)


# --------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory, encoder) -> Path:
    return save_checkpoint(Checkpoint(random_adapter(), encoder.config), tmp_path_factory.mktemp("ckpt") / "ckpt")


def test_cli_explains_free_text_with_json_html_and_plots(saved_checkpoint, tmp_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"_id": i, "title": t, "text": x}) + "\n" for i, (t, x) in TINY_DOCS.items()))
    html_path, plots = tmp_path / "report.html", tmp_path / "plots"
    result = CliRunner().invoke(app, ["explain", "--checkpoint", str(saved_checkpoint), "--query", TINY_QUERIES["q4"],
                                      "--documents", str(docs), "--vocabulary", "input", "--top", "5", "--json",
                                      "--html", str(html_path), "--plots", str(plots), "--cache-dir", str(tmp_path / "c")], env=ENV)
    assert result.exit_code == 0, result.output
    exp = Explanation.from_json(result.stdout)
    assert exp.vocabulary == "input" and exp.num_candidates == 20 and exp.query == TINY_QUERIES["q4"]
    assert html_path.read_text().startswith("<!DOCTYPE html>")
    assert sorted(p.name for p in plots.iterdir()) == ["concepts.png", "rank_shift.png"]


def test_cli_explains_a_dataset_query_and_runs_the_deletion_test(saved_checkpoint, tiny_beir, tmp_path):
    tiny_beir()
    base = ["explain", "--checkpoint", str(saved_checkpoint), "--dataset", "tiny", "--data-dir", str(tmp_path / "data"),
            "--split", "test", "--vocabulary", "input", "--cache-dir", str(tmp_path / "cache"), "--no-download", "--k", "10"]
    shown = CliRunner().invoke(app, base + ["--query-id", "q6", "--top", "3"], env=ENV)
    assert shown.exit_code == 0, shown.output
    assert "q6: What is the biggest planet?" in shown.stdout and "pulled toward" in shown.stdout
    faith = CliRunner().invoke(app, base + ["--faithfulness", "--n", "2", "--json"], env=ENV)
    assert faith.exit_code == 0, faith.output
    report = DeletionReport.from_json(faith.stdout)
    assert report.n == 2 and len(report.pairs) + sum(report.skipped.values()) == 4


@pytest.mark.parametrize("args, fragment", [
    (["--query", "peso"], "--query needs --documents"),
    ([], "Give --query-id"),
    (["--query-id", "q1"], "--query-id needs --dataset"),
    (["--faithfulness"], "--faithfulness runs over a split"),
])
def test_cli_explain_usage_errors_are_clean(saved_checkpoint, args, fragment):
    result = CliRunner().invoke(app, ["explain", "--checkpoint", str(saved_checkpoint), *args], env=ENV)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert fragment in result.stderr


def test_cli_unknown_query_id_is_a_clean_error(saved_checkpoint, tiny_beir, tmp_path):
    tiny_beir()
    result = CliRunner().invoke(app, ["explain", "--checkpoint", str(saved_checkpoint), "--dataset", "tiny", "--data-dir",
                                      str(tmp_path / "data"), "--query-id", "nope", "--vocabulary", "input",
                                      "--cache-dir", str(tmp_path / "cache"), "--no-download"], env=ENV)
    assert result.exit_code == 2 and "'nope' is not in split 'test'" in result.stderr


# --------------------------------------------------------------------------- headless Chromium


def _chromium(*args: str, tmp: Path) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp / 'profile'}"]
    return subprocess.run([str(CHROMIUM), *flags, *args], capture_output=True, text=True, timeout=90)


@pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is absent: apt-get install -y chromium to run this test")
def test_html_report_renders_in_headless_chromium(explainer, doc_embs, tmp_path):
    evil = "<script>document.title='pwned'</script>"
    exp = explainer.explain(TINY_QUERIES["q4"], DOC_IDS, [DOC_TEXTS[0] + evil] + DOC_TEXTS[1:], doc_embs, query_id="q4", top=5,
                            doc_words=2)
    page = tmp_path / "report.html"
    page.write_text(render_html(exp, top=5), encoding="utf-8")
    shot = tmp_path / "report.png"
    done = _chromium(f"--screenshot={shot}", "--window-size=1280,1600", page.as_uri(), tmp=tmp_path)
    assert shot.is_file(), done.stderr[-2000:]
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24]) == (1280, 1600)
    assert len(png) > 20_000  # a rendered page, not a blank one
    dom = _chromium("--dump-dom", page.as_uri(), tmp=tmp_path).stdout
    assert "Why the adapters re-ranked this query" in dom and "Ranking before" in dom
    assert "pwned" not in dom.split("</title>")[0] and "&lt;script&gt;document.title" in dom
    assert "<script" not in dom.lower()
