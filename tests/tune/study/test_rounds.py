"""Collecting a study's rounds: every row kept once, methods suffixed by their round."""

from __future__ import annotations

from pathlib import Path

import pytest

from tune.study.results import Row, read_rows, rows_frame
from tune.study.rounds import collect_rounds, write_all_rounds


def _write(path: Path, rows: list[Row]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "results.csv").write_text(rows_frame(rows).write_csv())


def test_rounds_are_suffixed_and_every_row_kept(tmp_path: Path) -> None:
    first = [Row("gems", "rec", "ndcg_at_10", "full", 0.01, 0),
             Row("adamw", "rec", "ndcg_at_10", "full", 0.02, 0)]
    tenth = [Row("gems[alpha=4,r_shared=64]", "search", "ndcg_at_10", "full", 0.23, 0)]
    second = [Row("gems", "rec", "ndcg_at_10", "full", 0.04, 1)]
    _write(tmp_path, first)
    _write(tmp_path / "round10", tenth)
    _write(tmp_path / "round2", second)
    (tmp_path / "round3").mkdir()            # no results yet: not a round
    rows = collect_rounds(tmp_path)
    assert [r.method for r in rows] == ["gems@round1", "adamw@round1", "gems@round2",
                                        "gems[alpha=4,r_shared=64]@round10"]
    assert [r.value for r in rows] == [0.01, 0.02, 0.04, 0.23]
    out = tmp_path / "all.csv"
    assert write_all_rounds(tmp_path, out) == 4
    assert read_rows(out) == rows            # the study's schema round-trips, commas in names included


def test_no_results_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no results.csv"):
        collect_rounds(tmp_path)


def test_round1_directory_beside_the_root_results_is_ambiguous(tmp_path: Path) -> None:
    _write(tmp_path, [Row("gems", "rec", "mrr", "full", 0.1, 0)])
    _write(tmp_path / "round1", [Row("gems", "rec", "mrr", "full", 0.2, 0)])
    with pytest.raises(ValueError, match="round1"):
        collect_rounds(tmp_path)


def test_without_root_results_a_round1_directory_is_round_one(tmp_path: Path) -> None:
    _write(tmp_path / "round1", [Row("gems", "rec", "mrr", "full", 0.2, 0)])
    assert [r.method for r in collect_rounds(tmp_path)] == ["gems@round1"]
