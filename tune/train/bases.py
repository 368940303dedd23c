"""Null-space bases for one training run, built once on the driver and shipped to workers by path.

Estimating U_k needs a forward pass over general-domain text with the pretrained backbone; doing it
on the driver (cached on disk, keyed by weights + corpus + k + side) means workers only load a
safetensors file and restarts or repeated runs never recompute it.
"""

from __future__ import annotations

from pathlib import Path

from gems.config import Config
from gems.model import load_backbone
from gems.nullspace import bases_for_run

BASES_CACHE = "cache/nullspace"


def prepare_bases(cfg: Config) -> Path | None:
    """The cached bases file for ``cfg`` (GEMS with k > 0 or an energy share); None otherwise."""
    if cfg.gems.method != "gems" or (cfg.gems.k == 0 and cfg.gems.energy is None):
        return None
    model, tokenizer = load_backbone(cfg.model, cfg.resolve(cfg.model.cache_dir))
    bases = bases_for_run(model, tokenizer, cfg.gems, cfg.resolve(BASES_CACHE))
    cached = bases.info.get("cache", "none")
    if cached == "none" or not Path(cached).is_file():
        raise RuntimeError(f"null-space bases were not cached under {cfg.resolve(BASES_CACHE)}")
    return Path(cached)
