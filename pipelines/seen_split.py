"""Test NDCG@10 split by whether the target item was ever a training answer, per method and seed.

Run: .venv/bin/python pipelines/seen_split.py docs/learning/round10 --config amazon
Reads OUT/ranks/*.parquet (written by pipelines/compare.py) and the train split of the config's
shards; writes OUT/seen_split.csv and prints it. Rows whose target was never a training answer
only ever see the catalog softmax push their item row down: this is where a val/test gap shows.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import polars as pl  # noqa: E402

from gems.data.shards import read_split  # noqa: E402
from tune.config import load_config  # noqa: E402
from tune.study.ranks import read_ranks, seen_split  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="a compare.py output directory holding ranks/")
    parser.add_argument("--config", default="amazon", help="the config whose train split defines 'seen'")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        train = read_split(cfg.resolve(cfg.data.output_dir), "train")
    except (FileNotFoundError, ValueError) as err:  # ConfigError is a ValueError
        print(f"error: {err}", file=sys.stderr)
        return 2
    ranks = read_ranks(args.out)
    if ranks.height == 0:
        print(f"error: no ranks in {args.out / 'ranks'} (run pipelines/compare.py with --out {args.out})",
              file=sys.stderr)
        return 2
    table = seen_split(ranks, train["target_item_id"].cast(pl.Utf8).to_list())
    table.write_csv(args.out / "seen_split.csv")
    with pl.Config(tbl_rows=-1, tbl_width_chars=160, float_precision=4):
        print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
