"""The slice of the event log one night preprocesses, as a directory preprocessing reads unchanged.

New partitions are linked file by file (nothing copied); history partitions are reduced to the
rows of users active in the new ones: those users' histories and earlier examples are what the
night needs, everyone else's old rows are not. Rows are kept as they were written (the filter
only looks at ``user_id``), so validation and quarantine treat them exactly as a full run would.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from tune.nightly.plan import NightPlan, partition_files


@dataclass(frozen=True)
class ViewStats:
    users: int  # distinct users in the new partitions
    history_rows_in: int
    history_rows_kept: int
    linked_files: int


def _is_parquet(path: Path) -> bool:
    return path.name.lower().endswith((".parquet", ".pq"))


def _json_user(line: bytes) -> str | None:
    try:
        row = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    user = row.get("user_id") if isinstance(row, dict) else None
    return None if user is None else str(user)


def users_in(files: Iterable[Path]) -> set[str]:
    """Distinct user ids in event files; rows without a readable user id are ignored here
    (preprocessing quarantines them)."""
    users: set[str] = set()
    for path in files:
        if _is_parquet(path):
            frame = pl.read_parquet(path)
            if "user_id" in frame.columns:
                users.update(frame["user_id"].cast(pl.String).drop_nulls().to_list())
        else:
            for line in path.read_bytes().splitlines():
                user = _json_user(line) if line.strip() else None
                if user is not None:
                    users.add(user)
    return users


def _filter_file(src: Path, dst: Path, users: set[str]) -> tuple[int, int]:
    """Rows of ``src`` whose user is in ``users`` -> ``dst``; returns (rows in, rows kept)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if _is_parquet(src):
        frame = pl.read_parquet(src)
        if "user_id" not in frame.columns:
            return frame.height, 0
        kept = frame.filter(pl.col("user_id").cast(pl.String).is_in(sorted(users)))
        if kept.height:
            kept.write_parquet(dst)
        return frame.height, kept.height
    lines = [line for line in src.read_bytes().splitlines() if line.strip()]
    kept_lines = [line for line in lines if _json_user(line) in users]
    if kept_lines:
        dst.write_bytes(b"\n".join(kept_lines) + b"\n")
    return len(lines), len(kept_lines)


def build_view(events_root: Path, plan: NightPlan, view_dir: Path) -> ViewStats:
    """Write the night's event view under ``view_dir`` (replacing an earlier one) and describe it."""
    events_root, view_dir = Path(events_root), Path(view_dir)
    tmp = view_dir.with_name(view_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    new_files: list[Path] = []
    for day in plan.new_partitions:
        source = events_root / f"dt={day}"
        for path in partition_files(source):
            link = tmp / f"dt={day}" / path.relative_to(source)
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(path.resolve(), link)
            new_files.append(path)
    users = users_in(new_files)
    rows_in = rows_kept = 0
    for day in plan.history_partitions:
        source = events_root / f"dt={day}"
        for path in partition_files(source):
            n_in, n_kept = _filter_file(path, tmp / f"dt={day}" / path.relative_to(source), users)
            rows_in += n_in
            rows_kept += n_kept
    shutil.rmtree(view_dir, ignore_errors=True)
    os.replace(tmp, view_dir)
    return ViewStats(users=len(users), history_rows_in=rows_in, history_rows_kept=rows_kept,
                     linked_files=len(new_files))
