"""The comparison's results: long-format rows, results.csv / results.md / timings.csv, and plots.

One row per (method, task, metric, protocol, seed): task is search | rec | general; protocol is
full | sampled for ranking metrics and retention for general-domain retention. The long format
makes "did every method produce every metric" a simple set comparison, and the readable table
(mean and spread over seeds) is derived from it. Files are rewritten after every finished run, so
an interrupted study keeps everything that finished.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import polars as pl  # noqa: E402

from gems.metrics import TaskMetrics  # noqa: E402
from gems.retention import RetentionResult  # noqa: E402
from gems.tasks import TASKS  # noqa: E402
from tune.study.pareto import plot_pareto  # noqa: E402

COLUMNS: tuple[str, ...] = ("method", "task", "metric", "protocol", "value", "seed")
SCHEMA = {"method": pl.Utf8, "task": pl.Utf8, "metric": pl.Utf8, "protocol": pl.Utf8,
          "value": pl.Float64, "seed": pl.Int64}
RANKING_METRICS: tuple[str, ...] = ("hit_at_1", "hit_at_5", "hit_at_10", "ndcg_at_5", "ndcg_at_10", "mrr")
RETENTION_METRICS: tuple[str, ...] = ("ppl_base", "ppl_tuned", "ppl_increase", "kl", "item_mass",
                                      "mmlu_base", "mmlu_tuned", "mmlu_drop")
RETENTION = "retention"


@dataclass(frozen=True)
class Row:
    method: str
    task: str
    metric: str
    protocol: str
    value: float
    seed: int


@dataclass(frozen=True)
class Timing:
    """Wall time of one method run (seconds); steps = optimizer steps (0 for floors)."""

    method: str
    seed: int
    steps: int
    train_s: float
    eval_s: float
    retention_s: float
    total_s: float
    step_s: float  # mean optimizer-step time reported by the training loop (nan for floors)
    # the training worker's last report (nan for floors and for runs written before they existed)
    trainable_params: float = math.nan
    optimizer_state_mb: float = math.nan
    peak_rss_gb: float = math.nan
    tokens_per_s: float = math.nan  # prompt tokens (not padding) trained per second, mean of the reports


def ranking_rows(method: str, seed: int, metrics: TaskMetrics) -> list[Row]:
    """Rows of a gems.evaluate result (ranking metrics only; counts are not metrics)."""
    return [Row(method, task, name, proto, float(value), seed)
            for task, protos in sorted(metrics.items())
            for proto, named in sorted(protos.items())
            for name, value in sorted(named.items()) if name in RANKING_METRICS]


def retention_rows(method: str, seed: int, r: RetentionResult) -> list[Row]:
    """General-domain rows: perplexities, relative perplexity increase, KL, MMLU and its drop."""
    values = {"ppl_base": r.ppl_base, "ppl_tuned": r.ppl_tuned,
              "ppl_increase": None if r.ppl_ratio is None else r.ppl_ratio - 1.0,
              "kl": r.kl, "item_mass": r.item_mass, "mmlu_base": r.mmlu_base, "mmlu_tuned": r.mmlu_tuned,
              "mmlu_drop": (None if r.mmlu_base is None or r.mmlu_tuned is None
                            else r.mmlu_base - r.mmlu_tuned)}
    return [Row(method, "general", name, RETENTION, float(v), seed) for name, v in values.items()
            if v is not None]


def rows_frame(rows: Iterable[Row]) -> pl.DataFrame:
    return pl.DataFrame([asdict(r) for r in rows], schema=SCHEMA)


def read_rows(path: Path) -> list[Row]:
    if not path.is_file():
        return []
    frame = pl.read_csv(path, schema_overrides=SCHEMA)
    if tuple(frame.columns) != COLUMNS:
        raise ValueError(f"{path} has columns {frame.columns}, expected {list(COLUMNS)}")
    return [Row(**r) for r in frame.iter_rows(named=True)]


def read_timings(path: Path) -> list[Timing]:
    if not path.is_file():
        return []
    return [Timing(**r) for r in pl.read_csv(path).iter_rows(named=True)]


def summarize(rows: Sequence[Row]) -> pl.DataFrame:
    """Mean, sample std (0 for one seed) and seed count per (method, task, metric, protocol)."""
    return (rows_frame(rows)
            .group_by(["method", "task", "metric", "protocol"], maintain_order=True)
            .agg(pl.col("value").mean().alias("mean"),
                 pl.col("value").std(ddof=1).fill_null(0.0).alias("std"),
                 pl.col("seed").n_unique().alias("seeds")))


def _cell(mean: float | None, std: float | None, seeds: int, digits: int = 4) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    text = f"{mean:.{digits}f}"
    return f"{text} ± {std:.{digits}f}" if seeds > 1 else text


def markdown_table(rows: Sequence[Row], method_order: Sequence[str], header: str = "",
                   num_negatives: int = 99) -> str:
    """results.md: per task/protocol a method x metric table (mean ± std over seeds)."""
    if not rows:
        return header + "\n(no results yet)\n"
    summary = summarize(rows)
    lookup = {(r["method"], r["task"], r["metric"], r["protocol"]): r for r in summary.iter_rows(named=True)}
    methods = [m for m in method_order if any(k[0] == m for k in lookup)]
    out = [header] if header else []
    sections = [("search", "full", RANKING_METRICS), ("rec", "full", RANKING_METRICS),
                ("search", "sampled", RANKING_METRICS), ("rec", "sampled", RANKING_METRICS),
                ("general", RETENTION, RETENTION_METRICS)]
    for task, proto, metrics in sections:
        present = [m for m in methods if any((m, task, x, proto) in lookup for x in metrics)]
        if not present:
            continue
        title = (f"{task} - {'full catalog' if proto == 'full' else f'{num_negatives} sampled negatives'}"
                 if task != "general" else "general-domain retention (tuned vs base)")
        out += [f"\n### {title}\n", "| method | " + " | ".join(metrics) + " | seeds |",
                "|---" * (len(metrics) + 2) + "|"]
        for m in present:
            cells, seeds = [], 0
            for x in metrics:
                r = lookup.get((m, task, x, proto))
                seeds = max(seeds, r["seeds"] if r else 0)
                cells.append(_cell(r["mean"], r["std"], r["seeds"]) if r else "-")
            out.append(f"| {m} | " + " | ".join(cells) + f" | {seeds} |")
    return "\n".join(out) + "\n"


def timings_table(timings: Sequence[Timing]) -> str:
    if not timings:
        return ""
    lines = ["\n### wall time per run (seconds) and cost\n",
             "| method | seed | steps | train | eval (test) | retention | total | s/step "
             "| trainable params (M) | optimizer state (MiB) | worker peak RSS (GiB) | tokens/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def shown(value: float, fmt: str) -> str:
        return "-" if math.isnan(value) else format(value, fmt)

    for t in timings:
        lines.append(f"| {t.method} | {t.seed} | {t.steps} | {t.train_s:.0f} | {t.eval_s:.0f} | "
                     f"{t.retention_s:.0f} | {t.total_s:.0f} | {shown(t.step_s, '.2f')} | "
                     f"{shown(t.trainable_params / 1e6, '.1f')} | {shown(t.optimizer_state_mb, '.0f')} | "
                     f"{shown(t.peak_rss_gb, '.2f')} | {shown(t.tokens_per_s, '.0f')} |")
    return "\n".join(lines) + "\n"


def write_results(out_dir: Path, rows: Sequence[Row], timings: Sequence[Timing],
                  method_order: Sequence[str], header: str, num_negatives: int = 99) -> dict[str, Path]:
    """Rewrite results.csv, timings.csv, results.md (atomically per file)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out_dir / "results.csv", "timings": out_dir / "timings.csv", "md": out_dir / "results.md"}
    _atomic(paths["csv"], rows_frame(rows).select(COLUMNS).write_csv())
    timing_frame = pl.DataFrame([asdict(t) for t in timings]) if timings else pl.DataFrame(
        schema={f: pl.Float64 for f in Timing.__dataclass_fields__})
    _atomic(paths["timings"], timing_frame.write_csv())
    _atomic(paths["md"], markdown_table(rows, method_order, header, num_negatives) + timings_table(timings))
    return paths


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


# ----------------------------------------------------------------------------------- plots


def _bar_panels(panels: Sequence[tuple[str, pl.DataFrame]], method_order: Sequence[str], path: Path,
                *, width: float, color: str, zero_line: bool = False, ylabel: str = "") -> Path:
    """One panel of bars per (title, summary rows): mean per method, error bars = std over seeds."""
    fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels), 3.6), squeeze=False)
    for ax, (title, rows) in zip(axes[0], panels, strict=True):
        part = {r["method"]: r for r in rows.iter_rows(named=True)}
        methods = [m for m in method_order if m in part]
        ax.bar(range(len(methods)), [part[m]["mean"] for m in methods],
               yerr=[part[m]["std"] for m in methods], capsize=3, color=color)
        ax.set_xticks(range(len(methods)), methods, rotation=30, ha="right", fontsize=8)
        if zero_line:
            ax.axhline(0.0, color="grey", lw=0.8)
        ax.set(title=title, ylabel=ylabel)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_metric_bars(rows: Sequence[Row], method_order: Sequence[str], path: Path,
                     metric: str = "ndcg_at_10", protocol: str = "full") -> Path | None:
    """Bars of ``metric`` per method, one panel per task (error bars = std over seeds)."""
    summary = summarize(rows).filter((pl.col("metric") == metric) & (pl.col("protocol") == protocol))
    if summary.height == 0:
        return None
    panels = [(f"{task}: {metric} ({protocol})", summary.filter(pl.col("task") == task))
              for task in TASKS if task in summary["task"].to_list()]
    return _bar_panels(panels, method_order, path, width=5, color="tab:blue", ylabel=metric)


def plot_retention_bars(rows: Sequence[Row], method_order: Sequence[str], path: Path) -> Path | None:
    """Perplexity increase, KL and MMLU drop per LLM method (lower is better in all three)."""
    summary = summarize(rows).filter(pl.col("protocol") == RETENTION)
    metrics = [m for m in ("ppl_increase", "kl", "mmlu_drop") if m in summary["metric"].to_list()]
    if not metrics:
        return None
    panels = [(f"general: {metric} (lower = better)", summary.filter(pl.col("metric") == metric))
              for metric in metrics]
    return _bar_panels(panels, method_order, path, width=4.2, color="tab:orange", zero_line=True)


def conflict_series(history: Sequence[Mapping[str, float]], key: str) -> list[tuple[int, float]]:
    return [(int(h["step"]), float(h[key])) for h in history
            if key in h and h[key] is not None and math.isfinite(float(h[key]))]


def plot_conflict(histories: Mapping[str, Sequence[Mapping[str, float]]], path: Path) -> Path | None:
    """Gradient conflict coefficient (mean cos(g_search, g_rec) over target layers) over steps."""
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    drawn = False
    for label, history in sorted(histories.items()):
        for key, style in (("train/conflict_before_mean_rho", "-"), ("train/conflict_after_mean_rho", ":")):
            series = conflict_series(history, key)
            if series:
                steps, values = zip(*series, strict=True)
                when = key.split("_")[1]
                ax.plot(steps, values, style, marker=".", label=f"{label} ({when} projection)"
                        if when == "after" else label)
                drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.axhline(0.0, color="grey", lw=0.8, ls="--")
    ax.set(xlabel="step", ylabel="mean rho = cos(g_search, g_rec)",
           title="gradient conflict over training (rho < 0 = conflicting)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


VAL_NDCG = "val/{task}/full/ndcg_at_10"


def plot_val_curves(histories: Mapping[str, Sequence[Mapping[str, float]]], path: Path) -> Path | None:
    """Val NDCG@10 (full catalog) per task over steps, one line per run: a run where one task
    gives up while the other improves is visible at a glance."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=False)
    drawn = False
    for ax, task in zip(axes, TASKS, strict=True):
        for label, history in sorted(histories.items()):
            series = conflict_series(history, VAL_NDCG.format(task=task))
            if len(series) > 0:
                steps, values = zip(*series, strict=True)
                ax.plot(steps, values, marker=".", label=label)
                drawn = True
        ax.set(xlabel="step", ylabel="val NDCG@10 (full catalog)", title=f"{task}")
        if ax.lines:
            ax.legend(fontsize=7)
    if not drawn:
        plt.close(fig)
        return None
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(out_dir: Path, rows: Sequence[Row], method_order: Sequence[str],
                histories: Mapping[tuple[str, int], Sequence[Mapping[str, float]]]) -> dict[str, Path]:
    """All figures of the study (those with data to draw), name -> file."""
    drawn = {
        "ndcg_bars": plot_metric_bars(rows, method_order, out_dir / "ndcg10_full.png"),
        "ndcg_bars_sampled": plot_metric_bars(rows, method_order, out_dir / "ndcg10_sampled.png",
                                              protocol="sampled"),
        "retention_bars": plot_retention_bars(rows, method_order, out_dir / "retention.png"),
        "conflict": plot_conflict({f"{m} s{s}": h for (m, s), h in histories.items()},
                                  out_dir / "conflict.png"),
        "val_curves": plot_val_curves({f"{m} s{s}": h for (m, s), h in histories.items()},
                                      out_dir / "val_ndcg10.png"),
        "pareto": plot_pareto(summarize(rows), method_order, out_dir / "pareto.png", RETENTION),
    }
    return {name: path for name, path in drawn.items() if path is not None}


def write_history(out_dir: Path, label: str, seed: int, history: Sequence[Mapping[str, float]]) -> Path:
    """Per-run training history (kept so plots can be redrawn after a resumed study)."""
    path = out_dir / "history" / f"{safe_name(label)}-seed{seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"method": label, "seed": seed, "history": list(history)}, indent=1))
    return path


def read_histories(out_dir: Path) -> dict[tuple[str, int], list[dict[str, float]]]:
    out = {}
    for f in sorted((out_dir / "history").glob("*.json")):
        raw = json.loads(f.read_text())
        out[(raw["method"], int(raw["seed"]))] = raw["history"]
    return out


def safe_name(label: str) -> str:
    """A method label as a file/run name: gems[k=0] -> gems_k=0_."""
    return "".join(c if c.isalnum() or c in "-_=." else "_" for c in label)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    return (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
