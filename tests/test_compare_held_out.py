"""benchmarks/compare_held_out.py: the difference of two recipes' held-out gains and its standard error, from
records of known per-query values, and the refusals (no training: the halves are all_collections.py's)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import compare_held_out  # noqa: E402


def record(base: list[float], recipe: list[float], ids: list[str] | None = None) -> dict:
    return {"per_query": {"query_ids": ids or [f"q{i}" for i in range(len(base))], "base": base, "recipe": recipe}}


def test_the_difference_of_mean_relative_gains_and_its_standard_error():
    reference = {"a": record([0.5, 0.5, 0.5, 0.5], [0.6, 0.5, 0.5, 0.4]), "b": record([0.2, 0.4], [0.3, 0.3])}
    candidate = {"a": record([0.5, 0.5, 0.5, 0.5], [0.7, 0.6, 0.5, 0.4]), "b": record([0.2, 0.4], [0.3, 0.5])}
    rows, summary = compare_held_out.compare(reference, candidate)
    assert [row["collection"] for row in rows] == ["a", "b"]
    assert rows[0]["reference"] == pytest.approx(0.0) and rows[0]["candidate"] == pytest.approx(0.1)  # 0.55 / 0.5 - 1
    assert rows[1]["reference"] == pytest.approx(0.0, abs=1e-12) and rows[1]["candidate"] == pytest.approx(1 / 3)  # 0.4 / 0.3 - 1
    assert summary["difference"] == pytest.approx((0.1 + 1 / 3) / 2) and summary["ahead"] == 2
    variance = np.var([0.1, 0.1, 0, 0], ddof=1) / 4 / 0.5**2 + np.var([0.0, 0.2], ddof=1) / 2 / 0.3**2
    assert summary["standard_error"] == pytest.approx(np.sqrt(variance) / 2)
    assert "+21.67 ±" in compare_held_out.table(rows, summary)


def test_identical_recipes_differ_by_nothing():
    same = {"a": record([0.5, 0.4, 0.3], [0.6, 0.4, 0.2])}
    rows, summary = compare_held_out.compare(same, same)
    assert summary["difference"] == 0 and summary["standard_error"] == 0 and rows[0]["p"] == 1.0


def test_runs_of_other_halves_or_without_per_query_values_are_refused(tmp_path):
    with pytest.raises(SystemExit, match="different queries or halves"):
        compare_held_out.compare({"a": record([0.5, 0.4], [0.5, 0.4], ["q1", "q2"])},
                                 {"a": record([0.5, 0.4], [0.5, 0.4], ["q1", "q3"])})
    with pytest.raises(SystemExit, match="share no collection"):
        compare_held_out.compare({"a": record([0.5], [0.5])}, {"b": record([0.5], [0.5])})
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"collections": {"a": {"held_out_validation": {"base": 0.5, "recipe": 0.6}}}}))
    with pytest.raises(SystemExit, match="no per-query held-out values for a"):
        compare_held_out.held_out(old)
    none = tmp_path / "none.json"
    none.write_text(json.dumps({"collections": {"a": {"systems": {}}}}))
    with pytest.raises(SystemExit, match="--held-out"):
        compare_held_out.held_out(none)
