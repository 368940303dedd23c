"""Hyperparameters as MLflow params (tune/registry/run_params.py) on a real SQLite store: dotted names
for every config field, the search space on a sweep's parent, MLflow's length limit, and a resumed
run that logs again without crashing on immutable params."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

from tune.config import load_config
from tune.registry.run_params import config_params, log_new_params

HYPER = {"train.lr", "gems.t_svd", "gems.k", "gems.alpha", "gems.r_search", "gems.r_rec", "gems.tau",
         "gems.method", "gems.betas", "train.max_steps", "data.history_len", "model.name_or_path"}


def test_every_field_has_a_dotted_param_and_searched_fields_show_their_space() -> None:
    cfg = load_config("tiny", ["train.lr=0.002", "gems.t_svd=7", "mlflow.tracking_uri=http://u:secret@host"])
    params = config_params(cfg)
    assert set(params) >= HYPER
    assert (params["train.lr"], params["gems.t_svd"], params["gems.betas"]) == ("0.002", "7", "[0.9, 0.999]")
    assert not any(k.startswith("mlflow.") for k in params) and "secret" not in str(params)
    assert all(isinstance(v, str) and len(v) <= MAX_PARAM_VAL_LENGTH for v in params.values())
    on_parent = config_params(cfg, searched=cfg.tune.space)
    for name in cfg.tune.space:
        assert on_parent[name].startswith("searched {") and '"low"' in on_parent[name]


def test_a_value_longer_than_mlflow_allows_is_cut(tmp_path: Path) -> None:
    long_path = "/data/" + "x" * (MAX_PARAM_VAL_LENGTH + 100)
    params = config_params(load_config("tiny", [f"data.items_path={long_path}"]))
    assert len(params["data.items_path"]) == MAX_PARAM_VAL_LENGTH and params["data.items_path"].endswith("…")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment("run-params")
    with mlflow.start_run() as run:
        log_new_params(run.info.run_id, params)
    assert MlflowClient().get_run(run.info.run_id).data.params["data.items_path"] == params["data.items_path"]


def test_a_resumed_run_logs_again_without_crashing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment("run-params")
    params = config_params(load_config("tiny"))
    with mlflow.start_run() as run:
        assert set(log_new_params(run.info.run_id, params)) == set(params)  # > 100: several batches
    with mlflow.start_run(run_id=run.info.run_id):  # the resume: same values, then one changed
        assert log_new_params(run.info.run_id, params) == []
        changed = {**params, "train.lr": "0.5", "extra.new": "1"}
        assert log_new_params(run.info.run_id, changed) == ["extra.new"]
    logged = MlflowClient().get_run(run.info.run_id).data.params
    assert logged["train.lr"] == params["train.lr"] and logged["extra.new"] == "1"
    assert "keeps its logged values of ['train.lr']" in caplog.text
