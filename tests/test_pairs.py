"""Your own training data (`imrnn.pairs`): pairs + corpus in JSONL/CSV/TSV -> Dataset, every bad row a line-precise
DataError; and the single-split protocols of `imrnn train/run`: `--folds` (`workflow.cross_validate`) and
`--split-fractions`, end to end through the CLI on the tiny BEIR fixture."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from imrnn.cli import app
from imrnn.data import load_beir
from imrnn.errors import DataError
from imrnn.pairs import load_pairs, read_corpus
from imrnn.workflow import SplitPlan

from conftest import TINY_DOCS, TINY_QRELS, TINY_QUERIES
from test_pipeline import RUN_JSON, key_shape

README = Path(__file__).resolve().parents[1] / "README.md"
runner = CliRunner()
FIELDS = ("query_id", "query", "doc_id", "document", "grade")


def pair_rows(split: str, with_ids: bool = False) -> list[dict]:
    """TINY_QRELS[split] as pairs rows (query text, doc id, grade), in the BEIR split's query order."""
    return [{**({"query_id": q} if with_ids else {}), "query": TINY_QUERIES[q], "doc_id": d, "grade": g}
            for q, docs in TINY_QRELS[split].items() for d, g in docs.items()]


def write_rows(path: Path, rows: list[dict]) -> Path:
    """Rows as JSONL, or as CSV/TSV with a header (by the file's extension)."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        return path
    columns = [f for f in FIELDS if any(f in r for r in rows)] or list(rows[0])
    with open(path, "w", newline="", encoding="utf-8") as out:
        writer = csv.DictWriter(out, columns, delimiter="\t" if path.suffix == ".tsv" else ",")
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture
def beir(tmp_path, write_tiny_beir) -> Path:
    return write_tiny_beir(tmp_path / "data" / "tiny")


def error_of(call, *args, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        call(*args, **kwargs)
    return str(info.value)


# --------------------------------------------------------------------------- the happy paths


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".tsv"])
def test_pairs_in_every_format_give_the_beir_dataset(beir, tmp_path, suffix):
    pairs = write_rows(tmp_path / f"pairs{suffix}", pair_rows("train"))
    test = write_rows(tmp_path / f"test{suffix}", pair_rows("test"))
    dataset = load_pairs(pairs, beir / "corpus.jsonl", test)
    reference = load_beir(beir)
    assert dataset.name == "pairs" and dataset.splits == ["test", "train"]
    assert dataset.corpus.fingerprint() == reference.corpus.fingerprint()  # same corpus: cached embeddings are reused
    for split in ("train", "test"):
        ours, theirs = dataset.split(split), reference.split(split)
        assert ours.texts == theirs.texts  # queries numbered q1, q2, ... in file order: the BEIR order here
        assert [ours.qrels[q] for q in ours.ids] == [theirs.qrels[q] for q in theirs.ids]
    assert dataset.split("train").ids == ["q1", "q2", "q3", "q4"] and dataset.split("test").ids[0] == "q5"


def test_query_ids_reproduce_the_beir_splits_and_validation_carve(beir, tmp_path):
    """With the dataset's query ids the pairs route trains and validates on exactly the BEIR route's queries."""
    pairs = write_rows(tmp_path / "pairs.csv", pair_rows("train", with_ids=True)[::-1])  # file order does not matter
    dataset, reference = load_pairs(pairs, beir / "corpus.jsonl"), load_beir(beir)
    for seed in range(5):
        ours = SplitPlan.official(dataset, fraction=0.3, seed=seed)
        theirs = SplitPlan.official(reference, fraction=0.3, seed=seed)
        assert (ours.train, ours.validation) == (theirs.train, theirs.validation)


def test_document_texts_join_the_corpus_once_and_known_texts_reuse_their_id(beir, tmp_path):
    rows = [{"query": "What is the capital of France?", "document": "Lyon is a city in France."},
            {"query": "Which city is French?", "document": "Lyon is a city in France.", "grade": 2},
            {"query": "Which is the tallest mountain?", "document": TINY_DOCS["d3"][1]},  # a corpus text: its id
            {"query": "Which is the tallest mountain?", "doc_id": "d10", "grade": 0}]
    dataset = load_pairs(write_rows(tmp_path / "pairs.jsonl", rows), beir / "corpus.jsonl")
    added = [d for d in dataset.corpus.ids if d.startswith("text-")]
    assert len(added) == 1 and len(dataset.corpus) == len(TINY_DOCS) + 1
    assert dataset.qrels["train"] == {"q1": {added[0]: 1}, "q2": {added[0]: 2}, "q3": {"d3": 1, "d10": 0}}
    alone = load_pairs(write_rows(tmp_path / "texts.jsonl", rows[:3]))  # no corpus: the texts are the corpus
    assert len(alone.corpus) == 2 and alone.corpus.texts[0] == "Lyon is a city in France."


@pytest.mark.parametrize("suffix,delimiter", [(".csv", ","), (".tsv", "\t")])
def test_corpus_from_a_table_equals_the_jsonl_corpus(beir, tmp_path, suffix, delimiter):
    path = tmp_path / f"corpus{suffix}"
    with open(path, "w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out, delimiter=delimiter)
        writer.writerow(["id", "title", "text"])
        writer.writerows([d, title, text] for d, (title, text) in TINY_DOCS.items())
    table, jsonl = read_corpus(path), read_corpus(beir / "corpus.jsonl")
    assert table.fingerprint() == jsonl.fingerprint() == load_beir(beir).corpus.fingerprint()


# --------------------------------------------------------------------------- bad input: file and line in every error

GOOD = {"query": "What is the capital of France?", "doc_id": "d1"}


@pytest.mark.parametrize("rows,message", [  # the bad row is the last; {0}/{1}: the lines of the first two rows
    ([GOOD, {"query": "capital?", "doc_id": "d99"}], "unknown doc_id 'd99': it is not in the corpus"),
    ([GOOD, {"query": "  ", "doc_id": "d2"}], "blank \"query\""),
    ([GOOD, {"doc_id": "d2"}], "query\" (fields: "),
    ([GOOD, {"query": "x", "doc_id": "d2"}, GOOD], ("duplicate row: query 'What is the capital of France?' is already paired "
                                                    "with document 'd1' on line {0}")),
    ([GOOD, {"query": "x", "doc_id": "d2", "document": "text"}], "gives both \"doc_id\" and \"document\""),
    ([GOOD, {"query": "x", "grade": 1}], "has no \"doc_id\" and no (non-blank) \"document\""),
    ([GOOD, {"query": "x", "doc_id": "d2", "grade": "high"}], "grade 'high' is not an integer"),
    ([GOOD, {"query": "x", "doc_id": "d2", "grade": -1}], "grade '-1' is out of range"),
    ([GOOD, {"query": "x", "doc_id": "d2", "grade": 1.5}], "grade '1.5' is not an integer"),
    ([GOOD, {"query": "x", "doc_id": "two words"}], "contains whitespace"),
    ([{**GOOD, "query_id": "a"}, {"query": "x", "doc_id": "d2"}], "line {0} gives a query_id and line {1} does not"),
    ([{**GOOD, "query_id": "a"}, {"query": "x", "doc_id": "d2", "query_id": "a"}],
     "query_id 'a' has the text 'x', but line {0} gave it 'What is the capital of France?'"),
])
@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_each_bad_row_is_named_by_file_and_line(beir, tmp_path, rows, message, suffix):
    pairs = write_rows(tmp_path / f"pairs{suffix}", rows)
    first = 2 if suffix == ".csv" else 1  # a CSV file starts with its header row
    text = error_of(load_pairs, pairs, beir / "corpus.jsonl")
    assert text.startswith(f"{pairs}:{first + len(rows) - 1}: ") and message.format(first, first + 1) in text, text


@pytest.mark.parametrize("row,message", [
    ({"query": ["x"], "doc_id": "d2"}, "\"query\" must be a string, got list"),
    ({"query": "x", "doc_id": {"id": "d2"}}, "\"doc_id\" must be a string id, got dict"),
    ({"query": "x", "doc_id": "d2", "grade": True}, "grade 'True' is not an integer"),
])
def test_json_values_of_the_wrong_type(beir, tmp_path, row, message):
    pairs = write_rows(tmp_path / "pairs.jsonl", [GOOD, row])
    text = error_of(load_pairs, pairs, beir / "corpus.jsonl")
    assert text.startswith(f"{pairs}:2: ") and message in text, text


@pytest.mark.parametrize("name,content,line,message", [
    ("pairs.jsonl", '{"query": "q", "doc_id": "d1"}\nq2,d2\n', 2, "looks like a CSV/TSV row: one file must use one format"),
    ("pairs.csv", 'query,doc_id\nq,d1\n{"query": "q2", "doc_id": "d2"}\n', 3, "a JSON object in a CSV file (by its .csv extension)"),
    ("pairs.csv", "query,doc_id\nq,d1\nq2\td2\n", 3, "looks tab-separated (TSV), but the file is CSV"),
    ("pairs.tsv", "query\tdoc_id\nq\td1\nq2,d2\n", 3, "looks comma-separated (CSV), but the file is TSV"),
    ("pairs.csv", 'query,doc_id\nq,d1\n"unterminated,d2\n', 3, "unreadable CSV row"),
    ("pairs.csv", "query,doc_id,query\nq,d1,x\n", 1, "every column needs a distinct name"),
    ("pairs.txt", "query\tdoc_id\nq\td1\na,b\n", 3, ("1 cells, but the header (line 1) names 2: query, doc_id. The row "
                                                      "looks comma-separated (CSV), but the file is TSV (by its first line)")),
    ("pairs.jsonl", '{"query": "q", "doc_id": "d1"}\n[1, 2]\n', 2, "expected a JSON object, got list"),
    ("pairs.jsonl", '{"query": "q", "doc_id": "d1", "grade": 0}\n', None, "every pair has grade 0"),
    ("pairs.csv", "query,doc_id\n", None, "no pairs found"),
    ("pairs.csv", "\nWhat is X?,d1\n", 2, "names none of the columns query, doc_id, document, grade, query_id"),
])
def test_malformed_and_mixed_format_files(beir, tmp_path, name, content, line, message):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    text = error_of(load_pairs, path, beir / "corpus.jsonl")
    assert text.startswith(f"{path}:{line}: " if line else f"{path}: ") and message in text, text


def test_test_pairs_must_not_share_queries_with_training_pairs(beir, tmp_path):
    pairs = write_rows(tmp_path / "pairs.jsonl", [GOOD])
    test = write_rows(tmp_path / "test.jsonl", [{"query": "x", "doc_id": "d2"}, {**GOOD, "doc_id": "d3"}])
    text = error_of(load_pairs, pairs, beir / "corpus.jsonl", test)
    assert text.startswith(f"{test}:2: query 'What is the capital of France?' is also in {pairs}:1")


def test_doc_ids_need_a_corpus_and_missing_files_are_named(beir, tmp_path):
    pairs = write_rows(tmp_path / "pairs.jsonl", [GOOD])
    assert "no corpus file was given (--corpus)" in error_of(load_pairs, pairs)
    assert error_of(load_pairs, tmp_path / "nope.csv").startswith(f"Missing pairs file {tmp_path / 'nope.csv'}")
    assert error_of(load_pairs, pairs, tmp_path / "nope.jsonl").startswith("Missing corpus file")


@pytest.mark.parametrize("content,line,message", [
    ('{"_id": "d1", "text": "a"}\n{"_id": "d1", "text": "b"}\n', 2, "duplicate document id 'd1' (first on line 1)"),
    ('{"_id": "d1", "text": "a"}\n{"_id": "d2", "body": "b"}\n', 2, "has no \"text\" (fields: _id, body)"),
    ('{"_id": "d1", "id": "x", "text": "a"}\n', 1, "found _id and id"),
    ('{"text": "a"}\n', 1, "found none"),
    ('{"_id": "d1", "text": 5}\n', 1, "\"text\" must be a string, got int"),
])
def test_corpus_errors_are_named_by_line(tmp_path, content, line, message):
    path = tmp_path / "corpus.jsonl"
    path.write_text(content, encoding="utf-8")
    text = error_of(read_corpus, path)
    assert text.startswith(f"{path}:{line}: ") and message in text, text


# --------------------------------------------------------------------------- the command line

TRAIN = ["--epochs", "1", "--validation-fraction", "0.3", "--json"]


@pytest.fixture(scope="module")
def cli_data(tmp_path_factory, write_tiny_beir):
    root = tmp_path_factory.mktemp("pairs-cli")
    beir = write_tiny_beir(root / "data" / "tiny")
    pairs = write_rows(root / "pairs.csv", pair_rows("train"))
    test = write_rows(root / "test.tsv", pair_rows("test"))
    return root, beir, pairs, test


def test_train_from_pairs_through_the_cli(cli_data):
    root, beir, pairs, test = cli_data
    out = root / "ckpt-pairs"
    result = runner.invoke(app, ["train", "--pairs", str(pairs), "--corpus", str(beir / "corpus.jsonl"), "--test-pairs", str(test),
                                 "--output", str(out), "--cache-dir", str(root / "cache"), *TRAIN])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert key_shape(report) == RUN_JSON and report["queries"] == 4 and report["split"] == "test"
    saved = json.loads((out / "config.json").read_text())
    assert saved["data"]["dataset"] == "pairs" and saved["data"]["train_queries"] + saved["data"]["validation_queries"] == 4


def test_run_with_folds_reports_the_union_and_saves_one_checkpoint_per_fold(cli_data):
    root, beir, _, _ = cli_data
    out = root / "cv"
    result = runner.invoke(app, ["run", "--dataset", str(beir), "--folds", "2", "--output", str(out),
                                 "--cache-dir", str(root / "cache"), *TRAIN])
    assert result.exit_code == 0, result.output
    union = json.loads(result.stdout)
    assert key_shape(union) == RUN_JSON and union["queries"] == 4 and union["split"] == "union of 2 test folds"
    saved = json.loads((out / "cross_validation.json").read_text())
    assert saved["union"] == union and [f["queries"] for f in saved["folds"]] == [2, 2]
    for i, fold in enumerate(saved["folds"]):  # the union's means are the query-weighted means of the folds
        assert (out / f"fold-{i}" / "model.safetensors").is_file() and fold["checkpoint"] == str(out / f"fold-{i}")
    for side in ("base", "adapted"):
        expected = np.mean([f[side]["nDCG@10"] for f in saved["folds"]])
        assert union[side]["nDCG@10"] == pytest.approx(expected, rel=1e-9)


def test_split_fractions_over_pairs(cli_data):
    """--split-fractions (like --folds) re-splits the pairs when --pairs is given, else the --test-split queries."""
    root, beir, pairs, _ = cli_data
    result = runner.invoke(app, ["run", "--pairs", str(pairs), "--corpus", str(beir / "corpus.jsonl"), "--split-fractions",
                                 "0.5,0.25,0.25", "--output", str(root / "fr"), "--cache-dir", str(root / "cache"), *TRAIN])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["queries"] == 1
    saved = json.loads((root / "fr" / "config.json").read_text())["data"]
    assert (saved["dataset"], saved["train_queries"], saved["validation_queries"]) == ("pairs", 2, 1)


@pytest.mark.parametrize("args,message", [
    (["--pairs", "P", "--corpus", "C", "--dataset", "D"], "Give --dataset NAME or --pairs FILE, not both"),
    (["--dataset", "D", "--corpus", "C"], "--corpus and --test-pairs go with --pairs FILE"),
    (["--pairs", "P", "--corpus", "C", "--test-pairs", "T", "--folds", "2"], "--test-pairs fixes the test queries"),
    (["--dataset", "D", "--folds", "2", "--split-fractions", "0.7,0.15,0.15"], "not both"),
    (["--dataset", "D", "--folds", "2", "--validation-split", "disjoint"], "drop --train-split and --validation-split"),
    (["--dataset", "D", "--split-fractions", "0.7;0.3"], "expected three comma-separated numbers"),
    (["--dataset", "D", "--split-fractions", "0.7,0.2,0.2"], "Fractions must be three positive numbers summing to 1"),
    (["--pairs", "P", "--corpus", "C"], "no split 'test' to evaluate on"),
])
def test_cli_refuses_inconsistent_options(cli_data, args, message):
    root, beir, pairs, test = cli_data
    swap = {"P": str(pairs), "T": str(test), "C": str(beir / "corpus.jsonl"), "D": str(beir)}
    result = runner.invoke(app, ["run", *[swap.get(a, a) for a in args], "--cache-dir", str(root / "cache")])
    assert result.exit_code == 2 and message in result.output, result.output


def test_readme_pairs_example_runs(cli_data, tmp_path, monkeypatch, capsys):
    """The README's "Training from your own pairs" example, on the tiny data (2 folds instead of 5: 4 queries; 1 epoch)."""
    root, beir, _, _ = cli_data
    block = re.search(r"```python\n(from imrnn import SplitPlan, TrainConfig, Workspace\nfrom imrnn.pairs .*?)```",
                      README.read_text(), re.S)
    assert block, "README must keep its pairs example"
    code = block.group(1).replace("Workspace.open(dataset)", f"Workspace.open(dataset, cache_dir={str(root / 'cache')!r})")
    code = code.replace('SplitPlan.kfold(dataset.split("train"), 5)', 'SplitPlan.kfold(dataset.split("train"), 2)')
    code = code.replace("TrainConfig(seed=42)", "TrainConfig(seed=42, epochs=1)")
    write_rows(tmp_path / "pairs.jsonl", pair_rows("train"))
    write_rows(tmp_path / "test.csv", pair_rows("test"))
    (tmp_path / "corpus.jsonl").write_bytes((beir / "corpus.jsonl").read_bytes())
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    assert all(0.0 <= float(x) <= 1.0 for x in capsys.readouterr().out.split())
