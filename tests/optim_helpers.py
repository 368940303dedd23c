"""Helpers for the optimizer tests: seeded task batches and weight snapshots."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gems.methods import as_method
from gems.step import StepStats, TaskBatch, train_step


def task_batch(rows: int, seq: int, vocab: int, seed: int, pad_left: int = 0) -> TaskBatch:
    """Random prompts whose last token is the target; ``pad_left`` rows get left padding."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (rows, seq), generator=gen)
    mask = torch.ones_like(ids)
    for r in range(min(pad_left, rows)):
        cut = 1 + r % max(1, seq // 2)
        ids[r, :cut] = 0
        mask[r, :cut] = 0
    labels = torch.full_like(ids, -100)
    labels[:, -1] = ids[:, -1]
    return TaskBatch(ids, mask, labels)


def mixed_batches(vocab: int, seed: int = 0, rows: tuple[int, int] = (4, 3),
                  seq: int = 12) -> dict[str, list[TaskBatch]]:
    return {"search": [task_batch(rows[0], seq, vocab, seed)],
            "rec": [task_batch(rows[1], seq, vocab, seed + 1000)]}


def snapshot(model: nn.Module, names: list[str] | None = None) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if names is None or n in names}


def step_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, batches: dict[str, list[TaskBatch]],
                   *args: object, **kwargs: object) -> StepStats:
    """``train_step`` with a bare optimizer: the method that drives it (GEMS for GEMSAdamW)."""
    return train_step(model, as_method(model, optimizer), batches, *args, **kwargs)  # type: ignore[arg-type]
