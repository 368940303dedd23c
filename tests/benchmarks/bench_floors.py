"""Floors (popularity, BM25) on a config's real splits: metrics and cost (not collected by pytest).

Run: .venv/bin/python tests/benchmarks/bench_floors.py [--config demo|amazon|tiny] [--split val]
         [--state-dir /tmp/floors] [--max-examples N] [--set a.b=v ...]
(amazon: add --set data.path=$PWD/../shared/data/amazon_office)

Builds the prompt shards in one process (gems.data.inprocess) under ``--state-dir``, fits the
floors on train and prints full-catalog and sampled metrics per task with wall times.
"""

from __future__ import annotations

import argparse
import time

from gems.data.inprocess import preprocess_inprocess
from gems.data.shards import read_items, read_split
from gems.evaluate import subsample_per_task
from gems.floors import evaluate_floors
from tune.config import load_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="demo")
    parser.add_argument("--split", default="val", choices=["val", "test"])
    parser.add_argument("--state-dir", default="/tmp/gems-bench-floors")
    parser.add_argument("--max-examples", type=int, default=None)
    parser.add_argument("--set", action="append", default=[], help="config override a.b=value")
    args = parser.parse_args()
    cfg = load_config(args.config, [f"state_dir={args.state_dir}/{args.config}", *args.set])
    shard_dir = cfg.resolve(cfg.data.output_dir)
    t0 = time.perf_counter()
    if not (shard_dir / "manifest.json").exists():
        preprocess_inprocess(cfg)
    print(f"shards ready in {time.perf_counter() - t0:.1f} s at {shard_dir}")
    train, items = read_split(shard_dir, "train"), read_items(shard_dir)
    examples = subsample_per_task(read_split(shard_dir, args.split), args.max_examples,
                                  cfg.data.seed)
    print(f"train {train.height} examples, {args.split} {examples.height}, catalog {items.height}")
    t0 = time.perf_counter()
    results = evaluate_floors(train, examples, items, mask_history_rec=cfg.eval.mask_history_rec,
                              num_negatives=cfg.eval.num_negatives, seed=cfg.data.seed,
                              ks=cfg.eval.ks, progress=False)
    elapsed = time.perf_counter() - t0
    for floor, result in results.items():
        for task, protos in result.metrics.items():
            for proto, m in protos.items():
                shown = " ".join(f"{k}={v:.4f}" for k, v in m.items() if k != "count")
                print(f"{floor:10s} {task:6s} {proto:7s} n={int(m['count'])} {shown}")
    print(f"floors evaluated in {elapsed:.2f} s ({examples.height / elapsed:.0f} examples/s)")


if __name__ == "__main__":
    main()
