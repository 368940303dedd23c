"""A learnable toy prompt log for Ray Train tests (one and several nodes)."""

from __future__ import annotations

import random
from pathlib import Path

import polars as pl

from gems.data.shards import write_manifest
from gems.prompts import format_prompt

N_ITEMS = 12
TITLES = ["red stapler", "laser toner", "blue pen", "copy paper", "desk lamp", "coffee beans",
          "green tea", "yoga mat", "rain jacket", "dog food", "frying pan", "travel backpack"]


def write_toy_shards(root: Path) -> Path:
    """A learnable toy log: rec target = the item after the last one seen; search target = the
    item whose title is the query."""
    rng = random.Random(0)
    items = pl.DataFrame({"item_id": [str(i) for i in range(N_ITEMS)], "title": TITLES,
                          "text": TITLES, "category": ["misc"] * N_ITEMS})
    rows: dict[str, list[dict]] = {"train": [], "val": []}
    for split, n in (("train", 48), ("val", 8)):
        for i in range(n):
            for task in ("search", "rec"):
                hist = [str(rng.randrange(N_ITEMS)) for _ in range(3)]
                target = str((int(hist[-1]) + 1) % N_ITEMS) if task == "rec" else str(rng.randrange(N_ITEMS))
                query = TITLES[int(target)] if task == "search" else None
                prompt = format_prompt(task, [(h, TITLES[int(h)]) for h in hist], query, 2)
                rows[split].append({"example_id": f"{split}-{task}-{i}", "user_id": f"u{i}", "task": task,
                                    "split": split, "ts": 1_700_000_000 + i, "prompt": prompt,
                                    "query": query, "history_item_ids": hist, "target_item_id": target})
    shards = root / "shards"
    for split, split_rows in rows.items():
        (shards / split).mkdir(parents=True)
        pl.DataFrame(split_rows).write_parquet(shards / split / "part-0.parquet")
    (shards / "test").mkdir()
    items.write_parquet(shards / "items.parquet")
    write_manifest({"counts": {s: len(r) for s, r in rows.items()}}, shards)
    return shards
