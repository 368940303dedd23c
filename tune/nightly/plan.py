"""Which day partitions a nightly run must handle, from the logs on disk and the champion's watermark.

The champion carries a watermark tag: the newest day partition its data covered. Partitions newer
than that are new; the newest one (D) is the fresh holdout, and every earlier day of the night's
window is training data (time cut: train <= D-1, evaluate on D). The night is keyed by D, so a
second trigger for the same logs finds the night already decided instead of training again.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import date
from pathlib import Path

PARTITION_DIR = re.compile(r"^dt=(\d{4}-\d{2}-\d{2})$")
DATA_SUFFIXES = (".parquet", ".pq", ".jsonl", ".ndjson", ".json")


class NightlyError(RuntimeError):
    """The nightly job cannot run on this state; the message says what is missing and what to do."""


def _is_day(text: str) -> bool:
    try:
        return len(text) == 10 and date.fromisoformat(text).isoformat() == text
    except ValueError:
        return False


def partition_files(partition_dir: Path) -> list[Path]:
    """Data files of one partition in a stable order (hidden and ``_``-prefixed files are skipped,
    as preprocessing skips them: writers may stage files there before publishing)."""
    return sorted(p for p in partition_dir.rglob("*")
                  if p.is_file() and p.name.lower().endswith(DATA_SUFFIXES)
                  and not any(part.startswith((".", "_")) for part in p.relative_to(partition_dir).parts))


def list_partitions(events_root: Path) -> list[str]:
    """Days (YYYY-MM-DD) of the ``dt=`` directories directly under ``events_root`` that hold data.

    An empty partition directory is not a day yet: log writers create it before the files land.
    """
    root = Path(events_root)
    if not root.is_dir():
        raise NightlyError(f"event log directory {root} does not exist; nightly runs need day "
                           "partitions (dt=YYYY-MM-DD/) of events in the raw-log contract")
    days = []
    for child in root.iterdir():
        match = PARTITION_DIR.match(child.name)
        if child.is_dir() and match and _is_day(match.group(1)) and partition_files(child):
            days.append(match.group(1))
    return sorted(days)


def parse_watermark(value: str | None) -> str | None:
    """The newest day a watermark tag names, or None when there is none.

    Accepts a plain day (``2025-01-02``), a preprocessing manifest watermark as JSON
    (``{"partitions": [...], "event_days": [...], ...}``: partitions win, event days otherwise)
    or a JSON list of days.
    """
    if value is None or not value.strip():
        return None
    text = value.strip()
    if _is_day(text):
        return text
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError:
        raise NightlyError(f"watermark tag {value!r} is neither a day (YYYY-MM-DD) nor JSON") from None
    days: list[str] = []
    if isinstance(parsed, dict):
        days = list(parsed.get("partitions") or parsed.get("event_days") or [])
    elif isinstance(parsed, list):
        days = list(parsed)
    bad = [d for d in days if not (isinstance(d, str) and _is_day(d))]
    if bad:
        raise NightlyError(f"watermark tag {value!r} names values that are not days: {bad[:3]}")
    return max(days) if days else None


@dataclass(frozen=True)
class NightPlan:
    """What one night reads: new partitions, the history days before them, and the holdout day."""

    champion_watermark: str
    new_partitions: tuple[str, ...]
    history_partitions: tuple[str, ...]

    @property
    def holdout_day(self) -> str:
        """D: the newest partition, evaluated on (never trained on) by challenger and champion."""
        return self.new_partitions[-1]

    @property
    def key(self) -> str:
        """One night per holdout day: reruns and double triggers on the same logs share it."""
        return self.holdout_day

    @property
    def partitions(self) -> tuple[str, ...]:
        return self.history_partitions + self.new_partitions

    @property
    def training_days(self) -> tuple[str, ...]:
        return tuple(d for d in self.partitions if d < self.holdout_day)


def plan_night(partitions: list[str], champion_watermark: str, history_days: int) -> NightPlan | None:
    """The night's plan, or None when no partition is newer than the champion's watermark."""
    ordered = sorted(set(partitions))
    new = tuple(d for d in ordered if d > champion_watermark)
    if not new:
        return None
    earlier = [d for d in ordered if d < new[0]]
    history = tuple(earlier[-history_days:]) if history_days > 0 else ()
    plan = NightPlan(champion_watermark, new, history)
    if not plan.training_days:
        raise NightlyError(
            f"night {plan.holdout_day}: nothing to train on (new partitions {list(new)}, no earlier day "
            "in the window); raise nightly.history_days so the day(s) before the holdout are re-read")
    return plan
