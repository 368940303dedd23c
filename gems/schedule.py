"""Learning-rate schedule: linear warm-up, then cosine decay to zero at the last planned step.

Warm-up keeps the first Adam steps (with unreliable second moments) and the freshly initialised
item-token embeddings from taking large jumps. The schedule is transformers' own, so it matches
what users of HF Trainer expect; its state is a step counter, so it checkpoints with the optimizer.
"""

from __future__ import annotations

import torch
from torch.optim.lr_scheduler import LambdaLR
from transformers import get_cosine_schedule_with_warmup


def build_lr_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, max_steps: int) -> LambdaLR:
    """Per-step schedule: call ``.step()`` once after every optimizer step."""
    if max_steps < 1:
        raise ValueError(f"train.max_steps must be >= 1, got {max_steps}")
    if warmup_steps < 0:
        raise ValueError(f"train.warmup_steps must be >= 0, got {warmup_steps}")
    # Warm-up longer than the run would never reach the peak: clamp it, and say so in the value.
    return get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=min(warmup_steps, max_steps),
                                           num_training_steps=max_steps)


def current_lr(schedule: LambdaLR) -> float:
    """The learning rate the next optimizer step will use (first param group)."""
    return float(schedule.get_last_lr()[0])
