"""Adaptive task gate: how much of each task-specific update enters the weight update.

``(a_search, a_rec) = softmax(z / tau)`` where ``z_x`` mixes task x's share of the loss, of the
gradient norm and of the samples (weights ``gems.gate_weights``). A task that is behind (larger
loss share) or pulls harder (larger gradient share) gets more of its own subspace's update.
``tau -> inf`` gives equal gates, ``tau -> 0`` picks the task with the largest ``z``. A task absent
from the step gets gate 0 (it has no gradient to contribute) and the other one gets 1.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from gems.config import GateWeights
from gems.tasks import TASKS


@dataclass(frozen=True)
class TaskStats:
    """One task's statistics at one step (all non-negative)."""

    loss: float
    grad_norm: float
    samples: float

    @property
    def present(self) -> bool:
        return self.samples > 0


def _shares(values: Mapping[str, float]) -> dict[str, float]:
    """Each value's share of the total; equal shares when the total is zero (no information)."""
    total = sum(values.values())
    if total <= 0 or not math.isfinite(total):
        return {k: 1.0 / len(values) for k in values}
    return {k: v / total for k, v in values.items()}


def gate_logits(stats: Mapping[str, TaskStats], weights: GateWeights) -> dict[str, float]:
    """``z_x = w_loss * loss share + w_grad * grad-norm share + w_samples * sample share``."""
    loss = _shares({t: s.loss for t, s in stats.items()})
    grad = _shares({t: s.grad_norm for t, s in stats.items()})
    samples = _shares({t: s.samples for t, s in stats.items()})
    return {t: weights.loss * loss[t] + weights.grad_norm * grad[t] + weights.samples * samples[t]
            for t in stats}


def task_gate(stats: Mapping[str, TaskStats], weights: GateWeights, tau: float,
              fixed_search: float | None = None) -> dict[str, float]:
    """Gate per task in ``TASKS``; sums to 1. ``fixed_search`` replaces the adaptive gate (ablation)."""
    if tau <= 0:
        raise ValueError(f"gems.tau must be > 0, got {tau}")
    unknown = set(stats) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown task(s) {sorted(unknown)}; expected {TASKS}")
    present = [t for t in TASKS if t in stats and stats[t].present]
    if not present:
        raise ValueError("task_gate: no task has samples in this step")
    if len(present) == 1:
        return {t: float(t == present[0]) for t in TASKS}
    if fixed_search is not None:
        return {"search": fixed_search, "rec": 1.0 - fixed_search}
    z = gate_logits({t: stats[t] for t in TASKS}, weights)
    top = max(z.values())
    exp = {t: math.exp((z[t] - top) / tau) for t in TASKS}  # shifted: no overflow at tiny tau
    total = sum(exp.values())
    return {t: exp[t] / total for t in TASKS}
