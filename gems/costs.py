"""What a method costs beside time: trainable parameters, optimizer state, the process's peak RSS.

The study compares methods on these (issue: cost per method), so every training run reports them
with its step times; the optimizer benchmark counts state with the same function.
"""

from __future__ import annotations

import resource
import sys

import torch


def tensor_bytes(obj: object) -> int:
    """Bytes of every tensor reachable in ``obj`` (dicts, lists, objects such as GaLore's projectors);
    a tensor reached twice is counted once."""
    seen: set[int] = set()

    def walk(value: object) -> int:
        if isinstance(value, torch.Tensor):
            key = id(value)
            if key in seen:
                return 0
            seen.add(key)
            return value.numel() * value.element_size()
        if isinstance(value, dict):
            return sum(walk(v) for v in value.values())
        if isinstance(value, list | tuple):
            return sum(walk(v) for v in value)
        if hasattr(value, "__dict__") and not isinstance(value, type | torch.nn.Module):
            return sum(walk(v) for v in vars(value).values())
        return 0

    return walk(obj)


def optimizer_state_mb(optimizer: torch.optim.Optimizer) -> float:
    """MiB of the tensors in ``optimizer.state`` (moments, bases, projectors)."""
    return tensor_bytes(dict(optimizer.state)) / 2**20


def peak_rss_gb() -> float:
    """This process's peak resident set size so far, GiB (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**30 if sys.platform == "darwin" else 2**20)
