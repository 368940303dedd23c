"""Warm start from the registered champion: its weights, its item tokens, its hyperparameters.

The champion is a ranking pyfunc (serving/ranker.py) whose artifacts hold a plain Hugging Face model
directory (weights + tokenizer with every item token it knows) and its catalog. Downloading that
directory and pointing ``model.name_or_path`` at it is the whole warm start: the training loop
loads it like any backbone and ``gems.model.add_item_tokens`` gives items first seen in the new
logs their tokens (title-mean initialised) while leaving the known ones as trained.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.models import Model

from gems.config import ConfigError
from serving.ranker import ITEMS_ARTIFACT, MODEL_ARTIFACT, SETTINGS_ARTIFACT, ServingSettings
from tune.config import JobConfig
from tune.nightly.plan import NightlyError
from tune.registry.models import VersionInfo
from tune.registry.tracking import TAG_PREFIX
from tune.sweep.space import apply_params

log = logging.getLogger(__name__)

PARAM_TAG_PREFIX = f"{TAG_PREFIX}param."  # version tag gems.param.train.lr = "0.0002"
RUN_PARAM_PREFIXES = ("", "best.", "best/", "best_params.")  # how a run may have logged them
TUNABLE_SECTIONS = ("gems.", "train.")
COMPLETE_MARKER = ".download-complete"


@dataclass(frozen=True)
class WarmStart:
    """A champion on local disk, ready to be loaded as a backbone."""

    version: VersionInfo
    model_dir: Path  # Hugging Face dir: weights + tokenizer incl. the champion's item tokens
    items_path: Path  # the catalog the champion was trained and served with
    bm25_weight: float = 0.0  # its search served fused with BM25 at this weight (0: the model alone)


def _number(text: Any) -> float | int | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    integral = value.is_integer() and not any(c in str(text).lower() for c in ".e")
    return int(value) if integral else value


def params_from_tags(tags: Mapping[str, str]) -> dict[str, float | int]:
    """``gems.param.<field>`` version tags -> {field: number}."""
    out = {}
    for key, raw in tags.items():
        if key.startswith(PARAM_TAG_PREFIX):
            value = _number(raw)
            if value is not None:
                out[key[len(PARAM_TAG_PREFIX):]] = value
    return out


def params_from_run(params: Mapping[str, str]) -> dict[str, float | int]:
    """Numeric run params naming gems.*/train.* fields (possibly under a ``best.`` prefix)."""
    out: dict[str, float | int] = {}
    for prefix in RUN_PARAM_PREFIXES:
        for key, raw in params.items():
            if prefix and not key.startswith(prefix):
                continue
            field = key[len(prefix):]
            value = _number(raw)
            if field.startswith(TUNABLE_SECTIONS) and value is not None and field not in out:
                out[field] = value
    return out


def champion_params(version: VersionInfo) -> dict[str, float | int]:
    """The hyperparameters the champion was trained with: its version tags, else its run's params."""
    params = params_from_tags(version.tags)
    if params or not version.run_id:
        return params
    run = MlflowClient().get_run(version.run_id)
    return params_from_run(run.data.params)


def with_params(cfg: JobConfig, params: Mapping[str, float | int]) -> JobConfig:
    """``cfg`` with the hyperparameters applied; parameters that are not config fields are skipped
    (with a warning) so a champion from an older code version still warm-starts."""
    usable = {}
    for key, value in params.items():
        try:
            apply_params(cfg, {key: value})
        except ConfigError as err:
            log.warning("champion parameter %s=%s not applied: %s", key, value, err)
            continue
        usable[key] = value
    return apply_params(cfg, usable)


def _artifact_paths(model_root: Path) -> dict[str, Path]:
    flavor = Model.load(str(model_root)).flavors.get("python_function", {})
    artifacts = flavor.get("artifacts") or {}
    return {name: model_root / spec["path"] for name, spec in artifacts.items()}


def fetch_champion(version: VersionInfo, dest: Path) -> WarmStart:
    """Download ``version`` into ``dest`` once (a completed download is reused on reruns)."""
    dest = Path(dest)
    if not (dest / COMPLETE_MARKER).exists():
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        mlflow.artifacts.download_artifacts(artifact_uri=version.uri, dst_path=str(tmp))
        (tmp / COMPLETE_MARKER).write_text(f"{version.name} v{version.version}\n")
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
    paths = _artifact_paths(dest)
    missing = [a for a in (MODEL_ARTIFACT, ITEMS_ARTIFACT) if a not in paths or not paths[a].exists()]
    if missing:
        raise NightlyError(f"{version.uri} lacks the {missing} artifacts of a GEMS ranker; it cannot be "
                           "warm-started (was it logged by tune.registry.models.log_ranker?)")
    settings = paths.get(SETTINGS_ARTIFACT)
    weight = (ServingSettings(**json.loads(settings.read_text())).bm25_weight
              if settings is not None and settings.exists() else 0.0)
    return WarmStart(version=version, model_dir=paths[MODEL_ARTIFACT], items_path=paths[ITEMS_ARTIFACT],
                     bm25_weight=weight)
