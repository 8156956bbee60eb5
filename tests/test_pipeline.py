"""End to end on a tiny BEIR folder: `imrnn train` / `evaluate --checkpoint` / `run`, the retriever API, the README."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from imrnn.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from imrnn.cli import app
from imrnn.config import IMRNNConfig
from imrnn.encode import EncoderConfig
from imrnn.model import IMRNN
from imrnn.retriever import IMRNNRetriever

README = Path(__file__).resolve().parents[1] / "README.md"
runner = CliRunner()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, write_tiny_beir):
    root = tmp_path_factory.mktemp("pipeline")
    data = write_tiny_beir(root / "data" / "tiny")
    cache = root / "cache"
    ckpt = root / "ckpt"
    result = runner.invoke(app, ["train", "--dataset", str(data), "--output", str(ckpt), "--cache-dir", str(cache),
                                 "--epochs", "2", "--seed", "3", "--validation-fraction", "0.3"])
    assert result.exit_code == 0, result.output
    return data, cache, ckpt


def test_train_writes_a_complete_checkpoint(trained):
    _, _, ckpt = trained
    payload = json.loads((ckpt / "config.json").read_text())
    assert (ckpt / "model.safetensors").is_file()
    assert payload["encoder"]["dimension"] == 384 and payload["seed"] == 3
    assert payload["train_config"]["epochs"] == 2 and payload["data"]["dataset"] == "tiny"
    assert payload["metrics"]["test"]["queries"] == 4
    assert load_checkpoint(ckpt, expected_dim=384).model_config.embedding_dim == 384


def test_evaluate_checkpoint_json_has_side_by_side_report(trained, tmp_path):
    data, cache, ckpt = trained
    out = tmp_path / "adapted.trec"
    result = runner.invoke(app, ["evaluate", "--checkpoint", str(ckpt), "--dataset", str(data), "--split", "test",
                                 "--cache-dir", str(cache), "--json", "--output", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout[result.stdout.index("{"):])
    for key in ("base", "adapted", "p_value", "improved", "worsened", "unseen_relevant"):
        assert key in report
    assert set(report["base"]) >= {"nDCG@10", "R@10", "RR@10", "R@100"}
    assert 0.0 <= report["p_value"]["nDCG@10"] <= 1.0
    assert report["improved"] + report["worsened"] <= report["queries"] == 4
    unseen = report["unseen_relevant"]  # no test relevant document is relevant to a training query
    assert unseen["queries"] == 4 and unseen["base"]["nDCG@10"] == pytest.approx(report["base"]["nDCG@10"])
    lines = out.read_text().splitlines()
    assert lines and all(len(line.split()) == 6 for line in lines)


def test_run_prints_json_report(trained, tmp_path):
    data, cache, _ = trained
    result = runner.invoke(app, ["run", "--dataset", str(data), "--output", str(tmp_path / "c"), "--cache-dir", str(cache),
                                 "--epochs", "1", "--validation-fraction", "0.3", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout[result.stdout.index("{"):])["queries"] == 4


def test_train_refuses_bad_flags_with_a_clear_error(trained, tmp_path):
    data, cache, _ = trained
    result = runner.invoke(app, ["train", "--dataset", str(data), "--output", str(tmp_path / "c"), "--cache-dir", str(cache),
                                 "--loss", "pointwise"])
    assert result.exit_code == 2 and "loss must be one of" in result.output


def test_retriever_search_matches_rerank_embeddings_and_keeps_ids(tmp_path, encoder):
    rng = np.random.default_rng(0)
    model = IMRNN(IMRNNConfig(embedding_dim=384, hidden_dim=16))
    save_checkpoint(Checkpoint(model, EncoderConfig()), tmp_path / "ck")
    retriever = IMRNNRetriever.from_pretrained(tmp_path / "ck", cache_dir=tmp_path / "cache", candidates=3)
    docs = {"a": "Paris is the capital of France.", "b": "The peso is the currency of Mexico.", "c": "Bees make honey.",
            "d": "Insulin lowers blood sugar."}
    retriever.index(docs, progress=False)
    rankings = retriever.search(["What is the currency of Mexico?", "capital of France"], k=2)
    assert [r.ids[0] for r in rankings] == ["b", "a"] and all(len(r) == 2 for r in rankings)
    # an untrained adapter is the frozen retriever: adapted scores equal base scores
    np.testing.assert_allclose(rankings[0].scores, rankings[0].base_scores, atol=1e-5)
    q = rng.standard_normal((2, 384)).astype(np.float32)
    c = rng.standard_normal((2, 5, 384)).astype(np.float32)
    batched = retriever.rerank_embeddings(q, c)
    single = np.stack([retriever.rerank_embeddings(q[i : i + 1], c[i : i + 1])[0] for i in range(2)])
    np.testing.assert_allclose(batched, single, atol=1e-6)


def test_readme_python_example_runs(tmp_path, monkeypatch, encoder, capsys):
    block = re.search(r"## Python API\n\n```python\n(.*?)```", README.read_text(), re.S)
    assert block, "README must keep its Python API example"
    save_checkpoint(Checkpoint(IMRNN(IMRNNConfig(embedding_dim=384)), EncoderConfig()), tmp_path / "checkpoints" / "scifact")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("IMRNN_CACHE_DIR", str(tmp_path / "cache"))
    namespace: dict = {}
    exec(compile(block.group(1), "README.md", "exec"), namespace)
    assert namespace["ranking"].ids == ["a", "b"]
    printed = capsys.readouterr().out.splitlines()  # the rerank_ids lines: peso first, then Tokyo first
    assert "['d1', 'd3']" in printed and any(line.startswith("['d3',") for line in printed)


def test_train_with_bm25_negatives_and_listwise_loss(trained, tmp_path):
    data, cache, _ = trained
    result = runner.invoke(app, ["train", "--dataset", str(data), "--output", str(tmp_path / "c"), "--cache-dir", str(cache),
                                 "--epochs", "1", "--validation-fraction", "0.3", "--bm25-negatives", "3", "--loss", "listwise"])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "c" / "config.json").read_text())["train_config"]
    assert saved["bm25_negatives"] == 3 and saved["loss"] == "listwise"
