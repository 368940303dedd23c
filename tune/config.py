"""A job's configuration: the library's ``Config`` plus the sections of the Ray Tune, MLflow and
nightly layer (``tune``, ``mlflow``, ``nightly``), which gems/ and serving/ never read.

Every job entry point (pipelines/, tune/) loads a ``JobConfig``; it is validated in one pass with
the library sections (``gems.config.validate_config``), so a bad value in any section fails at
load time naming the field. Functions of the library take it as the ``Config`` it extends.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from gems.config import Config, Section, read_config_file, validate_config


class SearchRange(Section):
    low: float | None = Field(None, description="Lower bound (numeric fields).")
    high: float | None = Field(None, description="Upper bound (numeric fields).")
    log: bool = Field(False, description="Sample on a log scale.")
    integer: bool = Field(False, description="Sample integers.")
    choices: list[str] | None = Field(None, min_length=1, description="Values to choose from "
                                      "(fields with a fixed set of values, e.g. train.loss).")

    @property
    def categorical(self) -> bool:
        return self.choices is not None

    @model_validator(mode="after")
    def _ordered(self) -> SearchRange:
        if self.choices is not None:
            if self.low is not None or self.high is not None or self.log or self.integer:
                raise ValueError("a range has either choices or low/high, not both")
            return self
        if self.low is None or self.high is None:
            raise ValueError("a numeric range needs low and high (or give choices)")
        if self.low > self.high:
            raise ValueError(f"low {self.low} > high {self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"log scale needs low > 0, got {self.low}")
        return self


class TuneConfig(Section):
    num_samples: int = Field(4, ge=1, le=100_000, description="Trials in the sweep.")
    max_concurrent: int | None = Field(None, ge=1, description="Concurrent trials (None = from "
                                       "cluster CPUs / trial CPUs).")
    algorithm: Literal["tpe", "nsga2"] = Field("tpe", description="TPE on the unified metric, or "
                                               "multi-objective NSGA-II on search vs rec.")
    asha_grace_period: int = Field(1, ge=1, description="Reports before ASHA may stop a trial.")
    asha_reduction_factor: float = Field(2.0, gt=1, description="ASHA reduction factor.")
    space: dict[str, SearchRange] = Field(default_factory=dict, description="Search space: "
                                          "gems.* or train.* field -> range.")
    study_storage: str | None = Field(None, description="Optuna RDB URL for a resumable study "
                                      "(None = sqlite under state_dir).")
    points_to_evaluate: list[dict[str, float | str]] = Field(
        default_factory=list, description="Points (dotted field -> value) tried first, e.g. known-good "
        "defaults; an invalid point fails only its own trial.")
    resume: bool = Field(True, description="Resume an interrupted sweep of the same config and data "
                         "(finished trials kept); False = always start a new sweep.")
    data_cpus: float = Field(1.0, ge=0, le=1024, description="CPUs left free for Ray Data ingest when "
                             "max_concurrent is computed from the cluster (avoids Data/Train deadlock).")
    eval_every: int | None = Field(None, ge=1, description="Val evaluations every N steps inside sweep "
                                   "trials: ASHA's rungs (None = train.eval_every).")


class MLflowConfig(Section):
    tracking_uri: str | None = Field(None, description="Overrides MLFLOW_TRACKING_URI; None = env "
                                     "var, else sqlite:///<state_dir>/mlflow.db.")
    experiment: str = Field("gems-sr", min_length=1, description="Experiment name.")
    registered_model: str = Field("gems-sr", min_length=1, description="Registry name of the "
                                  "unified model.")
    top_k: int = Field(10, ge=1, le=10_000, description="Items returned by the served model.")


class NightlyConfig(Section):
    tolerance: float = Field(0.005, ge=0, le=1, description="Challenger may be this much worse on "
                             "the unified metric and still be promoted.")
    retention_tolerance: float = Field(0.05, ge=0, description="Allowed relative perplexity "
                                       "increase vs the champion.")
    max_kl: float | None = Field(0.5, ge=0, description="Largest mean KL(champion || challenger) per "
                                 "general-text token, nats; None = no drift gate. Also measured where "
                                 "perplexity is not (no held-out human text on the machine).")
    sweep: bool = Field(False, description="Small sweep instead of the champion's params.")
    max_steps: int | None = Field(None, ge=1, description="Fine-tuning steps (None = train.max_steps).")
    history_days: int = Field(1, ge=0, le=366, description="Day partitions before the first new one "
                              "that are re-read, for the users active in the new ones: their "
                              "histories, and the training days when only one new day arrived.")
    override_params: dict[str, float] = Field(
        default_factory=dict, description="Dotted gems.*/train.* fields set on top of the champion's "
        "hyperparameters (experiments, or tests forcing a bad challenger with train.lr).")


class JobConfig(Config):
    """What a job loads: the library's sections plus those only this layer reads."""

    tune: TuneConfig = Field(default_factory=TuneConfig)
    mlflow: MLflowConfig = Field(default_factory=MLflowConfig)
    nightly: NightlyConfig = Field(default_factory=NightlyConfig)


def config_from_dict(raw: dict[str, Any], overrides: list[str] | None = None) -> JobConfig:
    """A job config from dumped or parsed sections; ConfigError naming every bad field."""
    return validate_config(JobConfig, raw, overrides)


def load_config(path: str | Path, overrides: list[str] | None = None) -> JobConfig:
    """Load a YAML config (a bare name looks in pipelines/configs/) and apply ``--set`` overrides."""
    return config_from_dict(read_config_file(path), overrides)
