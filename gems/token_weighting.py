"""Loss reweighting that trades a little fit for general-domain retention: TALR and FLOW.

Both come from the seed papers on forgetting in fine-tuning (../shared/seeds/): tokens or examples the
model already finds likely carry less risk of pulling it away from what it knew.

- **TALR** (token-adaptive loss reweighting): each target position weighs ``w = p^(1/tau)``, ``p`` the
  *current* model's probability of its label (under the loss's own softmax: catalog or vocabulary),
  detached, floored at ``min_prob``. ``tau`` is fixed, or (default) the median over the micro-batch's
  sequences of their mean target NLL, so the spread of weights follows the loss level. ``self_norm``
  divides by the summed weights (the loss stays a weighted mean); ``mean`` keeps the plain mean's
  normaliser and floors each weight at ``floor``. No extra forward pass: the weights come from the
  logits the loss already has. Our prompts train on item tokens only (the answer, plus history items
  under ``train.history_targets``), never on template text, so with one target per example TALR
  reweights *examples*; only history targets make it reweight tokens within a sequence.
- **FLOW**: each example weighs ``exp(-l0/tau)``, ``l0`` its loss under the model before training
  (one no-grad pass before the first step, :mod:`gems.flow_pass`), ``tau`` the median of ``l0``
  (or fixed); weights are scaled to mean 1 over the examples the run sees, so the step size stays that
  of the plain loss. Fixed for the whole run.

Both multiply the per-position weights the loss already has (history-target shares), inside each
task's loss; every method (gems, adamw, lora, galore) trains through the same loss, so every method
gets them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

WeightingMode = Literal["none", "talr", "flow"]
WEIGHTING_MODES: tuple[str, ...] = ("none", "talr", "flow")
Normalisation = Literal["self_norm", "mean"]
#: The smallest temperature used: a micro-batch the model fits exactly would otherwise give tau = 0.
MIN_TAU = 1e-3


@dataclass(frozen=True)
class TokenWeighting:
    """``train.token_weighting`` and its settings (``tau`` None = dynamic: the median loss)."""

    mode: WeightingMode = "none"
    tau: float | None = None
    norm: Normalisation = "self_norm"
    floor: float = 0.01
    min_prob: float = 1e-6

    def __post_init__(self) -> None:
        if self.mode not in WEIGHTING_MODES:
            raise ValueError(f"train.token_weighting must be one of {WEIGHTING_MODES}, got {self.mode!r}")
        if self.norm not in ("self_norm", "mean"):
            raise ValueError(f"train.weighting_norm must be self_norm or mean, got {self.norm!r}")
        if self.tau is not None and not (self.tau > 0 and math.isfinite(self.tau)):
            raise ValueError(f"train.weighting_tau must be a finite number > 0 or None, got {self.tau}")
        if not 0 <= self.floor <= 1 or not 0 < self.min_prob < 1:
            raise ValueError(f"token weighting floor must be in [0, 1] and min_prob in (0, 1), got "
                             f"{self.floor}, {self.min_prob}")


def dynamic_tau(nll: Tensor, sequence: Tensor, base: Tensor) -> float:
    """Median over sequences of each sequence's mean target NLL (``base``-weighted), >= MIN_TAU."""
    nll, base = nll.detach().double(), base.detach().double()
    ids, index = torch.unique(sequence, return_inverse=True)
    total = torch.zeros(ids.numel(), dtype=torch.float64, device=nll.device).index_add_(0, index, nll * base)
    mass = torch.zeros(ids.numel(), dtype=torch.float64, device=nll.device).index_add_(0, index, base)
    means = total / mass.clamp(min=1e-12)
    # the lower median of an even count, as torch.median gives it: a value some sequence really has
    return max(float(means.median()), MIN_TAU)


def talr_weights(nll: Tensor, sequence: Tensor, base: Tensor, weighting: TokenWeighting) -> Tensor:
    """TALR factor per target position (detached), to multiply ``base`` (history shares, FLOW).

    ``nll`` [N]: each position's cross-entropy (with or without grad; only its value is read);
    ``sequence`` [N]: the row each position belongs to; ``base`` [N]: the weights the plain loss uses.
    With ``self_norm`` the factors are scaled so that ``sum(base * factor) == sum(base)``: the micro-batch
    keeps its share of the task's loss and within it the weights are ``p^(1/tau) / sum(...)``.
    """
    nll = nll.detach().float()
    tau = weighting.tau if weighting.tau is not None else dynamic_tau(nll, sequence, base)
    log_p = (-nll).clamp(min=math.log(weighting.min_prob))
    log_w = log_p / tau
    base = base.detach().to(log_w.dtype)
    if weighting.norm == "self_norm":
        w = torch.exp(log_w - log_w.max())  # scale-free: the normalisation below cancels it
        return w * base.sum() / (base * w).sum().clamp(min=1e-30)
    return torch.exp(log_w).clamp(min=weighting.floor)


def flow_weights(base_losses: np.ndarray, tau: float | None = None) -> tuple[np.ndarray, float]:
    """FLOW's per-example weights ``exp(-l0/tau)`` scaled to mean 1, and the tau used.

    ``base_losses``: each example's loss under the model before training (NaN = an example the run
    never sees; it gets weight 1 and does not count). ``tau`` None = the median of the losses.
    """
    losses = np.asarray(base_losses, dtype=np.float64)
    seen = np.isfinite(losses)
    if not seen.any():
        raise ValueError("FLOW needs the base loss of at least one training example")
    used = tau if tau is not None else max(float(np.median(losses[seen])), MIN_TAU)
    weights = np.ones_like(losses)
    # shift by the smallest loss before exponentiating: the mean-1 scaling cancels it
    raw = np.exp(-(losses[seen] - losses[seen].min()) / used)
    weights[seen] = raw / raw.mean()
    return weights, used
