"""Figures the MLflow UI shows: training dynamics per trial and the shape of the sweep.

Matplotlib with the Agg backend (no display on a cluster); each function returns a Figure or None
when there is nothing to draw, and the caller logs it with ``mlflow.log_figure``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

Series = Sequence[tuple[int, float]]


@dataclass(frozen=True)
class TrialPoint:
    """One finished trial in objective space."""

    name: str
    search: float
    rec: float

    @property
    def unified(self) -> float:
        return (self.search + self.rec) / 2


def _is_conflict(key: str) -> bool:
    return "conflict" in key or "rho" in key


def _is_gate(key: str) -> bool:
    return key.startswith("gate") or "/gate" in key or ".gate" in key


def _is_val_ndcg(key: str) -> bool:
    return key.startswith("val/") and key.endswith("/full/ndcg_at_10")


def plot_training_dynamics(history: Mapping[str, Series], title: str = "") -> Figure | None:
    """Conflict coefficient(s) and gate weights over steps (the two things GEMS adapts to), and
    each task's val NDCG@10 (a task that gives up while the other improves shows at a glance)."""
    conflict = {k: v for k, v in history.items() if _is_conflict(k) and v}
    gates = {k: v for k, v in history.items() if _is_gate(k) and v}
    val = {k: v for k, v in history.items() if _is_val_ndcg(k) and v}
    if not conflict and not gates and not val:
        return None
    fig, (ax_c, ax_g, ax_v) = plt.subplots(1, 3, figsize=(14, 3.6))
    for key, points in sorted(val.items()):
        steps, values = zip(*sorted(points), strict=True)
        ax_v.plot(steps, values, marker=".", label=key.split("/")[1])
    ax_v.set(xlabel="step", ylabel="NDCG@10", title="val NDCG@10 per task (full catalog)")
    for key, points in sorted(conflict.items()):
        steps, values = zip(*sorted(points), strict=True)
        ax_c.plot(steps, values, marker=".", label=key)
    ax_c.axhline(0.0, color="grey", lw=0.8, ls="--")
    ax_c.set(xlabel="step", ylabel="conflict", title="gradient conflict (rho < 0 = conflicting)")
    for key, points in sorted(gates.items()):
        steps, values = zip(*sorted(points), strict=True)
        ax_g.plot(steps, values, marker=".", label=key)
    ax_g.set(xlabel="step", ylabel="weight", ylim=(0, 1), title="task gate weights")
    for ax in (ax_c, ax_g, ax_v):
        if ax.lines:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def plot_param_importances(importances: Mapping[str, float], title: str) -> Figure | None:
    """Horizontal bars of Optuna's (fANOVA) parameter importances."""
    if not importances:
        return None
    names = sorted(importances, key=importances.get)
    fig, ax = plt.subplots(figsize=(6, 0.45 * len(names) + 1.2))
    ax.barh(names, [importances[n] for n in names], color="tab:blue")
    ax.set(xlabel="importance (share of objective variance)", title=title)
    fig.tight_layout()
    return fig


def pareto_front(points: Sequence[TrialPoint]) -> list[TrialPoint]:
    """Trials no other trial beats on both search and rec (both maximised)."""
    front = []
    for p in points:
        dominated = any(q.search >= p.search and q.rec >= p.rec and (q.search > p.search or q.rec > p.rec)
                        for q in points)
        if not dominated:
            front.append(p)
    return sorted(front, key=lambda p: p.search)


def plot_search_vs_rec(points: Sequence[TrialPoint], best: str | None = None) -> Figure | None:
    """Each trial's val NDCG@10 on search vs rec, the Pareto front joined, the chosen trial ringed."""
    points = [p for p in points if math.isfinite(p.search) and math.isfinite(p.rec)]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    ax.scatter([p.search for p in points], [p.rec for p in points], c=[p.unified for p in points],
               cmap="viridis", s=40, zorder=3)
    front = pareto_front(points)
    ax.plot([p.search for p in front], [p.rec for p in front], color="tab:red", lw=1.2,
            label="Pareto front", zorder=2)
    for p in points:
        ax.annotate(p.name, (p.search, p.rec), fontsize=6, xytext=(3, 3), textcoords="offset points")
        if p.name == best:
            ax.scatter([p.search], [p.rec], s=160, facecolors="none", edgecolors="black", zorder=4,
                       label="selected (best unified)")
    ax.set(xlabel="search NDCG@10 (val)", ylabel="rec NDCG@10 (val)", title="trials: search vs rec")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _numeric_axes(row: Mapping[str, float | str], rows: Sequence[Mapping[str, float | str]],
                  axes: Sequence[str]) -> dict[str, float]:
    """A categorical parameter (e.g. train.loss) becomes the index of its value among those seen."""
    out = {}
    for a in axes:
        if any(isinstance(r[a], str) for r in rows):
            out[a] = float(sorted({str(r[a]) for r in rows}).index(str(row[a])))
        else:
            out[a] = float(row[a])
    return out


def plot_parallel_coordinates(rows: Sequence[Mapping[str, float]], params: Sequence[str],
                              metric: str) -> Figure | None:
    """One line per trial across its (min-max scaled) parameters, coloured by the metric."""
    rows = [r for r in rows if metric in r and all(p in r for p in params)]
    if not rows or not params:
        return None
    axes = list(params) + [metric]
    rows = [_numeric_axes(r, rows, axes) for r in rows]
    lows = {a: min(r[a] for r in rows) for a in axes}
    highs = {a: max(r[a] for r in rows) for a in axes}

    def scaled(row: Mapping[str, float], a: str) -> float:
        span = highs[a] - lows[a]
        return 0.5 if span == 0 else (row[a] - lows[a]) / span

    cmap = plt.get_cmap("viridis")
    fig, ax = plt.subplots(figsize=(1.4 * len(axes) + 2, 4))
    for row in rows:
        ax.plot(range(len(axes)), [scaled(row, a) for a in axes], color=cmap(scaled(row, metric)), alpha=0.8)
    ax.set_xticks(range(len(axes)), [f"{a}\n[{lows[a]:.3g}, {highs[a]:.3g}]" for a in axes], fontsize=7)
    ax.set_yticks([])
    ax.set_title(f"parallel coordinates (colour = {metric})")
    fig.tight_layout()
    return fig


def close(fig: Figure | None) -> None:
    if fig is not None:
        plt.close(fig)
