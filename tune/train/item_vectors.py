"""Collaborative item vectors for ``items.init`` (driver side, once per data and settings).

A SASRec is fitted on the train split (epoch chosen on val) before the workers start; its item
vectors are cached on disk by data fingerprint, SASRec settings and seed, and shipped to the
workers by path, as the null-space bases are.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from gems.config import Config
from gems.data.shards import read_items, read_manifest, read_split
from gems.sasrec_train import fit_sasrec
from gems.sasrec_vectors import sasrec_item_vectors, save_item_vectors

log = logging.getLogger(__name__)


def collab_vectors_path(cfg: Config, shard_dir: Path) -> Path | None:
    """The cached vectors file for this run (fitting SASRec first if needed); None for title init."""
    if cfg.items.init == "title":
        return None
    manifest = read_manifest(shard_dir)
    data = manifest.get("fingerprint") or json.dumps(manifest, sort_keys=True, default=str)
    key = json.dumps({"data": data, "seed": cfg.train.seed,
                      "sasrec": cfg.sasrec.model_dump(mode="json"),
                      "mask_history_rec": cfg.eval.mask_history_rec}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    path = cfg.resolve("cache/item_vectors") / f"sasrec-{digest}.safetensors"
    if path.is_file():
        return path
    item_ids = sorted(str(i) for i in read_items(shard_dir)["item_id"].to_list())
    fit = fit_sasrec(read_split(shard_dir, "train"), read_split(shard_dir, "val"), item_ids, cfg.sasrec,
                     seed=cfg.train.seed, mask_history_rec=cfg.eval.mask_history_rec)
    log.info("collaborative item vectors: SASRec best epoch %d of %d, val NDCG@10 %.4f, %.0f s",
             fit.best_epoch, fit.epochs, fit.best_val, fit.seconds)
    tmp = path.with_suffix(".tmp")
    save_item_vectors(tmp, sasrec_item_vectors(fit.model, item_ids), item_ids)
    tmp.replace(path)
    return path
