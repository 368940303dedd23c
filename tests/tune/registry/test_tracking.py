"""Tracking: where MLflow writes, the fast failure on a dead server, what a pipeline run records."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import polars as pl
import pytest
from mlflow import MlflowClient

from tune.config import JobConfig, load_config
from tune.registry.tracking import (
    TrackingError,
    check_tracking_uri,
    log_dataset_inputs,
    log_run_context,
    parent_run,
    quarantine_summary,
    resolve_tracking_uri,
    run_tags,
    setup_tracking,
    watermark_text,
)
from tune.sweep.parent_run import SWEEP_TAG, pipeline_run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def cfg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> JobConfig:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return load_config("tiny", [f"state_dir={tmp_path / 'state'}"])


@pytest.fixture(scope="module")
def tracked(tmp_path_factory: pytest.TempPathFactory) -> tuple[JobConfig, str]:
    """One embedded store for the tests that write runs (creating an MLflow DB takes seconds)."""
    root = tmp_path_factory.mktemp("tracked")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.chdir(root)  # MLflow's default artifact root would be relative to this
        cfg = load_config("tiny", [f"state_dir={root / 'state'}"])
        return cfg, setup_tracking(cfg)


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A TCP port that accepts connections and never answers (a hung proxy / stuck server)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    stop = threading.Event()
    held: list[socket.socket] = []

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


def test_default_is_sqlite_at_an_absolute_path_under_state(cfg: JobConfig) -> None:
    uri = resolve_tracking_uri(cfg)
    assert uri == f"sqlite:///{cfg.state_path / 'mlflow.db'}"
    assert Path(uri.removeprefix("sqlite:///")).is_absolute()


def test_env_var_then_config_take_precedence(cfg: JobConfig, monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Path) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'env.db'}")
    assert resolve_tracking_uri(cfg).endswith("env.db")
    cfg.mlflow.tracking_uri = "http://mlflow.internal:5000"
    assert resolve_tracking_uri(cfg) == "http://mlflow.internal:5000"


@pytest.mark.parametrize("uri", ["sqlite:///mlflow.db", "mlruns"])
def test_relative_local_stores_are_refused(cfg: JobConfig, monkeypatch: pytest.MonkeyPatch, uri: str) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(TrackingError, match="relative"):
        resolve_tracking_uri(cfg)


def test_refused_connection_fails_fast_and_says_what_to_do() -> None:
    uri = f"http://127.0.0.1:{_free_port()}"
    started = time.monotonic()
    with pytest.raises(TrackingError, match="unreachable") as err:
        check_tracking_uri(uri)
    assert time.monotonic() - started < 5
    assert uri in str(err.value) and "MLFLOW_TRACKING_URI" in str(err.value)


def test_silent_server_times_out_quickly(silent_server: str) -> None:
    started = time.monotonic()
    with pytest.raises(TrackingError, match="unreachable"):
        check_tracking_uri(silent_server, timeout_s=1.0)
    assert time.monotonic() - started < 4


def test_unreachable_server_fails_setup_before_anything_is_written(cfg: JobConfig) -> None:
    cfg.mlflow.tracking_uri = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(TrackingError):
        setup_tracking(cfg)
    assert not cfg.state_path.exists()


def test_a_later_config_is_not_pinned_to_an_earlier_store(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """mlflow.set_tracking_uri exports $MLFLOW_TRACKING_URI; such an export is not the user's choice,
    even when something later puts an older export back into the environment."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    explicit = f"sqlite:///{tmp_path / 'explicit.db'}"
    first = load_config("tiny", [f"state_dir={tmp_path / 'a'}", f"mlflow.tracking_uri={explicit}"])
    second = load_config("tiny", [f"state_dir={tmp_path / 'b'}"])
    third = load_config("tiny", [f"state_dir={tmp_path / 'c'}"])
    setup_tracking(first)
    setup_tracking(second)
    assert mlflow.get_tracking_uri() == f"sqlite:///{second.state_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", explicit)  # an older export restored
    assert resolve_tracking_uri(third) == f"sqlite:///{third.state_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'user.db'}")
    assert resolve_tracking_uri(third) == f"sqlite:///{tmp_path / 'user.db'}"  # a user's export wins


@pytest.mark.slow
def test_experiment_artifacts_stay_under_the_state_dir(tracked: tuple[JobConfig, str]) -> None:
    cfg, experiment_id = tracked
    location = MlflowClient().get_experiment(experiment_id).artifact_location
    assert location == (cfg.state_path / "mlartifacts").as_uri()
    assert setup_tracking(cfg) == experiment_id  # idempotent
    with parent_run("p", {"k": "v"}, system_metrics=False) as run:
        mlflow.log_dict({"a": 1}, "x.json")
    assert (cfg.state_path / "mlartifacts" / run.info.run_id / "artifacts" / "x.json").is_file()
    assert not (cfg.state_path.parent / "mlartifacts").exists()
    assert not (cfg.state_path.parent / "mlruns").exists()


def _shards(root: Path) -> tuple[Path, dict]:
    (root / "quarantine").mkdir(parents=True)
    reasons = ["unknown_item_id", "unknown_item_id", "ts_in_future"]
    pl.DataFrame({"user_id": ["u1", "u2", "u3"], "reason": reasons, "raw": ['{"a":1}', '{"a":2}', '{"a":3}']}
                 ).write_parquet(root / "quarantine" / "part-0.parquet")
    manifest = {"counts": {"train": {"rec": 3}}, "quarantine": {"unknown_item_id": 2, "ts_in_future": 1},
                "watermark": ["2026-01-01", "2026-01-02"], "fingerprint": "abc123def4567890"}
    return root, manifest


def test_quarantine_summary_counts_reasons_with_examples(tmp_path: Path) -> None:
    shard_dir, manifest = _shards(tmp_path / "shards")
    summary = quarantine_summary(shard_dir, manifest, examples=1)
    assert summary["counts"] == {"ts_in_future": 1, "unknown_item_id": 2}
    assert [row["user_id"] for row in summary["examples"]["unknown_item_id"]] == ["u1"]


@pytest.mark.slow
def test_pipeline_run_records_context_tags_and_datasets(tracked: tuple[JobConfig, str],
                                                        tmp_path: Path) -> None:
    cfg, experiment_id = tracked
    shard_dir, manifest = _shards(tmp_path / "shards")
    tags = run_tags(cfg, manifest)
    assert tags["gems.data_fingerprint"] == "abc123def4567890"
    assert tags["gems.watermark"] == "2026-01-02" == watermark_text(manifest["watermark"])
    splits = {"train": pl.DataFrame({"example_id": ["1", "2"], "prompt": ["a", "b"]}),
              "val": pl.DataFrame({"example_id": ["3"], "prompt": ["c"]})}
    with pipeline_run(experiment_id, "sweep-x", "demo", tags, system_metrics=False) as run:
        assert run.state == "new"
        log_run_context(cfg, manifest, shard_dir)
        log_dataset_inputs(splits, shard_dir, manifest["fingerprint"])
    client = MlflowClient()
    stored = client.get_run(run.run_id)
    assert stored.data.tags[SWEEP_TAG] == "sweep-x" and stored.data.tags["gems.method"] == "gems"
    files = {a.path for p in ("config", "data") for a in client.list_artifacts(run.run_id, p)}
    assert files == {"config/resolved_config.json", "data/manifest.json", "data/quarantine_summary.json"}
    resolved = json.loads(Path(mlflow.artifacts.download_artifacts(
        run_id=run.run_id, artifact_path="config/resolved_config.json")).read_text())
    assert resolved["gems"]["r_shared"] == cfg.gems.r_shared
    inputs = {d.dataset.name: d for d in stored.inputs.dataset_inputs}
    assert set(inputs) == {"prompts-train", "prompts-val"}
    assert inputs["prompts-train"].dataset.digest == "abc123de-train"
    assert {t.value for t in inputs["prompts-val"].tags} == {"validation"}

    with pipeline_run(experiment_id, "sweep-x", "demo", tags, system_metrics=False) as again:
        assert again.state == "finished" and again.run_id == run.run_id  # a finished sweep is not rerun


@pytest.mark.slow
def test_interrupted_pipeline_run_is_reopened(tracked: tuple[JobConfig, str]) -> None:
    _, experiment_id = tracked
    with pytest.raises(KeyboardInterrupt), pipeline_run(experiment_id, "sweep-y", "demo", {},
                                                        system_metrics=False) as first:
        raise KeyboardInterrupt
    assert MlflowClient().get_run(first.run_id).info.status != "FINISHED"
    with pipeline_run(experiment_id, "sweep-y", "demo", {}, system_metrics=False) as second:
        assert second.state == "resumed" and second.run_id == first.run_id
    assert MlflowClient().get_run(first.run_id).info.status == "FINISHED"


@pytest.mark.parametrize("watermark,text", [
    ({"partitions": ["2026-01-01", "2026-01-03"], "event_days": ["2026-01-02"], "max_ts": 1}, "2026-01-03"),
    ({"partitions": [], "event_days": ["2026-01-01", "2026-01-02"], "max_ts": 1}, "2026-01-02"),
    (["2026-01-02", "2026-01-01"], "2026-01-02"),
    ("2026-01-05", "2026-01-05"),
])
def test_watermark_tag_is_the_newest_day(watermark: object, text: str) -> None:
    assert watermark_text(watermark) == text
