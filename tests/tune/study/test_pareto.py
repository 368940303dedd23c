"""The study's Pareto picture: points per method from the results rows, and the retention front."""

from __future__ import annotations

from pathlib import Path

import pytest

from tune.study.pareto import method_points, plot_pareto, retention_front
from tune.study.results import RETENTION, Row, summarize


def _rows(method: str, seed: int, search: float, rec: float, ppl: float | None) -> list[Row]:
    rows = [Row(method, "search", "ndcg_at_10", "full", search, seed),
            Row(method, "rec", "ndcg_at_10", "full", rec, seed)]
    if ppl is not None:
        rows += [Row(method, "general", "ppl_increase", RETENTION, ppl, seed),
                 Row(method, "general", "kl", RETENTION, ppl / 2, seed)]
    return rows


def test_points_are_means_over_seeds_and_the_front_keeps_only_unbeaten_methods(tmp_path: Path) -> None:
    rows = [*_rows("gems", 0, 0.24, 0.03, 0.6), *_rows("gems", 1, 0.26, 0.05, 0.6),
            *_rows("adamw", 0, 0.25, 0.04, 3.0),   # same unified as gems, more forgetting: beaten
            *_rows("lora", 0, 0.10, 0.02, 0.1),    # least forgetting: on the front
            *_rows("full", 0, 0.30, 0.06, 4.0),    # best ranking: on the front
            *_rows("popularity", 0, 0.01, 0.01, None),
            Row("bm25", "search", "ndcg_at_10", "full", 0.25, 0)]  # search only: no point
    order = ["gems", "adamw", "lora", "full", "popularity", "bm25"]
    points = {p.method: p for p in method_points(summarize(rows), order, RETENTION)}
    assert set(points) == {"gems", "adamw", "lora", "full", "popularity"}
    assert points["gems"].search == pytest.approx(0.25) and points["gems"].rec == pytest.approx(0.04)
    assert points["gems"].search_std == pytest.approx(0.01414, abs=1e-4) and points["gems"].kl == 0.3
    assert points["popularity"].ppl_increase is None
    assert [p.method for p in retention_front(list(points.values()))] == ["lora", "gems", "full"]
    path = plot_pareto(summarize(rows), order, tmp_path / "pareto.png", RETENTION)
    assert path is not None and path.stat().st_size > 10_000
    assert plot_pareto(summarize(rows[-1:]), order, tmp_path / "none.png", RETENTION) is None
