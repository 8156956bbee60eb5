"""benchmarks/seed_spread.py: issue #12's criteria and the table over seeds, from results of known figures, and the
per-seed files it resumes from (no training: the protocol itself is all_collections.py's, tested elsewhere)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from imrnn.config import TrainConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import seed_spread  # noqa: E402


def system(ndcg: float, p: float = 0.5) -> dict:
    return {"test": {"adapted": {"nDCG@10": ndcg}, "p_value": {"nDCG@10": p}}}


def collection(queries: int, base: float, rocchio: float, linear: float, recipe: float, p: float = 0.5) -> dict:
    return {"queries": queries, "systems": {"base": system(base), "Rocchio": system(rocchio),
                                            "linear adapter": system(linear), "default recipe": system(recipe, p)}}


def results(seed: int, **collections: dict) -> dict:
    return {"recipe": TrainConfig(seed=seed).to_dict(), "collections": collections}


def test_the_criteria_count_each_target_of_issue_12():
    by_name = results(1, big=collection(300, 0.50, 0.52, 0.60, 0.60),      # +20 %, ties the linear adapter
                      small_gain=collection(93, 0.40, 0.42, 0.40, 0.41),   # +2.5 %: under +3 % with >= 50 queries
                      few=collection(30, 0.80, 0.81, 0.70, 0.78, p=0.01))  # below base, p < 0.05, few queries
    c = seed_spread.criteria(by_name, ["big", "small_gain", "few"])
    assert c["mean gain"] == pytest.approx((0.2 + 0.025 - 0.025) / 3)
    assert c["below +3 % with >= 50 queries"] == ["small_gain"]
    assert c["below base with p < 0.05"] == ["few"]
    assert c["beats Rocchio on"] == 1 and c["beats the linear adapter on"] == 2


def test_the_table_has_a_column_per_seed_and_their_mean():
    by_seed = {1: results(1, a=collection(60, 0.5, 0.5, 0.5, 0.55)), 2: results(2, a=collection(60, 0.5, 0.5, 0.5, 0.65))}
    table = seed_spread.tables(by_seed, ["a"])
    first_row = next(line for line in table.splitlines() if line.startswith("| a (60)"))  # Rocchio's
    assert "| seed 1 | seed 2 | mean |" in table
    assert "| default recipe | +10.0% | +30.0% | +20.0% |" in table
    assert "| 0.5000 | Rocchio | +0.0% | +0.0% | +0.0% |" in first_row
    assert "| 2 | +30.00% | none | none | 1/1 | 1/1 |" in table


def test_a_seed_file_is_resumed_collection_by_collection_and_another_recipe_is_refused(tmp_path):
    path = seed_spread.seed_file(tmp_path, 7)
    path.write_text(json.dumps(results(7, a=collection(60, 0.5, 0.5, 0.5, 0.55))))
    assert seed_spread.run_seed(7, ["a"], path)["collections"]["a"]["queries"] == 60  # nothing re-run
    with pytest.raises(SystemExit, match="another recipe"):
        seed_spread.run_seed(8, ["a"], path)
    old = results(7, a=collection(60, 0.5, 0.5, 0.5, 0.55))
    del old["recipe"]["validation_folds"]  # written before the field existed: one adapter per training
    path.write_text(json.dumps(old))
    assert seed_spread.run_seed(7, ["a"], path, {"validation_folds": 1})["collections"]["a"]["queries"] == 60
    with pytest.raises(SystemExit, match="another recipe"):
        seed_spread.run_seed(7, ["a"], path)  # the default soup is not what that file holds


def full_system(ndcg: float, improved: int = 0, worsened: int = 0) -> dict:
    """A system's record as run_collection writes it, with what the per-collection table reads."""
    return {"test": {"adapted": {"nDCG@10": ndcg}, "p_value": {"nDCG@10": 0.01}, "improved": improved,
                     "worsened": worsened}, "unseen_relevant": {"queries": 4, "adapted": ndcg - 0.1},
            "validation_nDCG@10": ndcg + 0.05, "train_seconds": 12.4}


def test_per_collection_prints_each_seeds_full_table_from_its_file(tmp_path, monkeypatch, capsys):
    record = {"queries": 60, "protocol": "5-fold CV",
              "systems": {"base": full_system(0.5), "Rocchio": full_system(0.5), "linear adapter": full_system(0.5),
                          "default recipe": full_system(0.55, improved=9, worsened=2)}}
    seed_spread.seed_file(tmp_path, 7).write_text(json.dumps(results(7, a=record)))
    monkeypatch.setattr(sys, "argv", ["seed_spread.py", "--seeds", "7", "--datasets", "a", "--output-dir", str(tmp_path),
                                      "--per-collection"])
    monkeypatch.setattr(seed_spread, "COLLECTIONS", ("a",))
    seed_spread.main()  # nothing is run: the seed file holds the collection
    out = capsys.readouterr().out
    assert "Seed 7:" in out
    rows = [line for line in out.splitlines() if line.startswith("| a (5-fold CV, 60) | base |")]
    assert len(rows) == 1  # the label on the collection's first row, the frozen retriever's
    assert "|  | default recipe | 0.6000 | 0.5500 | +10.0% | 1.0e-02 | 9/2 | 0.4500 (4) | 12 |" in out
    assert "| 7 | +10.00% | none | none | 1/1 | 1/1 |" in out  # the summary over seeds still follows


def test_a_seed_file_from_before_the_loss_choice_holds_the_pooled_loss(tmp_path):
    path = seed_spread.seed_file(tmp_path, 7)
    old = results(7, a=collection(60, 0.5, 0.5, 0.5, 0.55))
    del old["recipe"]["choose_query_balanced"]
    path.write_text(json.dumps(old))
    assert seed_spread.run_seed(7, ["a"], path, {"choose_query_balanced": False})["collections"]["a"]["queries"] == 60
    with pytest.raises(SystemExit, match="another recipe"):
        seed_spread.run_seed(7, ["a"], path)
