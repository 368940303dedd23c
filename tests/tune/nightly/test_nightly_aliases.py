"""What the registry's aliases and a decided night say, on a real MLflow registry (SQLite): a promotion
clears an older rejected `challenger`, and a night already decided names the champion serving now."""

from __future__ import annotations

from pathlib import Path

import mlflow
import polars as pl
import pytest
from mlflow import MlflowClient

from tune.config import JobConfig, load_config
from tune.nightly.job import run_nightly
from tune.nightly.journal import DECISION, KEY_TAG, VERSION
from tune.registry.models import CHALLENGER, CHAMPION, PREVIOUS, get_version, promote, set_alias
from tune.registry.tracking import setup_tracking

NAME = "aliases"


def _cfg(tmp_path: Path) -> JobConfig:
    return load_config("tiny", [f"state_dir={tmp_path}", "data.source=events", "data.path=live/events",
                                "data.items_path=live/items.parquet", f"mlflow.registered_model={NAME}",
                                "mlflow.experiment=aliases"])


def _versions(tmp_path: Path, n: int) -> list[str]:
    """n registered versions (the registry only needs a source; no model is loaded here)."""
    client = MlflowClient()
    client.create_registered_model(NAME)
    source = (tmp_path / "model").as_uri()
    return [str(client.create_model_version(NAME, source).version) for _ in range(n)]


def _alias(alias: str) -> str | None:
    version = get_version(NAME, alias)
    return version.version if version else None


def test_a_promotion_clears_an_older_rejected_challenger(tmp_path: Path) -> None:
    setup_tracking(_cfg(tmp_path))
    v1, v2, v3 = _versions(tmp_path, 3)
    set_alias(NAME, CHAMPION, v1)
    set_alias(NAME, CHALLENGER, v2)  # night 2: v2 rejected against v1
    promote(NAME, v3)  # night 3: v3 promoted
    assert (_alias(CHAMPION), _alias(PREVIOUS), _alias(CHALLENGER)) == (v3, v1, None)


@pytest.mark.parametrize("later_promotion", [False, True])
def test_an_already_decided_night_names_the_champion(tmp_path: Path, later_promotion: bool) -> None:
    cfg = _cfg(tmp_path)
    part = tmp_path / "live" / "events" / "dt=2025-01-02"
    part.mkdir(parents=True)
    pl.DataFrame({"user_id": ["u1"], "ts": [1_735_776_000], "task": ["rec"], "item_id": ["1"]}).write_parquet(
        part / "part-0.parquet")
    experiment_id = setup_tracking(cfg)
    v1, v2, v3 = _versions(tmp_path, 3)
    set_alias(NAME, CHAMPION, v1)
    with mlflow.start_run(experiment_id=experiment_id, tags={KEY_TAG: "2025-01-02", VERSION: v2,
                                                               DECISION: "rejected"}):
        pass
    if later_promotion:
        promote(NAME, v3)
    outcome = run_nightly(cfg)
    assert outcome.status == "already_decided"
    assert outcome.champion == (v3 if later_promotion else v1) and outcome.challenger == v2
    assert f"already decided (rejected, version {v2})" in outcome.message
