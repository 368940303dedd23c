"""Null-space bases for a sweep: estimated once with the largest k any trial may draw, sliced per trial.

Eigenvectors come sorted by eigenvalue, so the first k columns of the k_max basis are exactly the
basis a run with k would estimate; slicing costs milliseconds where re-estimating costs minutes.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from safetensors.torch import save_file

from gems.nullspace import load_bases
from tune.config import JobConfig
from tune.train.bases import prepare_bases


def largest_k(cfg: JobConfig) -> int:
    """gems.k, or the top of its search range / points to evaluate when the sweep tunes it."""
    ks = [cfg.gems.k]
    if "gems.k" in cfg.tune.space:
        ks.append(int(cfg.tune.space["gems.k"].high))
    ks += [int(p["gems.k"]) for p in cfg.tune.points_to_evaluate if "gems.k" in p]
    return max(ks)


def sweep_bases(cfg: JobConfig) -> Path | None:
    """Estimate (or reuse from the cache) the bases every trial slices; None when nothing is protected."""
    if cfg.gems.method != "gems" or cfg.gems.energy is not None or largest_k(cfg) == 0:
        return None
    return prepare_bases(cfg.model_copy(update={"gems": cfg.gems.model_copy(update={"k": largest_k(cfg)})}))


def bases_for_trial(cfg: JobConfig, sweep_bases_path: Path | None) -> Path | None:
    """The trial's own k columns of the sweep's bases (a file next to them), or None for k=0/other methods."""
    if sweep_bases_path is None or cfg.gems.method != "gems" or cfg.gems.k == 0:
        return None
    bases = load_bases(sweep_bases_path)
    widest = max((u.shape[1] for u in bases.values()), default=0)
    if cfg.gems.k == widest:
        return sweep_bases_path
    if cfg.gems.k > widest:
        raise ValueError(f"gems.k={cfg.gems.k} exceeds the {widest} directions estimated for this sweep")
    path = sweep_bases_path.with_name(f"{sweep_bases_path.stem}-k{cfg.gems.k}.safetensors")
    if not path.is_file():  # concurrent trials with the same k write identical files: replace is safe
        tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")
        info = {**bases.info, "k": str(cfg.gems.k), "sliced_from": sweep_bases_path.name}
        sliced = {name: u[:, :cfg.gems.k].contiguous() for name, u in bases.items()}
        save_file(sliced, str(tmp), metadata=info)
        os.replace(tmp, path)
    return path
