"""Histories, examples and splits (gems.data.sequences) against a brute-force reference, plus the
split and prompt invariants on simulated logs run through the single-process pipeline."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gems.data.inprocess import preprocess_inprocess
from gems.data.plan import item_entries
from gems.data.schema import SPLITS, STAGED_SCHEMA, conform
from gems.data.sequences import SequenceParams, build_bucket
from gems.data.shards import read_items, read_split
from gems.items import item_token
from gems.prompts import format_prompt
from tune.config import load_config

NOW = 1_800_000_000
DAY0 = 1_735_689_600  # 2025-01-01


def _examples(tmp_path: Path, *overrides: str) -> tuple[pl.DataFrame, pl.DataFrame, dict, Path]:
    cfg = load_config("tiny", [f"state_dir={tmp_path}", f"data.now_ts={NOW}", *overrides])
    manifest = preprocess_inprocess(cfg)
    out = cfg.resolve(cfg.data.output_dir)
    examples = pl.concat([read_split(out, s) for s in SPLITS])
    events = pl.read_parquet(cfg.resolve(cfg.data.path) / "events" / "**" / "*.parquet")
    return examples, events, manifest, out


def _reference_history(clicks: list[dict], ts: int, target: str, h: int) -> list[str]:
    """The definition, written the slow obvious way."""
    earlier = [e["item_id"] for e in clicks if e["ts"] < ts][-h:]
    return [i for i in earlier if i != target]


@pytest.fixture(scope="module")
def simulated(tmp_path_factory: pytest.TempPathFactory) -> tuple[pl.DataFrame, pl.DataFrame, dict, Path]:
    return _examples(tmp_path_factory.mktemp("seq"), "data.synthetic_days=2")


def test_histories_match_the_definition(simulated) -> None:
    examples, events, _, _ = simulated
    clicks: dict[str, list[dict]] = {}
    for row in events.filter("clicked").sort("user_id", "ts", maintain_order=True).iter_rows(named=True):
        clicks.setdefault(row["user_id"], []).append(row)
    for ex in examples.iter_rows(named=True):
        assert ex["history_item_ids"] == _reference_history(clicks[ex["user_id"]], ex["ts"],
                                                            ex["target_item_id"], 5), ex["example_id"]
    # unified: search examples see items the user only clicked in rec, and vice versa
    only = {}
    for task, other in (("rec", "search"), ("search", "rec")):
        mine = set(events.filter(pl.col("clicked") & (pl.col("task") == task)).select("user_id", "item_id")
                   .iter_rows())
        theirs = set(events.filter(pl.col("clicked") & (pl.col("task") == other))
                     .select("user_id", "item_id").iter_rows())
        only[task] = mine - theirs
    for task, other in (("search", "rec"), ("rec", "search")):
        crossed = [ex for ex in examples.filter(pl.col("task") == task).iter_rows(named=True)
                   if any((ex["user_id"], i) in only[other] for i in ex["history_item_ids"])]
        assert crossed, f"no {task} example shows a {other}-only click in its history"


def test_split_never_puts_val_or_test_before_train(simulated) -> None:
    examples, _, manifest, _ = simulated
    per = examples.group_by("user_id", "task", "split").agg(pl.col("ts").min().alias("first"),
                                                            pl.col("ts").max().alias("last"),
                                                            pl.len().alias("n"))
    wide = {(r["user_id"], r["task"], r["split"]): r for r in per.iter_rows(named=True)}
    for (user, task, split), r in wide.items():
        if split in ("val", "test"):
            assert r["n"] == 1
            train = wide.get((user, task, "train"))
            assert train is None or r["first"] >= train["last"]
        if split == "val":
            assert r["last"] <= wide[(user, task, "test")]["first"]
    # every (user, task) with a click has exactly one test example
    assert examples.filter(pl.col("split") == "test").height == examples.select("user_id", "task").n_unique()
    assert sum(sum(v.values()) for v in manifest["counts"].values()) == examples.height


def test_prompts_carry_tag_and_query_never_the_target(simulated) -> None:
    examples, _, _, out = simulated
    titles = dict(read_items(out).select("item_id", "title").iter_rows())
    for ex in examples.iter_rows(named=True):
        prompt = ex["prompt"]
        assert prompt.startswith(f"[{ex['task']}] History: ")
        assert item_token(ex["target_item_id"]) not in prompt
        if ex["task"] == "search":
            assert ex["query"] and f"Query: {ex['query']}. Clicked item:" in prompt
        else:
            assert ex["query"] is None and "Query:" not in prompt and prompt.endswith("Next item:")
        history = [(i, titles[i]) for i in ex["history_item_ids"]]
        assert prompt == format_prompt(ex["task"], history, ex["query"], title_max_words=3)
        assert ex["target_item_id"] not in ex["negative_item_ids"]


def test_impressions_become_negatives_of_the_same_request(simulated) -> None:
    examples, events, manifest, _ = simulated
    shown = events.filter(~pl.col("clicked"))
    with_neg = examples.filter(pl.col("negative_item_ids").list.len() > 0)
    assert with_neg.height > 0
    keys = set(shown.select("user_id", "task", "ts", "item_id").iter_rows())
    for ex in with_neg.iter_rows(named=True):
        for item in ex["negative_item_ids"]:
            assert (ex["user_id"], ex["task"], ex["ts"], item) in keys
    assert manifest["accounting"]["impressions"] == shown.height


def test_time_cut_tests_on_the_cut_day_and_trains_before(tmp_path: Path) -> None:
    examples, events, manifest, _ = _examples(tmp_path, "data.synthetic_days=3", "data.split_mode=time_cut",
                                              "data.cut_day=2025-01-02")
    start, end = DAY0 + 86_400, DAY0 + 2 * 86_400
    test, val, train = (examples.filter(pl.col("split") == s) for s in ("test", "val", "train"))
    assert test.height > 0 and test["ts"].min() >= start and test["ts"].max() < end
    assert train["ts"].max() < start and val["ts"].max() < start
    assert manifest["examples_detail"]["examples_after_cut"] == events.filter(
        pl.col("clicked") & (pl.col("ts") >= end)).height
    last_before = train.group_by("user_id", "task").agg(pl.col("ts").max())
    joined = val.join(last_before, on=["user_id", "task"], suffix="_train")
    assert (joined["ts"] >= joined["ts_train"]).all()


# ------------------------------------------------------------------------------------------------
# Property test on build_bucket with arbitrary small logs (ties, repeats, impressions, duplicates)

EVENT = st.fixed_dictionaries({
    "user_id": st.sampled_from(["a", "b", "c"]),
    "ts": st.integers(0, 12),
    "task": st.sampled_from(["search", "rec"]),
    "item_id": st.sampled_from(["1", "2", "3", "4"]),
    "clicked": st.booleans(),
})


@settings(max_examples=60, deadline=None)
@given(rows=st.lists(EVENT, min_size=0, max_size=40), h=st.integers(1, 4))
def test_build_bucket_invariants(rows: list[dict], h: int) -> None:
    raw = pl.DataFrame(
        [{**r, "ts": DAY0 + r["ts"], "query": "q" if r["task"] == "search" else None,
          "source_file": "f", "source_row": i, "query_truncated": False, "rec_query_dropped": False}
         for i, r in enumerate(rows)],
        schema_overrides={"ts": pl.Int64})
    staged = conform(raw, STAGED_SCHEMA) if rows else pl.DataFrame(schema=STAGED_SCHEMA)
    items = pl.DataFrame({"item_id": ["1", "2", "3", "4"], "title": ["w x", "y", "z z z", "v"]})
    result = build_bucket(staged, item_entries(items, 2), SequenceParams(h))
    ex = result.examples
    unique = {(r["user_id"], r["ts"], r["task"], r["item_id"], r["clicked"]) for r in rows}
    assert result.stats["rows_valid"] + result.duplicates.height == len(rows)
    assert result.stats["rows_valid"] == len(unique)
    assert ex.height == len({u for u in unique if u[4]})
    assert ex["example_id"].n_unique() == ex.height
    seen, kept = set(), []  # first occurrence of each event, in input order
    for r in rows:
        key = (r["user_id"], r["ts"], r["task"], r["item_id"], r["clicked"])
        if key not in seen:
            seen.add(key)
            kept.append({**r, "ts": DAY0 + r["ts"]})
    clicks: dict[str, list[dict]] = {}
    for r in sorted((r for r in kept if r["clicked"]), key=lambda r: (r["user_id"], r["ts"])):
        clicks.setdefault(r["user_id"], []).append(r)
    for e in ex.iter_rows(named=True):
        assert e["history_item_ids"] == _reference_history(clicks[e["user_id"]], e["ts"],
                                                           e["target_item_id"], h)
        assert item_token(e["target_item_id"]) not in e["prompt"]
    for (_, _), group in ex.group_by("user_id", "task"):
        by_split = {s: group.filter(pl.col("split") == s)["ts"] for s in SPLITS}
        assert by_split["test"].len() == 1 and by_split["val"].len() <= 1
        later = pl.concat([by_split["val"], by_split["test"]])
        assert by_split["train"].is_empty() or later.min() >= by_split["train"].max()
