"""Each test row's full-catalog rank per method and seed, and the split that explains val vs test.

A study's results.csv holds means; the per-row ranks (``ranks/<method>-seed<s>.parquet``, one row
per test example: example_id, task, target_item_id, rank) let a later question be answered without
retraining. The first such question: test targets are later clicks, less often training targets
than val's, so ``seen_split`` reports NDCG@10 and Hit@10 separately for rows whose target item was
(or was never) a training target: a method whose unseen rows collapse explains a val/test gap.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

import polars as pl

from tune.study.results import safe_name

RANK_COLUMNS: tuple[str, ...] = ("example_id", "task", "target_item_id", "rank")
RANKS_DIR = "ranks"


def write_ranks(out_dir: Path, label: str, seed: int, top_k: pl.DataFrame | None) -> Path | None:
    """Write one run's per-row ranks (None when the evaluation kept no rows)."""
    if top_k is None or top_k.height == 0:
        return None
    missing = [c for c in RANK_COLUMNS if c not in top_k.columns]
    if missing:
        raise ValueError(f"ranks of {label} seed {seed} lack columns {missing}")
    path = Path(out_dir) / RANKS_DIR / f"{safe_name(label)}-seed{seed}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    top_k.select(RANK_COLUMNS).with_columns(method=pl.lit(label), seed=pl.lit(seed)).write_parquet(tmp)
    tmp.replace(path)
    return path


def read_ranks(out_dir: Path) -> pl.DataFrame:
    """Every run's ranks in ``out_dir`` (empty frame when none were written)."""
    paths = sorted((Path(out_dir) / RANKS_DIR).glob("*.parquet"))
    if not paths:
        return pl.DataFrame(schema={"example_id": pl.Utf8, "task": pl.Utf8, "target_item_id": pl.Utf8,
                                    "rank": pl.Int64, "method": pl.Utf8, "seed": pl.Int32})
    return pl.concat([pl.read_parquet(p) for p in paths], how="vertical_relaxed")


def seen_split(ranks: pl.DataFrame, train_targets: Collection[str]) -> pl.DataFrame:
    """Rows, NDCG@10 and Hit@10 per method, seed, task and whether the target was a training target."""
    seen = pl.Series(sorted({str(t) for t in train_targets}), dtype=pl.Utf8)
    ndcg = pl.when(pl.col("rank") <= 10).then(1.0 / (pl.col("rank") + 1).log(2)).otherwise(0.0)
    return (ranks.with_columns(seen=pl.col("target_item_id").cast(pl.Utf8).is_in(seen.implode()))
            .group_by("method", "seed", "task", "seen")
            .agg(rows=pl.len(), ndcg_at_10=ndcg.mean(), hit_at_10=(pl.col("rank") <= 10).mean())
            .sort("method", "seed", "task", "seen"))
