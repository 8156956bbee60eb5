"""End to end on a tiny BEIR folder: `imrnn train` / `evaluate --checkpoint` / `run`, the retriever API, the README."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from imrnn.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from imrnn.cli import app
from imrnn.config import IMRNNConfig
from imrnn.encode import EncoderConfig
from imrnn.model import IMRNN
from imrnn.retriever import IMRNNRetriever
from imrnn.workflow import epoch_ranges

README = Path(__file__).resolve().parents[1] / "README.md"
runner = CliRunner()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, write_tiny_beir):
    root = tmp_path_factory.mktemp("pipeline")
    data = write_tiny_beir(root / "data" / "tiny")
    cache = root / "cache"
    ckpt = root / "ckpt"
    result = runner.invoke(app, ["train", "--dataset", str(data), "--output", str(ckpt), "--cache-dir", str(cache),
                                 "--epochs", "2", "--seed", "3", "--validation-fraction", "0.3", "--min-queries", "0"])
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
    recipe = payload["recipe"]  # every selection is recorded: the tuned feedback and whether anything was trained
    assert recipe["trained"] is True and recipe["judged_queries"] == 4
    assert set(recipe["feedback"]) >= {"beta", "m", "queries", "nDCG@10"} and recipe["feedback"]["queries"] == 4
    averaging = recipe["loss_averaging"]  # the margin loss pooled or per query: chosen on validation, recorded
    assert averaging["chosen"] in ("pooled", "query-balanced") and averaging["queries"] == 4
    assert set(averaging["validation_nDCG@10"]) == {"pooled", "query-balanced"}
    members = payload["training"]["members"]  # the default soup: one adapter per validation fold, each recorded
    assert len(members) == payload["train_config"]["validation_folds"] == 3
    for member in members:  # the epochs whose mean weights were kept include the best one
        assert member["best_epoch"] in member["averaged_epochs"] and set(member["averaged_epochs"]) <= {0, 1, 2}
    assert payload["training"]["best_epoch"] == max(member["best_epoch"] for member in members)


def test_epoch_ranges_collapse_consecutive_epochs():
    assert epoch_ranges([5, 6, 7, 10, 11]) == "5-7, 10-11"
    assert epoch_ranges([3]) == "3" and epoch_ranges([0, 2, 3]) == "0, 2-3"


def test_the_output_says_which_margin_loss_validation_chose_and_the_flag_turns_the_choice_off(trained, tmp_path):
    data, cache, _ = trained
    common = ["train", "--dataset", str(data), "--cache-dir", str(cache), "--epochs", "1", "--seed", "3",
              "--validation-fraction", "0.3", "--min-queries", "0"]
    chosen = runner.invoke(app, [*common, "--output", str(tmp_path / "chosen")])
    assert chosen.exit_code == 0, chosen.output
    assert re.search(r"margin loss averaged (over pooled pairs|per query): out-of-fold validation nDCG@10 on 4 queries, "
                     r"pooled \d\.\d{4}, query-balanced \d\.\d{4}", chosen.output)
    assert "trained 3 adapters per loss in" in chosen.output
    pooled = runner.invoke(app, [*common, "--output", str(tmp_path / "pooled"), "--no-choose-query-balanced"])
    assert pooled.exit_code == 0, pooled.output
    assert "margin loss averaged" not in pooled.output and "trained 3 adapters in" in pooled.output
    assert "loss_averaging" not in json.loads((tmp_path / "pooled" / "config.json").read_text())["recipe"]


def test_too_few_queries_train_nothing_and_say_so(trained, tmp_path):
    """Under `min_queries` judged training + validation queries (default 30) the checkpoint is the tuned feedback
    (or the frozen retriever), never an adapter fitted to a handful of queries; the output and the checkpoint say so."""
    data, cache, _ = trained
    result = runner.invoke(app, ["train", "--dataset", str(data), "--output", str(tmp_path / "c"), "--cache-dir", str(cache),
                                 "--validation-fraction", "0.3"])
    assert result.exit_code == 0, result.output
    assert "no trained adapter: 4 judged training and validation queries, fewer than 30" in result.output
    assert re.search(r"(no feedback|feedback tuned) on 4 training and validation queries|no feedback: on 4 training", result.output)
    payload = json.loads((tmp_path / "c" / "config.json").read_text())
    assert payload["recipe"]["trained"] is False and "cannot be trusted" in payload["recipe"]["reason"]
    model = load_checkpoint(tmp_path / "c").model
    assert model.config.feedback_weight == payload["recipe"]["feedback"]["beta"]
    untrained = IMRNN(model.config)
    for name, tensor in untrained.state_dict().items():  # identity heads: exactly the feedback, nothing learned
        if name.endswith("out.weight") or name.endswith("out.bias") or name == "projection.weight":
            torch.testing.assert_close(model.state_dict()[name], tensor, rtol=0, atol=0)


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


def key_shape(value):
    """The nested keys of a JSON value, in order (leaves by type), so a golden test pins what users parse."""
    if isinstance(value, dict):
        return [[key, key_shape(item)] for key, item in value.items()]
    return "number" if isinstance(value, (int, float)) and not isinstance(value, bool) else type(value).__name__


MEANS = [["nDCG@10", "number"], ["R@10", "number"], ["RR@10", "number"], ["R@100", "number"]]
TESTED = [["nDCG@10", "number"], ["R@10", "number"], ["RR@10", "number"]]
RUN_JSON = [["queries", "number"], ["base", MEANS], ["adapted", MEANS], ["p_value", TESTED], ["randomization_p", TESTED],
            ["improved", "number"], ["worsened", "number"], ["k", "number"],
            ["unseen_relevant", [["queries", "number"], ["base", MEANS], ["adapted", MEANS], ["p_value", TESTED]]],
            ["split", "str"]]


def test_golden_json_keys_of_run_and_evaluate(trained, tmp_path):
    """`imrnn run --json`, `imrnn evaluate --checkpoint --json` and `imrnn evaluate --run --json` keep their keys."""
    data, cache, ckpt = trained
    ran = runner.invoke(app, ["run", "--dataset", str(data), "--output", str(tmp_path / "c"), "--cache-dir", str(cache),
                              "--epochs", "1", "--validation-fraction", "0.3", "--json"])
    assert ran.exit_code == 0, ran.output
    assert key_shape(json.loads(ran.stdout)) == RUN_JSON
    checked = runner.invoke(app, ["evaluate", "--checkpoint", str(ckpt), "--dataset", str(data), "--split", "test",
                                  "--cache-dir", str(cache), "--json", "--output", str(tmp_path / "a.trec")])
    assert checked.exit_code == 0, checked.output
    assert key_shape(json.loads(checked.stdout)) == RUN_JSON
    base = runner.invoke(app, ["search", "--dataset", str(data), "--output", str(tmp_path / "b.trec"), "--cache-dir", str(cache)])
    assert base.exit_code == 0, base.output
    scored = runner.invoke(app, ["evaluate", "--run", str(tmp_path / "b.trec"), "--compare", str(tmp_path / "a.trec"),
                                 "--dataset", str(data), "--measures", "nDCG@10,R@10", "--json"])
    assert scored.exit_code == 0, scored.output
    test = [["mean_diff", "number"], ["t_test", "number"], ["randomization", "number"]]
    assert key_shape(json.loads(scored.stdout)) == [
        ["metrics", [["nDCG@10", "number"], ["R@10", "number"]]], ["queries", "number"],
        ["compare", [["run", "str"], ["metrics", [["nDCG@10", "number"], ["R@10", "number"]]]]],
        ["p_value", [["nDCG@10", test], ["R@10", test]]]]


def test_no_underscore_imports_across_modules_and_inference_never_imports_training():
    """The layout rules of the README's "How the code is laid out", checked on the source."""
    src = Path(__file__).resolve().parents[1] / "src" / "imrnn"
    for path in src.rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"from \.+[\w.]* import [^\n]*\b_[a-z]", text), f"{path} imports a private name"
        assert "locals()" not in text and "__signature__" not in text, path
    inference = ["retriever.py", "model.py", "scoring.py", "index.py", "encode.py", "checkpoint.py", "workspace.py",
                 "serve.py", "explain", "store", "integrations"]
    for name in inference:
        for path in ([src / name] if name.endswith(".py") else list((src / name).rglob("*.py"))):
            assert not re.search(r"from \.+(train|workflow|resume) import|import imrnn\.train", path.read_text()), path


def test_readme_workflow_example_runs(trained, tmp_path, monkeypatch, capsys):
    """The README's workflow example, on the tiny dataset instead of SciFact (same code otherwise)."""
    data, cache, _ = trained
    text = README.read_text()
    block = re.search(r"```python\n(from imrnn import SplitPlan, Workspace\n.*?)```", text, re.S)
    assert block, "README must keep its workflow example"
    code = block.group(1).replace('Workspace.open("scifact"', f'Workspace.open({str(data)!r}, cache_dir={str(cache)!r}')
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    assert 0.0 <= float(capsys.readouterr().out.strip().splitlines()[-1]) <= 1.0
    assert load_checkpoint(tmp_path / "checkpoints" / "scifact").train_config.seed == 42
