"""Gradient conflict coefficient: rho = cos(g_search, g_rec) per target layer (negative = conflict).

Logged before projection (the raw per-task gradients) and after it (between the task-specific
updates GEMS actually applies), as the mean over layers and the share of layers with rho < 0,
so a run shows whether the subspaces separate the tasks (DESIGN.md section 5). Methods other than
GEMS get the per-task gradients by setting the first task's aside (:func:`take_grads`) and
comparing it with the second's (:func:`conflict_and_restore`), which leaves the mixed gradient.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn


def cosine(a: Tensor, b: Tensor) -> float:
    """cos(a, b) over the flattened tensors; nan when either is zero (no direction to compare)."""
    a64, b64 = a.detach().reshape(-1).double(), b.detach().reshape(-1).double()
    return cosine_from_products(float(a64 @ b64), float(a64 @ a64), float(b64 @ b64))


def cosine_from_products(dot: float, sq_a: float, sq_b: float) -> float:
    """cos from <a, b>, |a|^2, |b|^2 (lets callers reuse products they already computed)."""
    if sq_a <= 0 or sq_b <= 0:
        return math.nan
    return max(-1.0, min(1.0, dot / math.sqrt(sq_a * sq_b)))


@dataclass(frozen=True)
class ConflictSummary:
    """Mean rho over layers with a defined rho, share of those with rho < 0, and the per-layer values."""

    mean_rho: float
    share_negative: float
    per_layer: dict[str, float]

    @property
    def layers(self) -> int:
        return sum(1 for v in self.per_layer.values() if not math.isnan(v))


def summarize(per_layer: Mapping[str, float]) -> ConflictSummary:
    """Summary over the layers whose rho is defined (both task gradients non-zero)."""
    defined = [v for v in per_layer.values() if not math.isnan(v)]
    if not defined:
        return ConflictSummary(math.nan, math.nan, dict(per_layer))
    negative = sum(1 for v in defined if v < 0)
    return ConflictSummary(float(torch.tensor(defined, dtype=torch.float64).mean()),
                           negative / len(defined), dict(per_layer))


def take_grads(params: Mapping[str, nn.Parameter]) -> dict[str, Tensor]:
    """Move the first task's gradients aside so the second task's passes start from zero."""
    out = {}
    for name, p in params.items():
        if p.grad is not None:
            out[name] = p.grad
            p.grad = None
    return out


def restore_grads(params: Mapping[str, nn.Parameter], stash: Mapping[str, Tensor]) -> None:
    """Add the set-aside gradients back: ``.grad`` is then the sum over the tasks' passes."""
    for name, g in stash.items():
        p = params[name]
        if p.grad is None:
            p.grad = g
        else:
            p.grad.add_(g)


def conflict_and_restore(params: Mapping[str, nn.Parameter],
                         stash: Mapping[str, Tensor]) -> dict[str, float]:
    """cos(g_search, g_rec) per parameter, then ``.grad`` = their sum (the mixed gradient)."""
    rhos = {name: cosine(stash[name], p.grad) for name, p in params.items()
            if name in stash and p.grad is not None}
    restore_grads(params, stash)
    return rhos
