"""The nightly job's pure parts: partition discovery, watermark parsing, the night's plan, the
event view it preprocesses, and the promotion rule."""

from __future__ import annotations

import json
import math
from pathlib import Path

import polars as pl
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tune.nightly.decision import ModelScores, decide
from tune.nightly.log_slice import build_view, users_in
from tune.nightly.plan import NightlyError, list_partitions, parse_watermark, plan_night

DAYS = ["2025-01-01", "2025-01-02", "2025-01-03", "2025-01-04"]


def _write_day(root: Path, day: str, users: list[str], fmt: str = "parquet") -> None:
    part = root / f"dt={day}"
    part.mkdir(parents=True, exist_ok=True)
    rows = [{"user_id": u, "ts": 1_735_689_600 + i, "task": "rec", "query": None, "item_id": "1"}
            for i, u in enumerate(users)]
    if fmt == "parquet":
        pl.DataFrame(rows).write_parquet(part / "part-0.parquet")
    else:
        (part / "events.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "{broken\n")


# ------------------------------------------------------------------------------ partitions


def test_partitions_are_days_with_data(tmp_path: Path) -> None:
    for day in ("2025-01-02", "2025-01-01"):
        _write_day(tmp_path, day, ["u1"])
    (tmp_path / "dt=2025-01-03").mkdir()  # created, files not landed yet
    (tmp_path / "dt=2025-01-04").mkdir()
    (tmp_path / "dt=2025-01-04" / "_part-0.parquet.inprogress").write_text("x")
    (tmp_path / "dt=notaday").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    assert list_partitions(tmp_path) == ["2025-01-01", "2025-01-02"]


def test_missing_log_dir_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(NightlyError, match="does not exist"):
        list_partitions(tmp_path / "nope")


@pytest.mark.parametrize("tag,day", [
    ("2025-01-02", "2025-01-02"),
    (json.dumps({"partitions": ["2025-01-01", "2025-01-03"], "event_days": ["2025-01-01"],
                 "max_ts": 1}), "2025-01-03"),
    (json.dumps({"partitions": [], "event_days": ["2025-01-01", "2025-01-02"]}), "2025-01-02"),
    (json.dumps(["2025-01-02", "2025-01-01"]), "2025-01-02"),
    (None, None), ("", None), (json.dumps({"partitions": []}), None),
])
def test_parse_watermark(tag: str | None, day: str | None) -> None:
    assert parse_watermark(tag) == day


@pytest.mark.parametrize("tag", ["yesterday", "2025-13-01", json.dumps({"partitions": ["Jan 1"]})])
def test_bad_watermark_names_the_value(tag: str) -> None:
    with pytest.raises(NightlyError, match="watermark"):
        parse_watermark(tag)


# ------------------------------------------------------------------------------------ plan


def test_one_new_day_trains_on_the_day_before() -> None:
    plan = plan_night(DAYS[:2], "2025-01-01", history_days=1)
    assert plan is not None
    assert plan.new_partitions == ("2025-01-02",) and plan.history_partitions == ("2025-01-01",)
    assert plan.holdout_day == plan.key == "2025-01-02"
    assert plan.training_days == ("2025-01-01",)


def test_missed_nights_hold_out_only_the_newest_day() -> None:
    plan = plan_night(DAYS, "2025-01-01", history_days=1)
    assert plan is not None
    assert plan.new_partitions == tuple(DAYS[1:]) and plan.history_partitions == ("2025-01-01",)
    assert plan.holdout_day == "2025-01-04"
    assert plan.training_days == tuple(DAYS[:3])


def test_nothing_new_is_no_plan() -> None:
    assert plan_night(DAYS[:2], "2025-01-02", history_days=1) is None
    assert plan_night([], "2025-01-02", history_days=1) is None


def test_no_training_day_is_refused() -> None:
    with pytest.raises(NightlyError, match="history_days"):
        plan_night(DAYS[:2], "2025-01-01", history_days=0)


@given(st.sets(st.sampled_from([f"2025-02-{d:02d}" for d in range(1, 29)]), min_size=1),
       st.sampled_from([f"2025-02-{d:02d}" for d in range(0, 29)]), st.integers(0, 5))
def test_plan_invariants(days: set[str], watermark: str, history_days: int) -> None:
    try:
        plan = plan_night(sorted(days), watermark, history_days)
    except NightlyError:
        return
    if plan is None:
        assert all(d <= watermark for d in days)
        return
    assert all(d > watermark for d in plan.new_partitions)
    assert set(plan.new_partitions) == {d for d in days if d > watermark}
    assert plan.holdout_day == max(days) and plan.holdout_day not in plan.training_days
    assert len(plan.history_partitions) <= history_days
    assert all(h < min(plan.new_partitions) for h in plan.history_partitions)


# ------------------------------------------------------------------------------------ view


def test_view_links_new_days_and_keeps_history_of_their_users(tmp_path: Path) -> None:
    log = tmp_path / "events"
    _write_day(log, "2025-01-01", ["a", "b", "c", "a"])
    _write_day(log, "2025-01-01", ["b", "z"], fmt="jsonl")
    _write_day(log, "2025-01-02", ["a", "b"])
    _write_day(log, "2025-01-02", ["d"], fmt="jsonl")
    plan = plan_night(list_partitions(log), "2025-01-01", history_days=1)
    assert plan is not None
    view = tmp_path / "view"
    stats = build_view(log, plan, view)
    assert stats.users == 3 and stats.linked_files == 2
    assert (view / "dt=2025-01-02" / "part-0.parquet").is_symlink()
    history = pl.read_parquet(view / "dt=2025-01-01" / "part-0.parquet")
    assert history["user_id"].to_list() == ["a", "b", "a"]
    assert users_in([view / "dt=2025-01-01" / "events.jsonl"]) == {"b"}
    assert (stats.history_rows_in, stats.history_rows_kept) == (4 + 3, 3 + 1)  # + the broken line
    assert list_partitions(view) == ["2025-01-01", "2025-01-02"]
    # rebuilding replaces the view rather than adding to it
    assert build_view(log, plan, view) == stats


# -------------------------------------------------------------------------------- decision


def test_equal_challenger_is_promoted_and_tolerance_is_respected() -> None:
    champion = ModelScores(unified=0.30, perplexity=20.0)
    assert decide(champion, ModelScores(0.30, 20.0), 0.0, 0.0).promote
    assert decide(champion, ModelScores(0.296, 20.0), 0.005, 0.05).promote
    worse = decide(champion, ModelScores(0.29, 20.0), 0.005, 0.05)
    assert not worse.promote and "below the champion" in " ".join(worse.reasons)
    assert worse.unified_delta == pytest.approx(-0.01)


def test_retention_blocks_promotion() -> None:
    champion = ModelScores(unified=0.30, perplexity=20.0)
    better_but_forgetful = decide(champion, ModelScores(0.40, 23.0), 0.005, 0.05)
    assert not better_but_forgetful.promote and better_but_forgetful.perplexity_ratio == pytest.approx(1.15)
    assert decide(champion, ModelScores(0.40, 20.9), 0.005, 0.05).promote


def test_unmeasured_retention_does_not_block_but_is_said() -> None:
    decision = decide(ModelScores(0.3), ModelScores(0.3, 50.0), 0.0, 0.0)
    assert decision.promote and any("not measured" in r for r in decision.reasons)


def test_language_drift_blocks_promotion_even_without_perplexity() -> None:
    """On a machine without held-out human text only KL is measured: it alone must stop a
    challenger whose language moved away from the champion's."""
    champion = ModelScores(unified=0.30)
    drifted = decide(champion, ModelScores(0.50, kl_from_champion=0.8), 0.0, 0.05, max_kl=0.5)
    assert not drifted.promote and any("exceeds 0.5" in r for r in drifted.reasons)
    assert decide(champion, ModelScores(0.50, kl_from_champion=0.4), 0.0, 0.05, max_kl=0.5).promote
    assert not decide(champion, ModelScores(0.50, kl_from_champion=math.nan), 0.0, 0.05, max_kl=0.5).promote
    assert decide(champion, ModelScores(0.50, kl_from_champion=9.0), 0.0, 0.05, max_kl=None).promote
    unmeasured = decide(champion, ModelScores(0.50), 0.0, 0.05, max_kl=0.5)
    assert unmeasured.promote
    assert any("KL from the champion was not measured" in r for r in unmeasured.reasons)
    with pytest.raises(ValueError, match="max_kl"):
        decide(champion, ModelScores(0.50), 0.0, 0.05, max_kl=-1.0)


def test_diverged_challenger_is_rejected() -> None:
    assert not decide(ModelScores(0.1, 20.0), ModelScores(math.nan, 20.0), 1.0, 1.0).promote
    assert not decide(ModelScores(0.1, 20.0), ModelScores(0.2, math.inf), 1.0, 1.0).promote
    assert decide(ModelScores(math.nan, 20.0), ModelScores(0.0, 20.0), 0.0, 0.1).promote


scores = st.floats(0, 1)
ppl = st.floats(1, 1000)


@given(scores, ppl, scores, ppl, st.floats(0, 0.2), st.floats(0, 0.5), st.floats(0, 0.5))
def test_promotion_is_monotone(u0: float, p0: float, u1: float, p1: float, tol: float, rtol: float,
                               gain: float) -> None:
    """A challenger that is better on both counts than a promoted one is promoted too."""
    champion = ModelScores(u0, p0)
    if decide(champion, ModelScores(u1, p1), tol, rtol).promote:
        assert decide(champion, ModelScores(u1 + gain, p1 / (1 + gain)), tol, rtol).promote


# ------------------------------------------------------------------------------ warm start


def test_champion_params_from_version_tags_and_run_params() -> None:
    from tune.nightly.warm_start import params_from_run, params_from_tags

    tags = {"gems.param.gems.r_shared": "5", "gems.param.train.lr": "0.0002", "gems.param.gems.tau": "1e-1",
            "gems.watermark": "2025-01-01", "gems.param.gems.alpha": "not a number"}
    assert params_from_tags(tags) == {"gems.r_shared": 5, "train.lr": 0.0002, "gems.tau": 0.1}
    run = {"best.gems.k": "16", "best.trial_id": "abc", "train.lr": "0.001", "seed": "3"}
    assert params_from_run(run) == {"train.lr": 0.001, "gems.k": 16}


def test_params_that_are_not_fields_are_skipped() -> None:
    from tune.config import load_config
    from tune.nightly.warm_start import with_params

    cfg = with_params(load_config("tiny"), {"gems.r_shared": 6, "train.lr": 0.5, "gems.removed_field": 1.0,
                                            "gems.tau": -1.0})
    assert cfg.gems.r_shared == 6 and cfg.train.lr == 0.5
    assert cfg.gems.tau == load_config("tiny").gems.tau  # invalid value: the config's own is kept
