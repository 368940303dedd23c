"""Adapters on the real shared files: Qilin CSVs (the paper's format) and Amazon LC-Rec JSON.
Skipped with a message where ../shared/data is absent."""

from __future__ import annotations

import shutil
from pathlib import Path

import polars as pl
import pytest

from gems.data.amazon import BASE_TS, DAY_S, build_query, convert_amazon
from gems.data.inprocess import preprocess_inprocess
from gems.data.qilin import UNPARSABLE, convert_qilin
from gems.data.schema import SPLITS
from gems.data.shards import read_quarantine, read_split
from gems.paths import shared_file
from tune.config import load_config

QILIN = shared_file("qilin_toy", "notes.csv")
AMAZON = shared_file("amazon_office", "Office.inter.json")
needs_qilin = pytest.mark.skipif(QILIN is None, reason="shared Qilin toy files absent (../shared/data)")
needs_amazon = pytest.mark.skipif(AMAZON is None, reason="shared Amazon Office files absent (../shared/data)")


def _cfg(state: Path, *overrides: str):
    return load_config("tiny", [f"state_dir={state}", "data.now_ts=1800000000", *overrides])


@needs_qilin
def test_qilin_every_result_of_every_row_becomes_an_event() -> None:
    root = QILIN.parent
    out = convert_qilin(root)
    results = 0
    for name in ("search_train", "search_test", "recommendation_train", "recommendation_test"):
        df = pl.read_csv(root / f"{name}.csv", infer_schema_length=0)
        column = [c for c in df.columns if c.endswith("_details_with_idx")][0]
        results += int(df[column].str.count_matches(r"\{").sum())
    assert out.events.height == results and out.stats["unparsable_results"] == 0
    assert set(out.events["task"]) == {"search", "rec"}
    assert out.events["clicked"].sum() > 0 and (~out.events["clicked"]).sum() > 0
    # rec timestamps are milliseconds in the release; all land in late 2024 as seconds
    assert out.events["ts"].min() > 1_730_000_000 and out.events["ts"].max() < 1_740_000_000
    assert out.events.filter(pl.col("task") == "rec")["query"].null_count() == \
        out.events.filter(pl.col("task") == "rec").height
    assert out.items.height == 10 and out.items["title"].null_count() == 0


@needs_qilin
def test_qilin_logs_with_joining_notes_give_examples(tmp_path: Path) -> None:
    """The toy notes do not join the toy logs; real logs plus notes for their ids must."""
    root = tmp_path / "qilin"
    root.mkdir()
    for name in ("search_train.csv", "recommendation_train.csv"):
        shutil.copy(QILIN.parent / name, root / name)
    ids = convert_qilin_events_ids(root)
    pl.DataFrame({"note_idx": ids, "note_title": [f"笔记 {i}" for i in ids],
                  "note_content": ["内容"] * len(ids), "taxonomy1_id": ["t1"] * len(ids)}
                 ).write_csv(root / "notes.csv")
    # one broken result list, as a damaged export would have it
    broken = pl.read_csv(root / "search_train.csv", infer_schema_length=0)
    broken = broken.with_columns(pl.when(pl.int_range(pl.len()) == 0)
                                 .then(pl.lit("[{'click': oops, 'note_idx': x}]"))
                                 .otherwise(pl.col("search_result_details_with_idx"))
                                 .alias("search_result_details_with_idx"))
    broken.write_csv(root / "search_train.csv")
    cfg = _cfg(tmp_path / "state", "data.source=qilin", f"data.path={root}")
    manifest = preprocess_inprocess(cfg)
    acc = manifest["accounting"]
    assert acc["rows_in"] == acc["rows_valid"] + acc["rows_quarantined"] + acc["rows_deduplicated"]
    assert manifest["quarantine"] == {UNPARSABLE: 1}
    examples = pl.concat([read_split(cfg.resolve(cfg.data.output_dir), s) for s in SPLITS])
    assert examples.height == acc["clicked"] > 0
    search = examples.filter(pl.col("task") == "search")
    assert search.height > 0 and search["prompt"].str.contains("Query: ").all()
    assert manifest["examples_detail"]["negatives_attached"] > 0


def convert_qilin_events_ids(root: Path) -> list[str]:
    (root / "notes.csv").write_text("note_idx,note_title\n")
    return sorted(set(convert_qilin(root).events["item_id"].drop_nulls()))


@needs_amazon
def test_amazon_adapter_rule_and_share() -> None:
    out = convert_amazon(AMAZON.parent, search_share=0.5, seed=0)
    assert out.events.height == 53_258 and out.items.height == 2_420
    assert abs(out.stats["search_share_actual"] - 0.5) < 0.01
    ordered = out.events.with_columns(pl.int_range(pl.len()).over("user_id").alias("k"))
    assert (ordered["ts"] == BASE_TS + ordered["k"] * DAY_S).all()  # synthesised, monotone
    assert out.stats["items_titled_from_category"] == 3 and out.items["title"].null_count() == 0
    assert build_query("VTECH CS6114 DECT 6.0 Cordless Phone, White/Grey, 1 Handset",
                       "Office Electronics, Telephones & Accessories, Cordless Telephones",
                       "VTech") == "cordless telephones dect phone"
    assert build_query("VTECH CS6114 DECT 6.0 Cordless Phone", "Office Electronics, Cordless Telephones",
                       "VTech", title_words=0) == "cordless telephones"
    search = out.events.filter(pl.col("task") == "search")
    assert search.group_by("item_id").agg(pl.col("query").n_unique())["query"].max() == 1  # per item
    leaf_words = search.join(out.items, on="item_id").select(
        pl.col("category").str.split(" > ").list.last().str.to_lowercase().str.extract(r"([a-z0-9]+)")
        .alias("w"), "query")
    assert all(w is None or q.startswith(w) for w, q in leaf_words.iter_rows())
    again = convert_amazon(AMAZON.parent, search_share=0.5, seed=0)
    assert again.events.equals(out.events)
    assert convert_amazon(AMAZON.parent, search_share=0.0, seed=0).stats["search_events"] == 0
    category_only = convert_amazon(AMAZON.parent, search_share=0.5, seed=0, query_title_words=0).events
    assert category_only["task"].equals(out.events["task"])  # same events, shorter queries
    assert category_only["query"].n_unique() < out.events["query"].n_unique()


@needs_amazon
def test_amazon_through_the_pipeline(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path / "state", "data.source=amazon", f"data.path={AMAZON.parent}",
               "data.amazon_search_share=0.3")
    manifest = preprocess_inprocess(cfg)
    acc = manifest["accounting"]
    assert acc["rows_in"] == 53_258 == acc["rows_valid"] + acc["rows_quarantined"] + acc["rows_deduplicated"]
    counts = manifest["counts"]
    events = convert_amazon(AMAZON.parent, search_share=0.3, seed=0).events
    for task in ("search", "rec"):  # one test example per user and task
        assert counts["test"][task] == events.filter(pl.col("task") == task)["user_id"].n_unique()
    assert 0.25 < sum(v["search"] for v in counts.values()) / manifest["examples"] < 0.35
    assert read_quarantine(cfg.resolve(cfg.data.output_dir)).height == acc["rows_quarantined"] + \
        acc["rows_deduplicated"]
    assert manifest["adapter"]["amazon"]["search_share_target"] == 0.3
