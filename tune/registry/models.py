"""The model registry: log a checkpoint as the ranking pyfunc, register it, move aliases.

One registered name holds every unified model; aliases say which version serves (``champion``),
which lost a comparison or awaits one (``challenger``) and which served before (``previous``).
A promotion clears ``challenger``: it named a version that lost to a champion no longer serving,
so after a promotion the alias either does not exist or names tonight's rejected version.
MLflow 3 aliases replace stages. Moving an alias is one call, so ``champion`` always points at a
complete version: the nightly job registers first, then moves the alias, and a crash in between
leaves ``champion`` where it was.
"""

from __future__ import annotations

import importlib.metadata
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.types import DataType
from mlflow.types.schema import Array, ColSpec, ParamSchema, ParamSpec, Schema

from gems.config import PROJECT_ROOT
from gems.dpmoe import ADAPTER_FILE as DPMOE_ADAPTER_FILE
from serving.ranker import (
    ITEMS_ARTIFACT,
    MODEL_ARTIFACT,
    SETTINGS_ARTIFACT,
    ServingSettings,
    write_settings,
)
from tune.config import JobConfig
from tune.registry.tracking import TAG_PREFIX

CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous"
SERVING_MODEL_FILE = PROJECT_ROOT / "serving" / "model_file.py"  # models from code: nothing pickled
SERVING_PACKAGES = ("torch", "transformers", "tokenizers", "safetensors", "polars", "pandas", "numpy",
                    "pydantic", "pyyaml", "tqdm", "mlflow", "rank-bm25")


class RegistryError(RuntimeError):
    """A checkpoint that cannot be served, or a registry entry that is not what a job expects."""


@dataclass(frozen=True)
class VersionInfo:
    """A registered version as jobs need it: where it is, what made it, what it scored."""

    name: str
    version: str
    run_id: str | None
    source: str
    aliases: tuple[str, ...]
    tags: dict[str, str] = field(default_factory=dict)
    description: str = ""

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    @property
    def watermark(self) -> str | None:
        return self.tags.get(f"{TAG_PREFIX}watermark")

    @property
    def data_fingerprint(self) -> str | None:
        return self.tags.get(f"{TAG_PREFIX}data_fingerprint")

    def metric(self, key: str) -> float | None:
        """A metric stored as a version tag (e.g. ``test.unified``), as a float."""
        raw = self.tags.get(key)
        return None if raw is None else float(raw)

    @classmethod
    def from_mlflow(cls, mv: ModelVersion) -> VersionInfo:
        return cls(name=mv.name, version=str(mv.version), run_id=mv.run_id, source=mv.source,
                   aliases=tuple(mv.aliases or ()), tags=dict(mv.tags or {}),
                   description=mv.description or "")


def serving_signature(top_k: int) -> ModelSignature:
    """Input (task, history_item_ids, optional query), output (item_ids, scores), param top_k."""
    inputs = Schema([ColSpec(DataType.string, "task"), ColSpec(Array(DataType.string), "history_item_ids"),
                     ColSpec(DataType.string, "query", required=False)])
    outputs = Schema([ColSpec(Array(DataType.string), "item_ids"), ColSpec(Array(DataType.double), "scores")])
    return ModelSignature(inputs=inputs, outputs=outputs,
                          params=ParamSchema([ParamSpec("top_k", DataType.long, top_k)]))


def input_example(items: pd.DataFrame | None = None) -> pd.DataFrame:
    """One rec and one search request over real catalog ids (shown in the UI, used by `serve`)."""
    ids = [] if items is None else [str(i) for i in items["item_id"].head(3)]
    return pd.DataFrame({"task": ["rec", "search"], "history_item_ids": [ids, ids[:1]],
                         "query": [None, "printer toner"]})


def pip_requirements() -> list[str]:
    """Pinned to this environment (skips MLflow's slow load-in-a-subprocess inference)."""
    out = []
    for package in SERVING_PACKAGES:
        try:
            out.append(f"{package}=={importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            out.append(package)
    return out


def servable_model_dir(checkpoint_dir: Path) -> Path:
    """The plain HF model dir (weights + tokenizer with item tokens) inside a training checkpoint."""
    checkpoint_dir = Path(checkpoint_dir)
    model_dir = checkpoint_dir / "model" if (checkpoint_dir / "model").is_dir() else checkpoint_dir
    if (model_dir / "adapter_config.json").exists():
        raise RegistryError(f"{model_dir} is a LoRA adapter; merge it into the backbone before serving")
    if (model_dir / DPMOE_ADAPTER_FILE).exists():
        raise RegistryError(f"{model_dir} is a DPMoE adapter: the serving ranker scores one prompt with "
                            "one language model and cannot serve DPMoE's two views yet")
    if not (model_dir / "config.json").exists() or not list(model_dir.glob("*.safetensors")):
        raise RegistryError(f"{model_dir} is not a Hugging Face model dir (config.json + *.safetensors)")
    return model_dir


def log_ranker(checkpoint_dir: Path, items_path: Path, cfg: JobConfig, name: str = "model",
               bm25_weight: float | None = None) -> ModelInfo:
    """Log the checkpoint as the ranking pyfunc under the active run; returns its ModelInfo.
    ``bm25_weight``: the model serves search fused with BM25 at this weight (None: the model alone)."""
    model_dir = servable_model_dir(checkpoint_dir)
    items = pd.read_parquet(items_path, columns=["item_id"])
    # The default top_k fits the catalog: a request that names none must never be refused.
    serving = ServingSettings.from_config(cfg, cfg.mlflow.top_k, bm25_weight)
    serving = replace(serving, top_k=min(serving.top_k, len(items)))
    with tempfile.TemporaryDirectory() as tmp:
        settings = write_settings(serving, Path(tmp) / "serving.json")
        items_copy = Path(tmp) / "items.parquet"
        shutil.copyfile(items_path, items_copy)
        return mlflow.pyfunc.log_model(
            name=name, python_model=str(SERVING_MODEL_FILE),
            artifacts={MODEL_ARTIFACT: str(model_dir), ITEMS_ARTIFACT: str(items_copy),
                       SETTINGS_ARTIFACT: str(settings)},
            code_paths=[str(PROJECT_ROOT / "gems"), str(PROJECT_ROOT / "serving")],
            signature=serving_signature(serving.top_k), input_example=input_example(items),
            pip_requirements=pip_requirements())


def register_version(model_uri: str, name: str, tags: Mapping[str, str], description: str,
                     alias: str | None = None) -> VersionInfo:
    """Register ``model_uri`` as a new version of ``name`` with tags, description and alias."""
    client = MlflowClient()
    mv = mlflow.register_model(model_uri, name, tags=dict(tags))
    client.update_model_version(name, mv.version, description=description)
    if alias:
        client.set_registered_model_alias(name, alias, mv.version)
    return VersionInfo.from_mlflow(client.get_model_version(name, mv.version))


def get_version(name: str, alias: str) -> VersionInfo | None:
    """The version an alias points at, or None when the model or the alias does not exist."""
    try:
        return VersionInfo.from_mlflow(MlflowClient().get_model_version_by_alias(name, alias))
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def get_champion(name: str) -> VersionInfo | None:
    return get_version(name, CHAMPION)


def set_alias(name: str, alias: str, version: str) -> None:
    MlflowClient().set_registered_model_alias(name, alias, version)


def promote(name: str, version: str) -> VersionInfo | None:
    """Make ``version`` the champion; the old champion becomes ``previous``. Returns the old one.

    ``previous`` moves first, ``champion`` next: a crash in between leaves ``champion`` unchanged.
    ``challenger`` is deleted last, whichever version it names (see the module docstring).
    """
    old = get_champion(name)
    if old is not None and old.version == str(version):
        return old
    if old is not None:
        set_alias(name, PREVIOUS, old.version)
    set_alias(name, CHAMPION, str(version))
    if get_version(name, CHALLENGER) is not None:
        MlflowClient().delete_registered_model_alias(name, CHALLENGER)
    return old


def register_challenger(model_uri: str, name: str, tags: Mapping[str, str], description: str) -> VersionInfo:
    """Register a version that did not (yet) replace the champion."""
    return register_version(model_uri, name, tags, description, alias=CHALLENGER)


def find_versions(name: str, tag: str, value: str) -> list[VersionInfo]:
    """Versions of ``name`` whose tag equals value (nightly: was this night already registered?)."""
    found = MlflowClient().search_model_versions(f"name = '{name}' and tags.`{tag}` = '{value}'")
    return sorted((VersionInfo.from_mlflow(mv) for mv in found), key=lambda v: int(v.version))


def metric_tags(metrics: Mapping[str, float], prefix: str = "test.") -> dict[str, str]:
    """Metrics as version tags (``test.search/full/ndcg_at_10`` -> "0.1234")."""
    return {f"{prefix}{k}": f"{v:.6g}" for k, v in metrics.items()}
