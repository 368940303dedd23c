"""Every hyperparameter of a run as an MLflow param, so the UI can filter and compare runs on them.

The resolved config stays an artifact (``config/resolved_config.json``); params are its flat view,
one per config field under its dotted name (``gems.t_svd``, ``train.lr``). A sweep's parent run
shows a searched field as ``searched {...}`` (its space; each trial's run holds the value it
sampled, and ``best.*`` the chosen one). MLflow params are immutable and a resumed run logs again:
a param the run already holds is left alone, and a different value is warned about, not raised.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Param
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH
from pydantic import BaseModel
from pydantic_core import to_jsonable_python

from gems.config import Config

log = logging.getLogger(__name__)

# Where runs are written, not how a model is made (and a tracking URI may carry credentials).
NOT_PARAMS = frozenset({"mlflow"})


def param_value(value: Any) -> str:
    """A value as MLflow stores it (str; lists and mappings as JSON), cut to MLflow's length limit."""
    text = json.dumps(value, sort_keys=True) if isinstance(value, list | tuple | dict) else str(value)
    return text if len(text) <= MAX_PARAM_VAL_LENGTH else text[:MAX_PARAM_VAL_LENGTH - 1] + "…"


def _fields(model: BaseModel, prefix: str = "") -> Iterator[tuple[str, Any]]:
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            yield from _fields(value, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", to_jsonable_python(value)


def config_params(cfg: Config, searched: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Every config field (but ``mlflow.*``) as ``{dotted name: value}``; searched fields show
    their search space instead of the base config's value, which no trial used."""
    params = {}
    for name, value in _fields(cfg):
        if name.split(".", 1)[0] in NOT_PARAMS:
            continue
        params[name] = param_value(value)
    for name, space in (searched or {}).items():
        params[name] = param_value(f"searched {json.dumps(to_jsonable_python(space), sort_keys=True)}")
    return params


def log_new_params(run_id: str, params: Mapping[str, str], client: MlflowClient | None = None) -> list[str]:
    """Log the params ``run_id`` does not hold yet; returns the keys logged."""
    client = client or MlflowClient()
    existing = client.get_run(run_id).data.params
    changed = sorted(k for k, v in params.items() if k in existing and existing[k] != v)
    if changed:
        log.warning("run %s keeps its logged values of %s (MLflow params cannot change)", run_id, changed)
    new = [Param(k, v) for k, v in sorted(params.items()) if k not in existing]
    if new:
        client.log_batch(run_id, params=new)
    return [p.key for p in new]
