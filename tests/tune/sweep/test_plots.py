"""Sweep figures: the Pareto front is right, and every figure renders from realistic inputs."""

from __future__ import annotations

import io

from hypothesis import given, settings
from hypothesis import strategies as st

from tune.sweep import plots
from tune.sweep.plots import TrialPoint, pareto_front


def test_pareto_front_keeps_exactly_the_undominated_trials() -> None:
    points = [TrialPoint("a", 0.1, 0.5), TrialPoint("b", 0.3, 0.3), TrialPoint("c", 0.2, 0.2),
              TrialPoint("d", 0.5, 0.1), TrialPoint("e", 0.3, 0.3)]
    assert [p.name for p in pareto_front(points)] == ["a", "b", "e", "d"]  # ties both stay


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1)), min_size=1, max_size=12))
def test_front_members_are_undominated_and_the_rest_dominated(pairs: list[tuple[float, float]]) -> None:
    points = [TrialPoint(str(i), s, r) for i, (s, r) in enumerate(pairs)]
    front = {p.name for p in pareto_front(points)}

    def dominates(q: TrialPoint, p: TrialPoint) -> bool:
        return q.search >= p.search and q.rec >= p.rec and (q.search > p.search or q.rec > p.rec)

    for p in points:
        assert (p.name in front) == (not any(dominates(q, p) for q in points))
    best = max(points, key=lambda p: p.unified)
    assert best.name in front or any(q.unified == best.unified and q.name in front for q in points)


def _png(fig: object) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")  # type: ignore[attr-defined]
    plots.close(fig)  # type: ignore[arg-type]
    return buffer.getvalue()


def test_figures_render_and_empty_inputs_give_none() -> None:
    history = {"train/gate_search": [(2, 0.5), (4, 0.6)], "train/gate_rec": [(2, 0.5), (4, 0.4)],
               "train/conflict_before_mean_rho": [(2, -0.1), (4, 0.2)], "train/loss": [(2, 3.0)]}
    points = [TrialPoint("t1", 0.1, 0.2), TrialPoint("t2", 0.2, 0.1)]
    rows = [{"gems.tau": 0.5, "train.lr": 1e-4, "unified": 0.1},
            {"gems.tau": 2.0, "train.lr": 3e-4, "unified": 0.2}]
    for fig in (plots.plot_training_dynamics(history, "trial t1"),
                plots.plot_search_vs_rec(points, best="t1"),
                plots.plot_parallel_coordinates(rows, ["gems.tau", "train.lr"], "unified"),
                plots.plot_param_importances({"gems.tau": 0.7, "train.lr": 0.3}, "importances")):
        assert fig is not None and _png(fig).startswith(b"\x89PNG")
    assert plots.plot_training_dynamics({"train/loss": [(1, 1.0)]}) is None
    assert plots.plot_search_vs_rec([]) is None
    assert plots.plot_parallel_coordinates([], ["gems.tau"], "unified") is None
    assert plots.plot_param_importances({}, "x") is None
