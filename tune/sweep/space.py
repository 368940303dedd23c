"""The sweep's search space: ``tune.space`` in the config -> Optuna distributions -> a trial Config.

Keys are dotted config fields (``gems.tau``, ``train.lr``) so a sampled point is just a set of
overrides; the pydantic model then validates the whole trial config, so an impossible combination
fails that one trial (recorded as failed) instead of the sweep.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import optuna
from pydantic import BaseModel

from gems.config import Config, ConfigError
from tune.config import JobConfig, SearchRange, config_from_dict

TUNABLE_SECTIONS = ("gems", "train", "model")
ParamValue = int | float | str


def _numeric_kind(annotation: Any) -> type | None:
    """int or float for a numeric field (``int | None`` counts as int), else None."""
    options = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    for option in options:
        if option is int or option is float:
            return option
    return None


def _field_annotation(name: str) -> Any:
    """The annotation of a dotted config field; ConfigError naming the key when it does not exist."""
    parts = name.split(".")
    if len(parts) < 2 or parts[0] not in TUNABLE_SECTIONS:
        raise ConfigError(f"tune.space: {name!r} must name a field under "
                          f"{' or '.join(s + '.*' for s in TUNABLE_SECTIONS)}")
    model: type[BaseModel] = Config
    annotation: Any = None
    for i, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:
            raise ConfigError(f"tune.space: {name!r}: {'.'.join(parts[:i + 1])} is not a config field "
                              "(see gems/config.py)")
        annotation = field.annotation
        if i < len(parts) - 1:
            if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
                raise ConfigError(f"tune.space: {name!r}: {'.'.join(parts[:i + 1])} is not a section")
            model = annotation
    return annotation


def _literal_values(annotation: Any) -> tuple[str, ...] | None:
    """The allowed values of a ``Literal[...]`` field, else None."""
    if typing.get_origin(annotation) is not Literal:
        return None
    return tuple(str(v) for v in typing.get_args(annotation))


def validate_space(space: Mapping[str, SearchRange]) -> None:
    """Every key names an existing gems.*/train.*/model.* field: numeric ones take a range (int fields
    ``integer: true``), fields with a fixed set of values take ``choices`` from that set."""
    for name, rng in space.items():
        annotation = _field_annotation(name)
        allowed = _literal_values(annotation)
        if rng.categorical:
            if allowed is None:
                raise ConfigError(f"tune.space: {name!r} has no fixed set of values; give it low/high")
            unknown = [c for c in rng.choices or () if c not in allowed]
            if unknown:
                raise ConfigError(f"tune.space: {name!r}: choices {unknown} are not among {list(allowed)}")
            continue
        kind = _numeric_kind(annotation)
        if kind is None:
            hint = f"; give it choices from {list(allowed)}" if allowed else "; only numbers can be tuned"
            raise ConfigError(f"tune.space: {name!r} is not a numeric field{hint}")
        if kind is int and not rng.integer:
            raise ConfigError(f"tune.space: {name!r} is an integer field; add 'integer: true' to its range")


def to_optuna(space: Mapping[str, SearchRange]) -> dict[str, optuna.distributions.BaseDistribution]:
    """Optuna distributions keyed by dotted field name (what OptunaSearch samples from)."""
    validate_space(space)
    out: dict[str, optuna.distributions.BaseDistribution] = {}
    for name, rng in space.items():
        if rng.categorical:
            out[name] = optuna.distributions.CategoricalDistribution(list(rng.choices or ()))
        elif rng.integer:
            out[name] = optuna.distributions.IntDistribution(int(rng.low), int(rng.high), log=rng.log)
        else:
            out[name] = optuna.distributions.FloatDistribution(rng.low, rng.high, log=rng.log)
    return out


def validate_points(space: Mapping[str, SearchRange], points: Sequence[Mapping[str, ParamValue]]) -> None:
    """Points tried first must name space keys and lie inside their ranges (Optuna enqueues them)."""
    for i, point in enumerate(points):
        for name, value in point.items():
            rng = space.get(name)
            if rng is None:
                raise ConfigError(f"tune.points_to_evaluate[{i}]: {name!r} is not in tune.space")
            if rng.categorical:
                if str(value) not in (rng.choices or ()):
                    raise ConfigError(f"tune.points_to_evaluate[{i}]: {name}={value!r} is not one of "
                                      f"{rng.choices}")
            elif isinstance(value, str) or not rng.low <= value <= rng.high:
                raise ConfigError(f"tune.points_to_evaluate[{i}]: {name}={value} is outside "
                                  f"[{rng.low}, {rng.high}]")


def apply_params(cfg: JobConfig, params: Mapping[str, ParamValue]) -> JobConfig:
    """``cfg`` with the sampled values set; ConfigError (naming the field) for an invalid point.

    Values are set in the dumped dict, not parsed from ``--set`` strings, so 1e-05 stays a float.
    """
    raw = cfg.model_dump()
    for name, value in params.items():
        _field_annotation(name)
        *sections, leaf = name.split(".")
        node = raw
        for section in sections:
            node = node[section]
        node[leaf] = value
    return config_from_dict(raw)


def params_summary(params: Mapping[str, ParamValue]) -> str:
    """Short, stable text for logs: ``gems.tau=0.52 train.lr=0.00013``."""
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(params.items()))
