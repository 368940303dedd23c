"""Wall time of one nightly run on day 2 of the demo data, with champion vs challenger metrics.

Run: .venv/bin/python tests/benchmarks/bench_nightly.py [--config demo] [--state /tmp/bench-nightly]
                                                        [--set key=value ...]
Simulates two days of the config's synthetic logs, trains a day-1 champion (the library calls of
pipelines/full.py without its sweep), publishes day 2 and times ``run_nightly`` on a fresh local
Ray: preprocessing the night's view, warm start, fine-tuning, evaluation of both models on day 2
(+ retention), registration and the decision. A second call is timed too (the no-op).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import ray  # noqa: E402

from gems.config import PROJECT_ROOT  # noqa: E402
from tune.config import load_config  # noqa: E402
from tune.nightly.job import run_nightly  # noqa: E402
from tune.nightly.smoke import bootstrap_champion, land_day, simulate_source  # noqa: E402
from tune.registry.models import get_champion  # noqa: E402
from tune.registry.tracking import setup_tracking  # noqa: E402

LIVE = ["data.source=events", "data.path=live/events", "data.items_path=live/items.parquet",
        "mlflow.experiment=bench-nightly", "mlflow.registered_model=bench-nightly"]
SHOWN = ["test/unified", "test/search/full/ndcg_at_10", "test/rec/full/ndcg_at_10",
         "test/search/full/hit_at_10", "test/rec/full/hit_at_10", "test/search/full/mrr", "test/rec/full/mrr",
         "retention/ppl", "retention/mmlu", "test/known_items"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="demo")
    ap.add_argument("--state", default="/tmp/bench-nightly")
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    shared_cache = PROJECT_ROOT / ".state" / "cache" / "models"
    cache = [f"model.cache_dir={shared_cache}"] if shared_cache.is_dir() else []
    overrides = [f"state_dir={args.state}", *LIVE, *cache, *args.set]
    cfg = load_config(args.config, overrides)
    ray.init(include_dashboard=False, log_to_driver=False)
    source, params = simulate_source(cfg, 2)
    live = cfg.resolve("live")
    setup_tracking(cfg)
    if get_champion(cfg.mlflow.registered_model) is None:
        land_day(source, live, params, 0)
        started = time.perf_counter()
        champion = bootstrap_champion(load_config(args.config, [*overrides, "data.output_dir=day1-shards"]))
        print(f"day-1 champion {champion.uri}: {time.perf_counter() - started:.0f} s")
    land_day(source, live, params, 1)
    started = time.perf_counter()
    outcome = run_nightly(cfg)
    wall = time.perf_counter() - started
    print(f"nightly on day 2: {outcome.status} in {wall:.0f} s (config {args.config}, "
          f"{cfg.nightly.max_steps or cfg.train.max_steps} steps)")
    print(outcome.message)
    for reason in outcome.reasons:
        print(f"  - {reason}")
    print(f"{'metric':32s} {'champion':>10s} {'challenger':>10s}")
    for key in SHOWN:
        a = outcome.metrics.get(f"champion/{key}", float("nan"))
        b = outcome.metrics.get(f"challenger/{key}", float("nan"))
        print(f"{key:32s} {a:10.4f} {b:10.4f}")
    for key in ("holdout/examples", "holdout/new_items", "holdout/new_item_targets",
                "challenger/new_item_in_top_k_share"):
        if key in outcome.metrics:
            print(f"{key:32s} {outcome.metrics[key]:10.4f}")
    started = time.perf_counter()
    again = run_nightly(cfg)
    print(f"second run: {again.status} in {time.perf_counter() - started:.1f} s ({again.message})")


if __name__ == "__main__":
    main()
