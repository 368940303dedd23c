"""FLOW's one pass before training: each example's loss under the untrained model -> fixed weights.

Only the examples the run will train on are scored (the batcher's schedule is a pure function of the
step, so they are known upfront): a 220-step run over a 14k-example table touches half of it. Each
rank scores its own share; the per-example losses are summed across ranks, so every rank derives the
same weights. Weights are per task (:func:`gems.token_weighting.flow_weights` on each task's losses:
its own median as tau, mean 1 over its examples), so each task's share of the step stays what
``train.search_fraction`` makes it and search's lower loss level does not starve rec.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from gems.batching import MixedTaskBatcher, collate_left_padded
from gems.step import example_losses
from gems.target_loss import TargetLoss
from gems.tasks import TASKS
from gems.token_weighting import flow_weights


def scheduled_indices(batcher: MixedTaskBatcher, steps: int) -> dict[str, np.ndarray]:
    """Per task, the distinct example indices this rank trains on in steps ``0 .. steps-1``."""
    seen: dict[str, set[int]] = {t: set() for t in TASKS}
    for step in range(steps):
        for task, idx in batcher.indices_at(step).items():
            seen[task].update(idx)
    return {t: np.array(sorted(seen[t]), dtype=np.int64) for t in TASKS}


def _all_ranks(losses: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Combine each rank's losses (NaN where a rank did not score an example): the mean of the ranks
    that did (ranks that score the same example get the same value up to reduction order)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return dict(losses)
    out = {}
    for task, values in losses.items():
        scored = np.isfinite(values)
        both = torch.from_numpy(np.stack([np.where(scored, values, 0.0), scored.astype(np.float64)]))
        dist.all_reduce(both)
        total, count = both.numpy()
        out[task] = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    return out


def base_losses(model: nn.Module, batcher: MixedTaskBatcher, steps: int, loss: TargetLoss,
                autocast_dtype: torch.dtype | None = None, batch_size: int = 32) -> dict[str, np.ndarray]:
    """Per task, an array over all its examples: the loss of each example the run trains on (NaN for
    the rest), under ``model`` as it is now (call before the first step)."""
    out = {}
    for task, indices in scheduled_indices(batcher, steps).items():
        examples = batcher.examples[task]
        values = np.full(len(examples), np.nan)
        # similar lengths together: less padding in the no-grad forward passes
        order = sorted(indices.tolist(), key=lambda i: len(examples[i].input_ids))
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            batch = collate_left_padded([examples[i] for i in chunk], batcher.pad_token_id)
            values[chunk] = example_losses(model, batch, autocast_dtype, loss).double().numpy()
        out[task] = values
    return _all_ranks(out)


def flow_example_weights(losses: Mapping[str, np.ndarray], tau: float | None = None
                         ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """FLOW weights per task (mean 1 over the examples the run sees) and the tau each task used."""
    weights, taus = {}, {}
    for task in TASKS:
        weights[task], taus[task] = flow_weights(losses[task], tau)
    return weights, taus
