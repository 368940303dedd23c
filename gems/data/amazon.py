"""Amazon reviews in LC-Rec JSON (``*.inter.json`` + ``*.item.json``) -> the raw-log contract.

``X.inter.json`` = {user_index: [item_index, ...]} in time order, with no timestamps and no queries;
``X.item.json`` = {item_index: {title, description, brand, categories}}. What this adapter adds, and
exactly how (all deterministic):

- timestamps (synthesised, monotone): the k-th interaction of every user (k = 0, 1, ...) gets
  ``ts = 2020-01-01T00:00:00Z + k days``. Only the order is real; a time cut at day D therefore
  means "the D-th interaction onwards".
- search events (the usual construction for Amazon product search): interaction (user, k) becomes a
  search event when ``blake2b(f"{seed}:{user}:{k}")`` / 2**64 < ``search_share``
  (``data.amazon_search_share``), else a rec event. Its query is built from the clicked item:
  the words of the *leaf* of the category path (the last ``", "``-separated part), followed by the
  first ``data.amazon_query_title_words`` (default two) title words that are alphabetic, >= 3
  letters, not a stop word, not a brand word and not already in the query; all lower-case.
  Example: "VTECH CS6114 DECT 6.0 Cordless Phone" in "..., Cordless Telephones" by VTech ->
  "cordless telephones dect phone". An interaction picked for search whose item yields no query
  words stays a rec event (counted). With title words the
  query nearly names the item (BM25 finds it almost always); with 0 it names only the category,
  and telling the category's items apart takes the user's history: personalized search.
- titles are HTML-unescaped; an item without a title gets its leaf category as title (counted).
All interactions are clicks (``clicked=true``); there are no impressions in this data.
"""

from __future__ import annotations

import hashlib
import html
import json
import re
from pathlib import Path

import polars as pl

from gems.data.events import AdapterOutput, InputError

BASE_TS = 1_577_836_800  # 2020-01-01T00:00:00Z
DAY_S = 86_400
QUERY_TITLE_WORDS = 2
STOPWORDS = frozenset({
    "and", "the", "for", "with", "from", "this", "that", "pack", "count", "set", "inch", "inches",
    "color", "black", "white", "new", "per", "of", "to", "in", "on", "by", "your", "you", "our",
    "all", "one", "two", "three",
})


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def leaf_category(path: str) -> str:
    parts = [p.strip() for p in path.split(", ") if p.strip()]
    return parts[-1] if parts else ""


def build_query(title: str, category_path: str, brand: str, title_words: int = QUERY_TITLE_WORDS) -> str:
    """The Amazon search query for an item (rule in the module docstring)."""
    query = _words(leaf_category(category_path))
    brand_words = set(_words(brand))
    added = 0
    for word in _words(title):
        if added == title_words:
            break
        if (word.isalpha() and len(word) >= 3 and word not in STOPWORDS and word not in brand_words
                and word not in query):
            query.append(word)
            added += 1
    return " ".join(query)


def is_search(seed: int, user: str, position: int, share: float) -> bool:
    digest = hashlib.blake2b(f"{seed}:{user}:{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < share


def _one(root: Path, pattern: str) -> Path:
    found = sorted(root.glob(pattern))
    if len(found) != 1:
        raise InputError(f"{root}: expected exactly one {pattern} (LC-Rec format), found "
                         f"{[p.name for p in found]}")
    return found[0]


def convert_amazon(root: str | Path, search_share: float, seed: int,
                   query_title_words: int = QUERY_TITLE_WORDS) -> AdapterOutput:
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"Amazon input directory does not exist: {root}")
    inter_path, item_path = _one(root, "*.inter.json"), _one(root, "*.item.json")
    try:
        inter = json.loads(inter_path.read_text())
        meta = json.loads(item_path.read_text())
    except ValueError as err:
        raise InputError(f"{root}: LC-Rec JSON does not parse: {err}") from None
    if not isinstance(inter, dict) or not isinstance(meta, dict):
        raise InputError(f"{root}: LC-Rec files must hold JSON objects keyed by index")
    items, queries, untitled = [], {}, 0
    for item_id, info in meta.items():
        info = info if isinstance(info, dict) else {}
        category = html.unescape(str(info.get("categories") or "")).strip()
        title = html.unescape(str(info.get("title") or "")).strip()
        brand = html.unescape(str(info.get("brand") or "")).strip()
        if not title:
            title, untitled = leaf_category(category), untitled + 1
        items.append({"item_id": str(item_id), "title": title or None,
                      "text": html.unescape(str(info.get("description") or "")).strip() or None,
                      "category": category.replace(", ", " > ") or None})
        queries[str(item_id)] = build_query(title, category, brand, query_title_words)
    rows: dict[str, list] = {"user_id": [], "ts": [], "task": [], "query": [], "item_id": [],
                             "origin": []}
    kept_rec = 0
    for user, sequence in inter.items():
        for k, item in enumerate(sequence if isinstance(sequence, list) else []):
            item_id = None if item is None else str(item)
            search = is_search(seed, str(user), k, search_share)
            query = queries.get(item_id or "", "") if search else ""
            if search and not query:
                kept_rec += 1
            rows["user_id"].append(str(user))
            rows["ts"].append(BASE_TS + k * DAY_S)
            rows["task"].append("search" if query else "rec")
            rows["query"].append(query or None)
            rows["item_id"].append(item_id)
            rows["origin"].append(f"{inter_path.name}:{user}[{k}]")
    events = pl.DataFrame(rows, schema={"user_id": pl.String, "ts": pl.Int64, "task": pl.String,
                                        "query": pl.String, "item_id": pl.String, "origin": pl.String})
    n_search = int((events["task"] == "search").sum()) if events.height else 0
    stats = {"interactions": events.height, "search_events": n_search,
             "search_share_target": search_share, "query_title_words": query_title_words,
             "search_share_actual": n_search / events.height if events.height else 0.0,
             "search_without_query_words_kept_as_rec": kept_rec, "items_titled_from_category": untitled,
             "timestamps": "synthesised: 2020-01-01 + k days for a user's k-th interaction"}
    return AdapterOutput(events, pl.DataFrame(items, schema={"item_id": pl.String, "title": pl.String,
                                                             "text": pl.String, "category": pl.String}),
                         stats)
