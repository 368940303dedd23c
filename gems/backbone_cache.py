"""A verified, atomically written on-disk cache of a backbone as a plain Hugging Face directory.

Building the embedded backbone (dequantizing a GGUF) takes ~20 s; reading a safetensors directory
takes well under a second. A cache is only worth it if it is never wrong: it is written to a
temporary directory and renamed into place (a crash leaves no half-written cache under the real
name), a marker file written last records the source and every file's size, and a load must
match the marker and report no missing or unexpected weights. Anything else is rebuilt, never
trusted. Concurrent builders (several Ray workers) serialise on a file lock.
"""

from __future__ import annotations

import json
import logging
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from filelock import FileLock
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

MARKER_NAME = "gems_cache.json"
CACHE_FORMAT = 1

CacheSource = Literal["cache", "built"]
Backbone = tuple[PreTrainedModel, PreTrainedTokenizerBase]


class CorruptCacheError(RuntimeError):
    """The cache directory exists but cannot be trusted; the message says why."""


def _file_sizes(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(directory.iterdir())
            if p.is_file() and p.name != MARKER_NAME}


def read_cache(cache_dir: Path, source: dict[str, Any] | None) -> Backbone:
    """Load a cache after checking it; ``source=None`` accepts any recorded source.

    Raises CorruptCacheError (or FileNotFoundError when there is no cache at all).
    """
    marker_path = cache_dir / MARKER_NAME
    if not marker_path.is_file():
        if cache_dir.exists():
            raise CorruptCacheError(f"{cache_dir}: no {MARKER_NAME} (half-written or foreign dir)")
        raise FileNotFoundError(f"no backbone cache at {cache_dir}")
    try:
        marker = json.loads(marker_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CorruptCacheError(f"{marker_path}: unreadable marker ({err})") from err
    if marker.get("format") != CACHE_FORMAT:
        raise CorruptCacheError(f"{marker_path}: cache format {marker.get('format')!r}, "
                                f"expected {CACHE_FORMAT}")
    if source is not None and marker.get("source") != source:
        raise CorruptCacheError(f"{cache_dir}: built from {marker.get('source')}, "
                                f"now expected {source}")
    expected_sizes = marker.get("files", {})
    actual_sizes = _file_sizes(cache_dir)
    for name, size in expected_sizes.items():
        if actual_sizes.get(name) != size:
            raise CorruptCacheError(f"{cache_dir / name}: size {actual_sizes.get(name)} bytes, "
                                    f"marker recorded {size}")
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            cache_dir, dtype=torch.float32, output_loading_info=True)
        tokenizer = AutoTokenizer.from_pretrained(cache_dir)
    except Exception as err:  # any load failure means the files cannot be trusted
        raise CorruptCacheError(f"{cache_dir}: failed to load ({type(err).__name__}: {err})") from err
    bad = {k: v for k, v in info.items() if k != "error_msgs" and v} | (
        {"error_msgs": info["error_msgs"]} if info.get("error_msgs") else {})
    if bad:
        raise CorruptCacheError(f"{cache_dir}: weights do not match the architecture: {bad}")
    return model, tokenizer


def write_cache(cache_dir: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                source: dict[str, Any]) -> None:
    """Save to a temporary sibling, write the marker last, then swap it in with one rename."""
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir.parent / f".{cache_dir.name}.tmp-{uuid.uuid4().hex}"
    old = cache_dir.parent / f".{cache_dir.name}.old-{uuid.uuid4().hex}"
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        marker = {"format": CACHE_FORMAT, "source": source, "files": _file_sizes(tmp)}
        (tmp / MARKER_NAME).write_text(json.dumps(marker, indent=2, sort_keys=True))
        if cache_dir.exists():
            cache_dir.rename(old)
        tmp.rename(cache_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def _remove_leftovers(cache_dir: Path) -> None:
    """Temporary dirs of builders that crashed (only lock holders write, so none is in use)."""
    for pattern in (f".{cache_dir.name}.tmp-*", f".{cache_dir.name}.old-*"):
        for leftover in cache_dir.parent.glob(pattern):
            log.warning("removing leftover of an interrupted cache build: %s", leftover)
            shutil.rmtree(leftover, ignore_errors=True)


def load_or_build(cache_dir: Path, source: dict[str, Any] | None,
                  build: Callable[[], Backbone]) -> tuple[PreTrainedModel, PreTrainedTokenizerBase,
                                                          CacheSource]:
    """Read a valid cache, else build, cache and return the freshly built backbone.

    ``source`` identifies what the cache must have been built from (None: accept any; a build
    then records ``{}``). Returns (model, tokenizer, "cache" | "built").
    """
    try:
        model, tokenizer = read_cache(cache_dir, source)
        return model, tokenizer, "cache"
    except FileNotFoundError:
        pass
    except CorruptCacheError as err:
        log.warning("backbone cache rejected, rebuilding: %s", err)
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache_dir.parent / f".{cache_dir.name}.lock")):
        try:  # another process may have built it while we waited for the lock
            model, tokenizer = read_cache(cache_dir, source)
            return model, tokenizer, "cache"
        except (FileNotFoundError, CorruptCacheError):
            pass
        _remove_leftovers(cache_dir)
        model, tokenizer = build()
        write_cache(cache_dir, model, tokenizer, source or {})
    log.info("backbone cache written to %s", cache_dir)
    return model, tokenizer, "built"
