"""Collect a learning study's rounds into one CSV in the study's schema (methods suffixed @roundN).

Run: .venv/bin/python pipelines/collect_rounds.py docs/learning          (writes docs/learning/all_rounds.csv)
     .venv/bin/python pipelines/collect_rounds.py ROOT --out FILE
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tune.study.rounds import write_all_rounds  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, help="study directory: results.csv (round 1), roundN/results.csv")
    parser.add_argument("--out", type=Path, default=None, help="output CSV (default ROOT/all_rounds.csv)")
    args = parser.parse_args(argv)
    out = args.out or args.root / "all_rounds.csv"
    try:
        count = write_all_rounds(args.root, out)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{count} rows -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
