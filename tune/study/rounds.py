"""All rounds of a study directory in one long table, each method suffixed with its round.

A learning study grows by rounds: ``OUT/results.csv`` holds the first and ``OUT/roundN/results.csv``
the later ones, each run with its own budget (``--set`` flags), so the same method string means
different runs in different rounds. Suffixing ``@roundN`` keeps every row in the study's schema
(method, task, metric, protocol, value, seed) and every method name unique across rounds.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

from tune.study.results import COLUMNS, Row, _atomic, read_rows, rows_frame

ROUND_DIR = re.compile(r"round(\d+)")


def round_dirs(root: Path) -> list[tuple[int, Path]]:
    """(round number, directory) of ``root`` (round 1) and its ``roundN`` children, in round order."""
    found = [(int(m.group(1)), d) for d in root.iterdir()
             if d.is_dir() and (m := ROUND_DIR.fullmatch(d.name)) and (d / "results.csv").is_file()]
    if not (root / "results.csv").is_file():
        return sorted(found)
    if any(n == 1 for n, _ in found):
        raise ValueError(f"{root}/round1 clashes with {root}/results.csv, which is round 1")
    return [(1, root), *sorted(found)]


def collect_rounds(root: Path) -> list[Row]:
    """Every round's rows, methods renamed ``method@roundN``."""
    dirs = round_dirs(root)
    if not dirs:
        raise FileNotFoundError(f"no results.csv in {root} or its roundN directories")
    return [replace(r, method=f"{r.method}@round{n}") for n, d in dirs for r in read_rows(d / "results.csv")]


def write_all_rounds(root: Path, out: Path) -> int:
    """Write the collected rows to ``out`` (CSV, the study's columns); returns the row count."""
    rows = collect_rounds(root)
    _atomic(out, rows_frame(rows).select(COLUMNS).write_csv())
    return len(rows)
