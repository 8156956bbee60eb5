"""The `imrnn` command through click's CliRunner: search -> run file -> evaluate, and clean errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from imrnn.cli import app
from imrnn.data import load_beir
from imrnn.encode import Encoder
from imrnn.evaluate import DEFAULT_MEASURES, evaluate_run, paired_test, per_query, read_run, write_run

# the environment must not point the CLI at other data or caches
ENV = {"IMRNN_DATA_DIR": None, "IMRNN_CACHE_DIR": None, "XDG_CACHE_HOME": None}


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture(scope="module")
def searched(tmp_path_factory, write_tiny_beir, runner):
    """One real `imrnn search` over the tiny BEIR folder (by name, through --data-dir): the run is shared."""
    root = tmp_path_factory.mktemp("cli")
    folder = write_tiny_beir(root / "data" / "tiny")
    cache, run = root / "cache", root / "out" / "base.run"
    args = ["search", "--dataset", "tiny", "--data-dir", str(root / "data"), "--split", "test", "--k", "5",
            "--output", str(run), "--cache-dir", str(cache), "--no-download", "--batch-size", "8"]
    result = runner.invoke(app, args, env=ENV)
    return {"folder": folder, "cache": cache, "run": run, "args": args, "result": result, "root": root}


def assert_clean_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)


def test_search_writes_a_valid_run(searched):
    result = searched["result"]
    assert result.exit_code == 0, result.output
    assert "wrote" in result.stderr and "4 queries x 5" in result.stderr
    run = read_run(searched["run"])
    assert sorted(run) == ["q5", "q6", "q7", "q8"]
    assert all(len(docs) == 5 for docs in run.values())
    lines = [line.split() for line in searched["run"].read_text().splitlines()]
    assert len(lines) == 20
    assert all(f[1] == "Q0" and f[5] == "base" for f in lines)
    assert [int(f[3]) for f in lines[:5]] == [1, 2, 3, 4, 5]
    best = {q: max(docs, key=docs.get) for q, docs in run.items()}
    assert best == {"q5": "d7", "q6": "d6", "q7": "d20", "q8": "d19"}
    assert all(-1.0 <= s <= 1.0 for docs in run.values() for s in docs.values())  # cosine scores
    qrels = load_beir(searched["folder"]).split("test").qrels
    assert evaluate_run(run, qrels, ["nDCG@10"])["nDCG@10"] > 0.9
    assert any(p.is_dir() for p in (searched["cache"] / "embeddings").iterdir())


def test_search_again_reuses_cached_embeddings(searched, runner, monkeypatch, tmp_path):
    def no_encoding(*args, **kwargs):
        raise AssertionError("the corpus and queries were encoded again")

    monkeypatch.setattr(Encoder, "encode", no_encoding)
    out = tmp_path / "again.run"
    args = list(searched["args"])
    args[args.index("--output") + 1] = str(out)
    result = runner.invoke(app, args, env=ENV)
    assert result.exit_code == 0, result.output
    assert read_run(out) == read_run(searched["run"])


def evaluate_json(runner, *args: str) -> dict:
    result = runner.invoke(app, ["evaluate", *args, "--json"], env=ENV)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_evaluate_json_with_dataset(searched, runner):
    out = evaluate_json(runner, "--run", str(searched["run"]), "--dataset", str(searched["folder"]))
    assert set(out) == {"metrics", "queries"}
    assert out["queries"] == 4
    assert list(out["metrics"]) == list(DEFAULT_MEASURES)
    expected = evaluate_run(read_run(searched["run"]), load_beir(searched["folder"]).split("test").qrels)
    assert out["metrics"] == pytest.approx(expected, abs=1e-12)
    assert out["metrics"]["RR@10"] == 1.0  # every test query ranks its relevant document first


def test_evaluate_with_qrels_file_and_measures(searched, runner, tmp_path):
    by_dataset = evaluate_json(runner, "--run", str(searched["run"]), "--dataset", str(searched["folder"]),
                               "--measures", "nDCG@3,R@1,P@5")
    qrels = searched["folder"] / "qrels" / "test.tsv"
    by_file = evaluate_json(runner, "--run", str(searched["run"]), "--qrels", str(qrels), "--measures", "nDCG@3,R@1,P@5")
    assert by_file == by_dataset
    assert list(by_file["metrics"]) == ["nDCG@3", "R@1", "P@5"]
    # TREC-format qrels (qid 0 docid rel) give the same numbers
    trec = tmp_path / "qrels.trec"
    rows = [line.split("\t") for line in qrels.read_text().splitlines()[1:]]
    trec.write_text("".join(f"{q} 0 {d} {r}\n" for q, d, r in rows))
    assert evaluate_json(runner, "--run", str(searched["run"]), "--qrels", str(trec), "--measures",
                         "nDCG@3,R@1,P@5") == by_file


def test_evaluate_compare_adds_p_values(searched, runner, tmp_path):
    base = read_run(searched["run"])
    worse = {q: {d: -s for d, s in docs.items()} for q, docs in base.items()}  # the ranking reversed
    other = tmp_path / "worse.run"
    write_run(other, worse, tag="worse")
    out = evaluate_json(runner, "--run", str(searched["run"]), "--qrels",
                        str(searched["folder"] / "qrels" / "test.tsv"), "--compare", str(other))
    assert set(out) == {"metrics", "queries", "compare", "p_value"}
    assert out["compare"]["run"] == str(other)
    qrels = load_beir(searched["folder"]).split("test").qrels
    assert out["compare"]["metrics"] == pytest.approx(evaluate_run(worse, qrels), abs=1e-12)
    assert out["compare"]["metrics"]["RR@10"] < out["metrics"]["RR@10"]
    a, b = per_query(base, qrels), per_query(worse, qrels)
    assert set(out["p_value"]) == set(DEFAULT_MEASURES)
    for name in DEFAULT_MEASURES:
        assert out["p_value"][name] == pytest.approx(paired_test(a[name], b[name]), abs=1e-12)
    assert out["p_value"]["RR@10"]["mean_diff"] < 0
    assert out["p_value"]["R@100"] == {"mean_diff": 0.0, "t_test": 1.0, "randomization": 1.0}  # same documents


def test_evaluate_prints_a_table(searched, runner, tmp_path):
    result = runner.invoke(app, ["evaluate", "--run", str(searched["run"]), "--dataset", str(searched["folder"]),
                                 "--compare", str(searched["run"])], env=ENV)
    assert result.exit_code == 0, result.output
    assert "4 queries" in result.stdout
    for name in DEFAULT_MEASURES:
        assert name in result.stdout
    assert "1.0000" in result.stdout  # RR@10 of the base run


# --------------------------------------------------------------------------- errors


def test_error_bad_run_file(searched, runner, tmp_path):
    bad = tmp_path / "bad.run"
    bad.write_text("q5 Q0 d7 1 0.9 base\nq5 Q0 d6 2 0.8\n")
    result = runner.invoke(app, ["evaluate", "--run", str(bad), "--dataset", str(searched["folder"])], env=ENV)
    assert_clean_error(result, f"{bad}:2:", "expected 6 columns")


def test_error_dataset_and_qrels_both_or_neither(searched, runner):
    qrels = searched["folder"] / "qrels" / "test.tsv"
    both = runner.invoke(app, ["evaluate", "--run", str(searched["run"]), "--dataset", str(searched["folder"]),
                               "--qrels", str(qrels)], env=ENV)
    assert_clean_error(both, "exactly one of --dataset")
    neither = runner.invoke(app, ["evaluate", "--run", str(searched["run"])], env=ENV)
    assert_clean_error(neither, "exactly one of --dataset")


def test_error_unknown_measure(searched, runner):
    result = runner.invoke(app, ["evaluate", "--run", str(searched["run"]), "--dataset", str(searched["folder"]),
                                 "--measures", "nDCG@10,MRR@10"], env=ENV)
    assert_clean_error(result, "Unknown measure 'MRR@10'")


def test_error_missing_qrels_and_run_files(searched, runner, tmp_path):
    result = runner.invoke(app, ["evaluate", "--run", str(searched["run"]), "--qrels", str(tmp_path / "no.tsv")],
                           env=ENV)
    assert_clean_error(result, "Missing qrels file", str(tmp_path / "no.tsv"))
    result = runner.invoke(app, ["evaluate", "--run", str(tmp_path / "no.run"), "--dataset", str(searched["folder"])],
                           env=ENV)
    assert_clean_error(result, "Missing run file")


def test_error_search_unknown_split(searched, runner, tmp_path):
    out = tmp_path / "x.run"
    result = runner.invoke(app, ["search", "--dataset", str(searched["folder"]), "--split", "dev", "--output", str(out),
                                 "--cache-dir", str(tmp_path / "cache"), "--no-download"], env=ENV)
    assert_clean_error(result, "no split 'dev'", "available: test, train")
    assert not out.exists()
    assert not (tmp_path / "cache").exists()


def test_error_search_unknown_dataset_offline(runner, tmp_path):
    result = runner.invoke(app, ["search", "--dataset", "nosuchset", "--data-dir", str(tmp_path / "d"), "--output",
                                 str(tmp_path / "x.run"), "--cache-dir", str(tmp_path / "cache"), "--no-download"],
                           env=ENV)
    assert_clean_error(result, "'nosuchset' not found in:", str(tmp_path / "d"), str(tmp_path / "cache" / "datasets"))


def test_error_search_malformed_corpus(runner, tiny_beir, tmp_path):
    folder = tiny_beir()
    lines = (folder / "corpus.jsonl").read_text().splitlines()
    lines[6] = '{"_id": "d7", "text": '
    (folder / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    result = runner.invoke(app, ["search", "--dataset", str(folder), "--output", str(tmp_path / "x.run"),
                                 "--cache-dir", str(tmp_path / "cache"), "--no-download"], env=ENV)
    assert_clean_error(result, f"{folder / 'corpus.jsonl'}:7: malformed JSON")
    assert not (tmp_path / "x.run").exists()


def test_error_search_bad_precision(searched, runner, tmp_path):
    result = runner.invoke(app, ["search", "--dataset", str(searched["folder"]), "--output", str(tmp_path / "x.run"),
                                 "--cache-dir", str(tmp_path / "cache"), "--precision", "fp8"], env=ENV)
    assert_clean_error(result, "precision must be one of")
    assert not (tmp_path / "x.run").exists()


def test_error_a_device_this_torch_cannot_use(searched, runner, tmp_path):
    for device, message in (("gpu", "Unknown device 'gpu'"), ("cuda:7", "cuda:7")):
        result = runner.invoke(app, ["search", "--dataset", str(searched["folder"]), "--output", str(tmp_path / "x.run"),
                                     "--cache-dir", str(tmp_path / "cache"), "--device", device], env=ENV)
        assert_clean_error(result, message)
        assert not (tmp_path / "x.run").exists()


def test_error_search_bad_backend(searched, runner, tmp_path):
    result = runner.invoke(app, ["search", "--dataset", str(searched["folder"]), "--output", str(tmp_path / "x.run"),
                                 "--cache-dir", str(searched["cache"]), "--backend", "annoy"], env=ENV)
    assert_clean_error(result, "backend must be one of")
    assert np.all([not p.name.endswith(".partial") for p in (searched["cache"] / "embeddings").iterdir()])
