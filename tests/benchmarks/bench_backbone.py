"""Embedded backbone figures: first (GGUF) vs cached load, and one-pass catalog scoring.

Run: .venv/bin/python tests/benchmarks/bench_backbone.py [--items 300] [--prompts 16]
The first load goes to a temporary cache dir so the shared project cache is left alone.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from gems.model import add_item_tokens, item_token, item_token_ids, load_backbone_with_source
from gems.scoring import score_catalog
from tune.config import load_config

WORDS = ["laser", "printer", "toner", "stapler", "paper", "notebook", "shoes", "boots", "coffee",
         "tea", "lamp", "chair", "jacket", "backpack", "speaker", "headphones", "bottle", "mat"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--items", type=int, default=300)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    cfg = load_config("demo").model
    print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores "
          "(figures scale with contention)")

    cache_root = Path(tempfile.mkdtemp(prefix="gems-bench-"))
    try:
        t0 = time.perf_counter()
        _, _, source = load_backbone_with_source(cfg, cache_root)
        first = time.perf_counter() - t0
        assert source == "gguf", source
        cached = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            model, tok, source = load_backbone_with_source(cfg, cache_root)
            cached.append(time.perf_counter() - t0)
            assert source == "cache", source
    finally:
        shutil.rmtree(cache_root, ignore_errors=True)
    print(f"first load (GGUF dequantize + write cache): {first:.1f} s")
    print(f"cached load: median {statistics.median(cached):.2f} s over {args.repeats} "
          f"({', '.join(f'{c:.2f}' for c in cached)}); ratio {first / statistics.median(cached):.0f}x")

    items = [(str(i), f"{WORDS[i % len(WORDS)]} {WORDS[(i * 7) % len(WORDS)]} model {i}")
             for i in range(args.items)]
    t0 = time.perf_counter()
    add_item_tokens(model, tok, items)
    print(f"add_item_tokens({args.items}): {time.perf_counter() - t0:.2f} s")
    ids = item_token_ids(tok, [i for i, _ in items])
    prompts = []
    for p in range(args.prompts):
        history = "; ".join(f"{item_token(items[(p + j) % args.items][0])} {items[(p + j) % args.items][1]}"
                            for j in range(1 + p % 4))
        prompts.append(tok(f"[rec] History: {history}. Next item:")["input_ids"])
    lengths = [len(p) for p in prompts]
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        scores = score_catalog(model, prompts, ids, tok.pad_token_id, batch_size=16)
        times.append(time.perf_counter() - t0)
    print(f"score_catalog: {args.prompts} prompts ({min(lengths)}-{max(lengths)} tokens) x "
          f"{args.items} items -> {tuple(scores.shape)}: median {statistics.median(times):.2f} s "
          f"({', '.join(f'{t:.2f}' for t in times)})")
    print(f"load average at end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
