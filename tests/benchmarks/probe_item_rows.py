"""How much next-item signal the item rows carry before any training: rank the catalog by cosine
similarity to the last history item's row (and to the mean of the history rows).

Run (after the study's preprocessing and one run with items.init=*collab, which caches SASRec's vectors):
    .venv/bin/python tests/benchmarks/probe_item_rows.py --config amazon --rows 500

Tables compared on the same val rec rows (history items masked, as the evaluation does), full
catalog NDCG@10: the title-mean rows the LLM starts from, SASRec's own item vectors, and those
vectors mapped to the backbone's width by each ``items.collab_map`` (ridge, orthogonal), alone and
averaged with the title rows (``items.init=title+collab``). A map that loses SASRec's geometry
shows here as a lower figure than SASRec's own space. Not a test: a figure for docs/learning.md.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import polars as pl
import torch
import torch.nn.functional as F

from gems.item_init import aligned_vectors
from gems.model import add_item_tokens, load_backbone
from gems.sasrec_vectors import load_item_vectors, project_to_width
from tune.config import load_config


def nearest_row_ndcg(table: torch.Tensor, histories: list[list[int]], targets: list[int],
                     query: str) -> float:
    """Mean NDCG@10 of ranking all rows by cosine to the last (or mean) history row."""
    unit = F.normalize(table.float(), dim=1)
    total = 0.0
    for hist, target in zip(histories, targets, strict=True):
        anchor = unit[hist[-1]] if query == "last" else unit[hist].mean(0)
        scores = unit @ anchor
        scores[hist] = -math.inf
        rank = int((scores > scores[target]).sum())
        total += 1.0 / math.log2(rank + 2) if rank < 10 else 0.0
    return total / len(targets)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="amazon")
    parser.add_argument("--rows", type=int, default=500, help="val rec rows (with a history)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(args.config)
    shards = cfg.resolve(cfg.data.output_dir)
    items = pl.read_parquet(shards / "items.parquet").sort("item_id")
    item_ids = [str(i) for i in items["item_id"].to_list()]
    model, tok = load_backbone(cfg.model, cfg.resolve(cfg.model.cache_dir))
    token_ids = add_item_tokens(model, tok, list(zip(item_ids, items["title"].to_list(), strict=True)))
    title_rows = model.get_input_embeddings().weight.detach()[torch.tensor(token_ids)].float()
    cached = sorted(Path(cfg.resolve("cache/item_vectors")).glob("sasrec-*.safetensors"))
    if not cached:
        raise SystemExit("no cached SASRec vectors: run one training with items.init=title+collab first")
    vectors, vector_ids = load_item_vectors(cached[-1])
    sasrec = aligned_vectors(vectors, vector_ids, item_ids).float()

    index = {item: i for i, item in enumerate(item_ids)}
    val = pl.read_parquet(shards / "val").filter((pl.col("task") == "rec")
                                                 & (pl.col("history_item_ids").list.len() > 0))
    val = val.head(args.rows)
    histories = [[index[h] for h in hist] for hist in val["history_item_ids"].to_list()]
    targets = [index[t] for t in val["target_item_id"].to_list()]
    print(f"{len(targets)} val rec rows, {len(item_ids)} items, SASRec vectors {tuple(sasrec.shape)}")
    tables = {"title rows": title_rows, "SASRec vectors (own space)": sasrec}
    for mapping in ("ridge", "orthogonal"):
        mapped = project_to_width(sasrec, title_rows, cfg.items.collab_ridge, mapping)
        tables[f"collab, {mapping} map"] = mapped
        tables[f"title+collab, {mapping} map"] = 0.5 * (title_rows + mapped)
    print(f"{'rows':34s} {'last item':>10s} {'history mean':>13s}")
    for name, table in tables.items():
        print(f"{name:34s} {nearest_row_ndcg(table, histories, targets, 'last'):10.4f} "
              f"{nearest_row_ndcg(table, histories, targets, 'mean'):13.4f}")


if __name__ == "__main__":
    main()
