"""The adaptive task gate: a probability split, equal at large tau, argmax at tiny tau, 0 when absent."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gems.config import GateWeights
from gems.gate import TaskStats, gate_logits, task_gate
from gems.tasks import TASKS

positive = st.floats(0.0, 1e3, allow_nan=False)
weights = st.tuples(st.floats(0, 1), st.floats(0, 1), st.floats(0, 1)).filter(
    lambda t: sum(t) > 1e-3).map(lambda t: GateWeights(loss=t[0], grad_norm=t[1], samples=t[2]))
stats = st.builds(TaskStats, loss=positive, grad_norm=positive, samples=st.integers(1, 10_000))


@given(s=stats, r=stats, w=weights, tau=st.floats(1e-3, 1e3))
def test_gate_is_a_probability_split(s: TaskStats, r: TaskStats, w: GateWeights, tau: float) -> None:
    gate = task_gate({"search": s, "rec": r}, w, tau)
    assert set(gate) == set(TASKS)
    assert all(0 <= v <= 1 for v in gate.values())
    assert math.isclose(sum(gate.values()), 1.0, abs_tol=1e-12)


@given(s=stats, r=stats, w=weights)
def test_large_tau_gives_equal_gates(s: TaskStats, r: TaskStats, w: GateWeights) -> None:
    gate = task_gate({"search": s, "rec": r}, w, tau=1e6)
    assert abs(gate["search"] - 0.5) < 1e-6


@given(s=stats, r=stats, w=weights)
def test_tiny_tau_picks_the_task_with_the_larger_logit(s: TaskStats, r: TaskStats, w: GateWeights) -> None:
    z = gate_logits({"search": s, "rec": r}, w)
    if abs(z["search"] - z["rec"]) < 1e-3:
        return  # a near tie: no argmax to pick
    gate = task_gate({"search": s, "rec": r}, w, tau=1e-5)
    winner = max(z, key=z.get)
    assert gate[winner] > 1 - 1e-9


@given(s=stats, w=weights, tau=st.floats(1e-3, 1e3), missing=st.sampled_from(TASKS),
       fixed=st.none() | st.floats(0, 1))
def test_missing_task_gets_zero(s: TaskStats, w: GateWeights, tau: float, missing: str,
                                fixed: float | None) -> None:
    present = "rec" if missing == "search" else "search"
    gate = task_gate({present: s, missing: TaskStats(0.0, 0.0, 0)}, w, tau, fixed)
    assert gate == {missing: 0.0, present: 1.0}


@given(s=stats, r=stats)
def test_monotone_in_loss_share(s: TaskStats, r: TaskStats) -> None:
    """A task that is further behind (higher loss share) never gets a smaller gate."""
    w = GateWeights(loss=1.0, grad_norm=0.0, samples=0.0)
    worse = TaskStats(s.loss + 1.0, s.grad_norm, s.samples)
    assert task_gate({"search": worse, "rec": r}, w, 1.0)["search"] >= \
        task_gate({"search": s, "rec": r}, w, 1.0)["search"] - 1e-12


def test_fixed_gate_ablation_and_bad_input() -> None:
    both = {"search": TaskStats(1.0, 1.0, 3), "rec": TaskStats(2.0, 1.0, 3)}
    assert task_gate(both, GateWeights(), 1.0, fixed_search=0.3) == {"search": 0.3, "rec": 0.7}
    with pytest.raises(ValueError, match="gems.tau"):
        task_gate(both, GateWeights(), 0.0)
    with pytest.raises(ValueError, match="no task has samples"):
        task_gate({"search": TaskStats(0, 0, 0)}, GateWeights(), 1.0)
    with pytest.raises(ValueError, match="unknown task"):
        task_gate({"ads": TaskStats(1, 1, 1)}, GateWeights(), 1.0)
