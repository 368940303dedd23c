"""Val evaluation in fp32 vs a bf16 body with an fp32 head: time, and whether the rankings agree.

Run: .venv/bin/python tests/benchmarks/bench_eval.py --config amazon \
       --checkpoint .state/amazon/ray_results/<run>/checkpoint_step_000150 --rows 150 --repeats 3

Needs the config's prompt shards (``pipelines/preprocess.py --config amazon``). Both variants score
the same seeded val rows with the same (optionally trained) weights, interleaved ``--repeats``
times; printed: median seconds per 1,000 prompts, the speed-up, NDCG@10 per task under each
variant, and how often the top-10 lists are identical. Not a test: figures depend on the load
average, printed first and last.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import polars as pl
import torch

from gems.checkpoint import load_model_weights
from gems.evaluate import evaluate_model, subsample_per_task
from gems.model import add_item_tokens, load_backbone
from gems.prompts import encode_prompt
from gems.scoring import score_catalog
from tune.config import load_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="amazon")
    parser.add_argument("--checkpoint", type=Path, help="a training checkpoint dir (else the base model)")
    parser.add_argument("--rows", type=int, default=150, help="val rows per task")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()}  threads: {torch.get_num_threads()}")

    cfg = load_config(args.config)
    shards = cfg.resolve(cfg.data.output_dir)
    items = pl.read_parquet(shards / "items.parquet").sort("item_id")
    item_ids = [str(i) for i in items["item_id"].to_list()]
    model, tokenizer = load_backbone(cfg.model, cfg.resolve(cfg.model.cache_dir))
    token_ids = torch.tensor(add_item_tokens(model, tokenizer, list(zip(item_ids, items["title"].to_list(),
                                                                         strict=True))))
    if args.checkpoint:
        load_model_weights(model, args.checkpoint)
    val = subsample_per_task(pl.read_parquet(shards / "val" / "*.parquet"), args.rows, cfg.data.seed)
    prompts = [encode_prompt(tokenizer, p, cfg.train.max_seq_len) for p in val["prompt"].to_list()]
    variants = {"fp32": None, "bf16 body, fp32 head": torch.bfloat16}

    seconds: dict[str, list[float]] = {name: [] for name in variants}
    scores: dict[str, torch.Tensor] = {}
    for _ in range(args.repeats):
        for name, dtype in variants.items():
            start = time.perf_counter()
            scores[name] = score_catalog(model, prompts, token_ids, tokenizer.pad_token_id,
                                         batch_size=cfg.eval.batch_size, autocast_dtype=dtype)
            seconds[name].append(time.perf_counter() - start)
    per_k = {name: statistics.median(s) / len(prompts) * 1000 for name, s in seconds.items()}
    base, low = scores["fp32"], scores["bf16 body, fp32 head"]
    same_top10 = (base.topk(10).indices == low.topk(10).indices).all(dim=1).float().mean().item()
    same_top1 = (base.argmax(1) == low.argmax(1)).float().mean().item()
    for name, s in per_k.items():
        print(f"{name:>22}: {s:6.1f} s per 1,000 prompts (median of {args.repeats}, {len(prompts)} prompts)")
    print(f"speed-up: {per_k['fp32'] / per_k['bf16 body, fp32 head']:.2f}x; identical top-1 "
          f"{same_top1:.1%}, identical top-10 lists {same_top10:.1%}; max |score diff| "
          f"{(base - low).abs().max().item():.3g}")
    for name, dtype in variants.items():
        result = evaluate_model(model, tokenizer, val, item_ids, token_ids, max_len=cfg.train.max_seq_len,
                                batch_size=cfg.eval.batch_size, num_negatives=cfg.eval.num_negatives,
                                seed=cfg.data.seed, progress=False, autocast_dtype=dtype)
        ndcg = {t: m["full"]["ndcg_at_10"] for t, m in result.metrics.items()}
        print(f"{name:>22}: NDCG@10 full catalog {ndcg}")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
