"""The study's Pareto picture: search vs rec NDCG@10, and ranking quality vs what general text lost.

One figure, two panels, every method at its mean over seeds (error bars: std). Left: search vs rec
NDCG@10 (full catalog), each LLM method's colour its perplexity increase on general text. Right:
unified NDCG@10 (the mean of the two tasks) vs perplexity increase, with the methods no other
method beats on both axes joined: what a user trades when choosing a method.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import polars as pl  # noqa: E402


@dataclass(frozen=True)
class MethodPoint:
    method: str
    search: float
    search_std: float
    rec: float
    rec_std: float
    ppl_increase: float | None  # None for floors (no language model to lose anything)
    kl: float | None

    @property
    def unified(self) -> float:
        return (self.search + self.rec) / 2


def method_points(summary: pl.DataFrame, method_order: Sequence[str],
                  retention_protocol: str = "retention") -> list[MethodPoint]:
    """Methods with both tasks' full-catalog NDCG@10 (BM25, search-only, has no point), from the
    study's summary (method, task, metric, protocol, mean, std)."""

    def value(method: str, task: str, metric: str, protocol: str) -> tuple[float, float] | None:
        hit = summary.filter((pl.col("method") == method) & (pl.col("task") == task)
                             & (pl.col("metric") == metric) & (pl.col("protocol") == protocol))
        return (hit["mean"][0], hit["std"][0]) if hit.height else None

    points = []
    for method in method_order:
        search = value(method, "search", "ndcg_at_10", "full")
        rec = value(method, "rec", "ndcg_at_10", "full")
        if search is None or rec is None:
            continue
        ppl = value(method, "general", "ppl_increase", retention_protocol)
        kl = value(method, "general", "kl", retention_protocol)
        points.append(MethodPoint(method, *search, *rec, ppl[0] if ppl else None, kl[0] if kl else None))
    return points


def retention_front(points: Sequence[MethodPoint]) -> list[MethodPoint]:
    """LLM methods not beaten on both unified NDCG@10 (higher) and perplexity increase (lower)."""
    llm = [p for p in points if p.ppl_increase is not None]
    front = [p for p in llm if not any(
        q.unified >= p.unified and q.ppl_increase <= p.ppl_increase  # type: ignore[operator]
        and (q.unified > p.unified or q.ppl_increase < p.ppl_increase)  # type: ignore[operator]
        for q in llm)]
    return sorted(front, key=lambda p: p.ppl_increase)  # type: ignore[arg-type,return-value]


def plot_pareto(summary: pl.DataFrame, method_order: Sequence[str], path: Path,
                retention_protocol: str = "retention") -> Path | None:
    points = method_points(summary, method_order, retention_protocol)
    if not points:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6))
    llm = [p for p in points if p.ppl_increase is not None]
    floors = [p for p in points if p.ppl_increase is None]
    if llm:
        drawn = left.scatter([p.search for p in llm], [p.rec for p in llm], c=[p.ppl_increase for p in llm],
                             cmap="viridis_r", s=50, zorder=3)
        fig.colorbar(drawn, ax=left, label="perplexity increase on general text (x)")
    left.scatter([p.search for p in floors], [p.rec for p in floors], marker="s", color="grey", zorder=3,
                 label="floors (no LLM)")
    for p in points:
        left.errorbar(p.search, p.rec, xerr=p.search_std, yerr=p.rec_std, color="lightgrey", zorder=1)
        left.annotate(p.method, (p.search, p.rec), fontsize=7, xytext=(3, 3), textcoords="offset points")
    left.set(xlabel="search NDCG@10 (full catalog)", ylabel="rec NDCG@10 (full catalog)",
             title="search vs rec (mean over seeds)")
    if floors:
        left.legend(fontsize=7, loc="lower right")
    for p in llm:
        right.scatter(p.ppl_increase, p.unified, color="tab:blue", zorder=3)
        kl = f", KL {p.kl:.2f}" if p.kl is not None else ""
        right.annotate(f"{p.method}{kl}", (p.ppl_increase, p.unified), fontsize=7, xytext=(3, 3),
                       textcoords="offset points")
    front = retention_front(points)
    if len(front) > 1:
        right.plot([p.ppl_increase for p in front], [p.unified for p in front], "--", color="tab:red",
                   label="Pareto front", zorder=2)
        right.legend(fontsize=7)
    right.set(xlabel="perplexity increase on general text (x, lower = better)",
              ylabel="unified NDCG@10 = (search + rec) / 2", title="ranking vs retention")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
