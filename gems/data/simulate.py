"""Synthetic query/click logs in the raw-log contract, with shared signal between the two tasks.

Model (all vectorised with numpy; 1M events take seconds):
- items: a readable title ``Brand Adjective Noun Variant`` and a ``Department > Subcategory``
  category (the subcategory is the item's topic); a log-normal popularity; a release day (the
  day-0 catalog, then ``new_item_rate`` x catalog new items every later day);
- users: sparse latent interests over topics (Dirichlet), an activity level and a search
  propensity; interests drift every day towards a fresh Dirichlet draw;
- each event: the topic is drawn from the user's interests, except that with ``p_continue`` it
  repeats the topic of the user's previous event that day (recency of behaviour); the clicked item
  is drawn within the topic by popularity x freshness (new items are boosted), flatter for search;
- search events carry a query built from the clicked item's words (noun, sometimes the adjective
  or brand, sometimes the subcategory instead of the noun, sometimes a noise word);
- with ``p_impression`` an event also has an unclicked impression (``clicked=false``) of another
  item of the topic at the same second: a real negative.

Both tasks are driven by the same interests and items, which is what lets one model learn both.
Every day uses its own seeded generators, so simulating D+1 days reproduces the first D days
exactly (nightly runs append a partition). Output: ``OUT/events/dt=YYYY-MM-DD/part-*.parquet``,
``OUT/items.parquet`` and ``OUT/simulation.json``.

Run: python -m gems.data.simulate --users 1000 --items 500 --days 3 --seed 0 --out /tmp/sim
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import asdict, dataclass
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import polars as pl

from gems.data.catalog_words import ADJECTIVES, BRANDS, DEPARTMENTS, QUERY_NOISE, VARIANTS

MARKER = "simulation.json"
ROWS_PER_FILE = 500_000


@dataclass(frozen=True)
class SimulationParams:
    users: int
    items: int
    days: int
    seed: int = 0
    events_per_user_day: float = 12.0
    start_date: str = "2025-01-01"
    new_item_rate: float = 0.02
    interest_concentration: float = 0.3
    interest_drift: float = 0.15
    p_continue: float = 0.35
    p_impression: float = 0.3
    mean_search_share: float = 0.4

    def __post_init__(self) -> None:
        if self.users < 1 or self.items < 2 or self.days < 1:
            raise ValueError(f"need users >= 1, items >= 2, days >= 1 (got {self.users}, "
                             f"{self.items}, {self.days})")
        if self.events_per_user_day <= 0:
            raise ValueError(f"events_per_user_day must be > 0, got {self.events_per_user_day}")
        date.fromisoformat(self.start_date)


class _Words:
    """The vocabulary as numpy arrays indexed by topic."""

    def __init__(self) -> None:
        topics = [(d, s, nouns) for d, subs in DEPARTMENTS.items() for s, nouns in subs.items()]
        self.category = np.array([f"{d} > {s}" for d, s, _ in topics])
        self.subcategory = np.array([s for _, s, _ in topics])
        self.noun_start = np.cumsum([0] + [len(n) for _, _, n in topics])[:-1]
        self.noun_count = np.array([len(n) for _, _, n in topics])
        self.nouns = np.array([noun for _, _, nouns in topics for noun in nouns])
        self.num_topics = len(topics)


WORDS = _Words()


def _catalog_batch(params: SimulationParams, day: int, first_id: int, n: int) -> pl.DataFrame:
    rng = np.random.default_rng([params.seed, day, 1])
    topic = rng.integers(0, WORDS.num_topics, n)
    if day == 0:  # every topic has items from day 0, so every topic can always be sampled
        k = min(n, WORDS.num_topics)
        topic[:k] = np.arange(k)
    noun = WORDS.noun_start[topic] + (rng.random(n) * WORDS.noun_count[topic]).astype(np.int64)
    brand = np.array(BRANDS)[rng.integers(0, len(BRANDS), n)]
    adj = np.array(ADJECTIVES)[rng.integers(0, len(ADJECTIVES), n)]
    variant = np.array(VARIANTS)[rng.integers(0, len(VARIANTS), n)]
    frame = pl.DataFrame({
        "item_id": np.arange(first_id, first_id + n).astype(str),
        "brand": brand, "adj": adj, "noun": WORDS.nouns[noun], "variant": variant,
        "category": WORDS.category[topic], "subcategory": WORDS.subcategory[topic],
        "topic": topic.astype(np.int32), "popularity": rng.lognormal(0.0, 1.0, n),
        "release_day": np.full(n, day, dtype=np.int32),
    })
    return frame.with_columns(
        pl.concat_str(["brand", "adj", "noun", "variant"], separator=" ").str.strip_chars()
        .alias("title"),
        pl.concat_str([pl.lit("A"), pl.col("adj").str.to_lowercase(), pl.col("noun").str.to_lowercase(),
                       pl.lit("from"), pl.concat_str([pl.col("brand"), pl.lit(", part of the")]),
                       pl.col("subcategory").str.to_lowercase(), pl.lit("range.")], separator=" ")
        .alias("text"),
    )


def catalog(params: SimulationParams) -> pl.DataFrame:
    """All items released by the last simulated day (ids are stable across ``days``)."""
    new_per_day = max(1, round(params.new_item_rate * params.items))
    batches = [_catalog_batch(params, 0, 0, params.items)]
    for day in range(1, params.days):
        batches.append(_catalog_batch(params, day, params.items + (day - 1) * new_per_day, new_per_day))
    return pl.concat(batches)


def _initial_users(params: SimulationParams) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng([params.seed, 2])
    interest = rng.gamma(params.interest_concentration, size=(params.users, WORDS.num_topics))
    interest /= interest.sum(axis=1, keepdims=True)
    activity = rng.lognormal(0.0, 0.5, params.users)
    activity /= activity.mean()
    search_share = rng.beta(2.0, 2.0 * (1 - params.mean_search_share) / params.mean_search_share,
                            params.users)
    return interest.astype(np.float32), activity, search_share


def _sample_topics(interest: np.ndarray, users: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    cum = np.cumsum(interest, axis=1)
    out = np.empty(len(users), dtype=np.int64)
    r = rng.random(len(users), dtype=np.float32)
    for lo in range(0, len(users), 200_000):
        hi = lo + 200_000
        out[lo:hi] = (cum[users[lo:hi]] < r[lo:hi, None] * cum[users[lo:hi], -1:]).sum(axis=1)
    return np.minimum(out, interest.shape[1] - 1)


def _continue_topics(topics: np.ndarray, users: np.ndarray, p: float, rng: np.random.Generator
                     ) -> np.ndarray:
    """With probability p an event repeats the topic of the user's previous event (same day)."""
    first = np.ones(len(users), dtype=bool)
    first[1:] = users[1:] != users[:-1]
    cont = (rng.random(len(users)) < p) & ~first
    anchor = np.where(cont, 0, np.arange(len(users)))
    anchor = np.maximum.accumulate(anchor)
    return topics[anchor]


class _TopicSampler:
    """Draw an item of a given topic with given weights: one searchsorted over topic-sorted items."""

    def __init__(self, topic: np.ndarray, weight: np.ndarray) -> None:
        self.order = np.argsort(topic, kind="stable")
        cum = np.cumsum(weight[self.order])
        bounds = np.searchsorted(topic[self.order], np.arange(WORDS.num_topics + 1))
        self.cum = cum
        self.start = np.where(bounds[:-1] > 0, cum[np.maximum(bounds[:-1] - 1, 0)], 0.0)
        self.end = np.where(bounds[1:] > 0, cum[np.maximum(bounds[1:] - 1, 0)], 0.0)

    def draw(self, topics: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        r = self.start[topics] + rng.random(len(topics)) * (self.end[topics] - self.start[topics])
        idx = np.searchsorted(self.cum, r, side="right")
        return self.order[np.minimum(idx, len(self.order) - 1)]


def _queries(items: pl.DataFrame, clicked: np.ndarray, rng: np.random.Generator) -> pl.Series:
    n = len(clicked)
    picked = items[clicked].select("brand", "adj", "noun", "subcategory")
    use_sub = rng.random(n) < 0.1
    noise = np.array(QUERY_NOISE)[rng.integers(0, len(QUERY_NOISE), n)]
    frame = picked.with_columns(
        pl.Series("_brand", rng.random(n) < 0.15), pl.Series("_adj", rng.random(n) < 0.6),
        pl.Series("_sub", use_sub), pl.Series("_noisy", rng.random(n) < 0.15), pl.Series("_nw", noise))
    words = [
        pl.when(pl.col("_noisy")).then(pl.col("_nw")),
        pl.when(pl.col("_brand")).then(pl.col("brand")),
        pl.when(pl.col("_adj")).then(pl.col("adj")),
        pl.when(pl.col("_sub")).then(pl.col("subcategory")).otherwise(pl.col("noun")),
    ]
    return frame.select(pl.concat_str(words, separator=" ", ignore_nulls=True).str.to_lowercase()
                        .alias("query"))["query"]


def _day_events(params: SimulationParams, day: int, items: pl.DataFrame, interest: np.ndarray,
                activity: np.ndarray, search_share: np.ndarray) -> pl.DataFrame:
    rng = np.random.default_rng([params.seed, day, 4])
    counts = rng.poisson(params.events_per_user_day * activity)
    users = np.repeat(np.arange(params.users), counts)
    n = len(users)
    seconds = rng.integers(0, 86_400, n)
    seconds = seconds[np.lexsort((seconds, users))]
    day_start = int((date.fromisoformat(params.start_date) - date(1970, 1, 1)).days + day) * 86_400
    is_search = rng.random(n) < search_share[users]
    topics = _continue_topics(_sample_topics(interest, users, rng), users, params.p_continue, rng)
    released = items["release_day"].to_numpy() <= day
    age = day - items["release_day"].to_numpy()
    freshness = np.where(released, 1.0 + 2.0 * np.exp(-age / 3.0), 0.0)
    popularity = items["popularity"].to_numpy()
    topic_of = items["topic"].to_numpy()
    rec_sampler = _TopicSampler(topic_of, popularity * freshness)
    search_sampler = _TopicSampler(topic_of, np.sqrt(popularity) * np.sqrt(freshness))
    clicked = np.where(is_search, search_sampler.draw(topics, rng), rec_sampler.draw(topics, rng))
    query = pl.Series("query", [None] * n, dtype=pl.String)
    if is_search.any():
        query = query.scatter(np.flatnonzero(is_search), _queries(items, clicked[is_search], rng))
    shown = rng.random(n) < params.p_impression
    negative = rec_sampler.draw(topics[shown], rng)
    user_ids = pl.Series(users).cast(pl.String)
    clicks = pl.DataFrame({
        "user_id": user_ids, "ts": day_start + seconds,
        "task": np.where(is_search, "search", "rec"), "query": query,
        "item_id": clicked.astype(str), "clicked": np.ones(n, dtype=bool),
    })
    clicks = clicks.with_row_index("_i")
    impressions = clicks.filter(pl.Series(shown)).with_columns(
        pl.Series("_shown", negative.astype(str)), pl.lit(False).alias("clicked"))
    impressions = (impressions.filter(pl.col("_shown") != pl.col("item_id"))
                   .with_columns(pl.col("_shown").alias("item_id")).drop("_shown"))
    events = pl.concat([clicks, impressions]).sort("_i", "clicked", descending=[False, True]).drop("_i")
    return events.with_columns(
        pl.concat_str([pl.lit("u"), pl.col("user_id")]).alias("user_id"),
        pl.concat_str([pl.lit("s"), pl.col("user_id"), pl.lit(f"-{day}")]).alias("session_id"),
        pl.col("ts").cast(pl.Int64),
    )


def _drift(params: SimulationParams, day: int, interest: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng([params.seed, day, 3])
    fresh = rng.gamma(params.interest_concentration, size=interest.shape)
    fresh /= fresh.sum(axis=1, keepdims=True)
    mixed = (1 - params.interest_drift) * interest + params.interest_drift * fresh
    return (mixed / mixed.sum(axis=1, keepdims=True)).astype(np.float32)


def day_name(params: SimulationParams, day: int) -> str:
    return (date.fromisoformat(params.start_date) + timedelta(days=day)).isoformat()


def simulate(out: str | Path, params: SimulationParams, rows_per_file: int = ROWS_PER_FILE
             ) -> dict[str, object]:
    """Write the simulated logs under ``out`` (replacing an earlier simulation there) and return a
    summary. Refuses a non-empty directory that is not a simulation, so it never deletes user data.
    ``rows_per_file`` caps each Parquet file (a preprocessing task reads one file at a time)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / MARKER).exists():
        raise FileExistsError(f"{out} is not empty and holds no {MARKER}; refusing to overwrite it")
    shutil.rmtree(out / "events", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    items = catalog(params)
    interest, activity, search_share = _initial_users(params)
    total, per_day = 0, {}
    for day in range(params.days):
        if day > 0:
            interest = _drift(params, day, interest)
        events = _day_events(params, day, items, interest, activity, search_share)
        part_dir = out / "events" / f"dt={day_name(params, day)}"
        part_dir.mkdir(parents=True)
        for i, lo in enumerate(range(0, max(events.height, 1), rows_per_file)):
            events.slice(lo, rows_per_file).write_parquet(part_dir / f"part-{i:05d}.parquet")
        per_day[day_name(params, day)] = events.height
        total += events.height
    items.select("item_id", "title", "text", "category",
                 pl.col("release_day").replace_strict(
                     {d: day_name(params, d) for d in range(params.days)}, return_dtype=pl.String)
                 .alias("release_date")).write_parquet(out / "items.parquet")
    summary = {"params": asdict(params), "events": total, "events_per_day": per_day,
               "items": items.height, "users": params.users}
    (out / MARKER).write_text(json.dumps(summary, indent=2))
    return summary


def parse_simulation_args(prog: str, description: str, argv: list[str] | None
                          ) -> tuple[SimulationParams, str]:
    """(params, --out) from a command line; shared by the simulator's CLIs."""
    ap = argparse.ArgumentParser(prog=prog, description=description)
    ap.add_argument("--users", type=int, required=True)
    ap.add_argument("--items", type=int, required=True, help="catalog size on day 0")
    ap.add_argument("--days", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    ap.add_argument("--events-per-user-day", type=float, default=12.0,
                    help="mean clicks per user per day (impressions come on top)")
    ap.add_argument("--start-date", default="2025-01-01")
    args = ap.parse_args(argv)
    params = SimulationParams(users=args.users, items=args.items, days=args.days, seed=args.seed,
                              events_per_user_day=args.events_per_user_day, start_date=args.start_date)
    return params, args.out


def print_summary(summary: dict[str, object]) -> None:
    print(json.dumps({k: v for k, v in summary.items() if k != "params"}, indent=2))


def main(argv: list[str] | None = None) -> None:
    params, out = parse_simulation_args("python -m gems.data.simulate", __doc__.split("\n")[0], argv)
    print_summary(simulate(out, params))


if __name__ == "__main__":
    main()
