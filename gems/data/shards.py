"""Prompt shards on disk (contract 4 in notes/COMMON.md): layout, reading, writing, fingerprint.

Layout under the shard dir::

    train/part-00000.parquet ...   one file per user bucket (SHARD_SCHEMA), named by bucket
    val/...  test/...
    items.parquet                  item_id, title, text, category (valid items)
    quarantine/events.parquet      rejected rows with reason (+ duplicates-*.parquet per bucket)
    quarantine/items.parquet       rejected item rows with reason
    manifest.json

File names depend only on the bucket, and rows inside a file are sorted, so the same input always
gives byte-identical files: the fingerprint (sha256 over every file's sha256) is reproducible, and a
re-run replaces the directory as a whole (``publish``), never leaving extra or duplicate files.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import polars as pl

from gems.data.schema import (
    ITEM_QUARANTINE_SCHEMA,
    ITEM_SCHEMA,
    QUARANTINE_SCHEMA,
    SHARD_SCHEMA,
    SPLITS,
    conform,
    empty_frame,
)
from gems.data.sequences import BucketResult

MANIFEST = "manifest.json"
ITEMS = "items.parquet"
QUARANTINE_DIR = "quarantine"
PARQUET_OPTIONS: dict[str, Any] = {"compression": "zstd", "statistics": True}


def _require(shard_dir: str | Path) -> Path:
    root = Path(shard_dir)
    if not (root / MANIFEST).is_file():
        raise FileNotFoundError(f"{root} is not a shard directory (no {MANIFEST}); run "
                                "pipelines/preprocess.py first")
    return root


def read_manifest(shard_dir: str | Path) -> dict[str, Any]:
    return json.loads((_require(shard_dir) / MANIFEST).read_text())


def read_split(shard_dir: str | Path, split: str) -> pl.DataFrame:
    """All examples of one split, in (bucket, user, time) order; an empty frame if there are none."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    files = sorted((_require(shard_dir) / split).glob("part-*.parquet"))
    if not files:
        return empty_frame(SHARD_SCHEMA)
    return conform(pl.read_parquet(files), SHARD_SCHEMA)


def read_items(shard_dir: str | Path) -> pl.DataFrame:
    return conform(pl.read_parquet(_require(shard_dir) / ITEMS), ITEM_SCHEMA)


def read_quarantine(shard_dir: str | Path, what: str = "events") -> pl.DataFrame:
    """Rejected rows with their reason: ``what`` = "events" (incl. duplicates) or "items"."""
    root = _require(shard_dir) / QUARANTINE_DIR
    if what == "items":
        path = root / "items.parquet"
        return (conform(pl.read_parquet(path), ITEM_QUARANTINE_SCHEMA) if path.exists()
                else empty_frame(ITEM_QUARANTINE_SCHEMA))
    files = sorted(p for p in root.glob("*.parquet") if p.name != "items.parquet")
    return conform(pl.read_parquet(files), QUARANTINE_SCHEMA) if files else empty_frame(QUARANTINE_SCHEMA)


def write_parquet(df: pl.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    df.write_parquet(path, **PARQUET_OPTIONS)


def write_bucket(result: BucketResult, out_dir: str | Path, bucket: int) -> None:
    """One bucket's examples (one file per split) and duplicates, named by bucket: a retried task
    rewrites the same files with the same bytes."""
    out = Path(out_dir)
    for split in SPLITS:
        part = result.examples.filter(pl.col("split") == split)
        if part.height:
            write_parquet(part, out / split / f"part-{bucket:05d}.parquet")
    if result.duplicates.height:
        write_parquet(result.duplicates, out / QUARANTINE_DIR / f"duplicates-{bucket:05d}.parquet")


def write_quarantine(events: pl.DataFrame, items: pl.DataFrame, out_dir: str | Path) -> None:
    out = Path(out_dir) / QUARANTINE_DIR
    if events.height:
        write_parquet(conform(events, QUARANTINE_SCHEMA).sort("source_file", "source_row"),
                      out / "events.parquet")
    if items.height:
        write_parquet(conform(items, ITEM_QUARANTINE_SCHEMA), out / "items.parquet")


def file_hashes(root: str | Path) -> dict[str, str]:
    """sha256 of every file under ``root`` except the manifest, by relative path."""
    root = Path(root)
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            out[p.relative_to(root).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def fingerprint(hashes: dict[str, str]) -> str:
    """One hash for the whole content: same files with the same bytes <=> same fingerprint."""
    h = hashlib.sha256()
    for rel in sorted(hashes):
        h.update(f"{rel}\0{hashes[rel]}\n".encode())
    return h.hexdigest()


def write_manifest(manifest: dict[str, Any], out_dir: str | Path) -> None:
    (Path(out_dir) / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))


def staging_dir_for(out_dir: str | Path) -> Path:
    """A fresh sibling of ``out_dir`` (same filesystem, so the final rename is cheap)."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    return out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:12]}"


def publish(tmp_dir: str | Path, out_dir: str | Path) -> None:
    """Replace ``out_dir`` by the finished ``tmp_dir``: readers see the old or the new directory,
    never a mix (two renames; the old one is deleted afterwards)."""
    tmp, out = Path(tmp_dir), Path(out_dir)
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:12]}"
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
