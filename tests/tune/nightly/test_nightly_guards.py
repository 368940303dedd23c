"""The nightly job refuses or skips, before any Ray work, when it cannot or need not run: a bad
crash point, logs without day partitions, no champion, a concurrent run of the same night."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from filelock import FileLock

from tune.config import JobConfig, load_config
from tune.nightly.job import CRASH_ENV, run_nightly
from tune.nightly.plan import NightlyError


def _cfg(tmp_path: Path, *overrides: str) -> JobConfig:
    return load_config("tiny", [f"state_dir={tmp_path}", "data.source=events", "data.path=live/events",
                                "data.items_path=live/items.parquet", "mlflow.registered_model=guards",
                                *overrides])


def _land(tmp_path: Path, day: str) -> None:
    part = tmp_path / "live" / "events" / f"dt={day}"
    part.mkdir(parents=True)
    pl.DataFrame({"user_id": ["u1"], "ts": [1_735_689_600], "task": ["rec"], "item_id": ["1"]}).write_parquet(
        part / "part-0.parquet")


def test_unknown_crash_point_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CRASH_ENV, "after_lunch")
    with pytest.raises(NightlyError, match="after_lunch"):
        run_nightly(_cfg(tmp_path))


def test_logs_without_partitions_are_refused(tmp_path: Path) -> None:
    with pytest.raises(NightlyError, match="day-partitioned logs"):
        run_nightly(_cfg(tmp_path, "data.source=qilin"))
    (tmp_path / "live" / "events").mkdir(parents=True)
    with pytest.raises(NightlyError, match="no day partitions"):
        run_nightly(_cfg(tmp_path))


@pytest.mark.slow  # creates an MLflow database (seconds)
def test_no_champion_points_at_the_main_job(tmp_path: Path) -> None:
    _land(tmp_path, "2025-01-02")
    with pytest.raises(NightlyError, match="no champion; run pipelines/full.py first"):
        run_nightly(_cfg(tmp_path))


def test_a_concurrent_run_of_the_same_night_does_nothing(tmp_path: Path) -> None:
    _land(tmp_path, "2025-01-02")
    cfg = _cfg(tmp_path)
    with FileLock(cfg.resolve("nightly") / ".2025-01-02.lock"):
        outcome = run_nightly(cfg)
    assert outcome.status == "in_progress" and "nothing to do" in outcome.message
