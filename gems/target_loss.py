"""What the softmax at a target position runs over: the catalog's item tokens, or the vocabulary.

``catalog`` (the default of ``train.loss``) trains exactly what scoring ranks: the next-token
logits restricted to the item tokens (:mod:`gems.scoring`). The full-vocabulary loss (``vocab``)
first has to move the next-token mass from text onto item tokens (about ln(catalog size) of loss
before anything is learned about items) and keeps pushing text tokens down at every step, which
costs both rec quality and general-domain behaviour (item mass on ordinary text); it stays as an
option for comparison. Both take the same logits, so the head, soft-capping or biases of any
backbone stay exactly what scoring uses.

History targets (``train.history_targets``): a prompt's earlier history item tokens can carry a
label too, each predicted from the items before it, as a sequential recommender trains on every
position of a sequence. They cost no extra forward pass (the positions are computed anyway) and
multiply the item transitions a step sees. :func:`target_weights` keeps each example's answer the
main signal: the last target of a row weighs 1 and its earlier targets share ``history_weight``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from gems.prompts import IGNORE_INDEX
from gems.token_weighting import TokenWeighting, talr_weights

LossMode = Literal["catalog", "vocab"]
LOSS_MODES: tuple[str, ...] = ("catalog", "vocab")


def target_weights(labels: Tensor, history_weight: float) -> Tensor:
    """Per-position loss weight of ``labels`` [B, T] (-100 = no target), float32, same shape.

    A row's last target (its answer) weighs 1; its earlier targets (history items) weigh
    ``history_weight / their count``, so every example weighs ``1 + history_weight`` at most and a
    row with a single target weighs exactly 1 (the plain loss).
    """
    is_target = labels != IGNORE_INDEX
    count = is_target.sum(-1, keepdim=True)
    last = is_target & (is_target.cumsum(-1) == count)
    earlier = is_target & ~last
    share = history_weight / earlier.sum(-1, keepdim=True).clamp(min=1)
    return last.float() + earlier.float() * share


@dataclass(frozen=True)
class TargetLoss:
    """Summed cross-entropy of target tokens over the candidates of ``mode``.

    ``item_token_ids`` (catalog mode): the token id of every catalog item; column ``j`` of the
    restricted logits is item ``j``. ``weighting``: TALR/FLOW (:mod:`gems.token_weighting`); TALR
    is applied here, FLOW's per-example weights arrive with the batch.
    """

    mode: LossMode = "vocab"
    item_token_ids: Tensor | None = None
    history_weight: float = 0.0
    weighting: TokenWeighting = field(default_factory=TokenWeighting)
    _lookup: dict[torch.device, Tensor] = field(default_factory=dict, init=False, repr=False,
                                                 compare=False)

    def __post_init__(self) -> None:
        if self.mode not in LOSS_MODES:
            raise ValueError(f"train.loss must be one of {LOSS_MODES}, got {self.mode!r}")
        if not 0 <= self.history_weight < float("inf"):
            raise ValueError(f"train.history_targets must be a finite weight >= 0, got {self.history_weight}")
        if self.mode == "catalog":
            ids = self.item_token_ids
            if ids is None or ids.numel() == 0:
                raise ValueError("train.loss=catalog needs the catalog's item token ids")
            ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
            if ids.unique().numel() != ids.numel():
                raise ValueError("item_token_ids holds a token id twice: each item needs its own token")
            object.__setattr__(self, "item_token_ids", ids)

    @classmethod
    def build(cls, mode: str, item_token_ids: Tensor | list[int] | None,
              history_weight: float = 0.0, weighting: TokenWeighting | None = None) -> TargetLoss:
        ids = None if item_token_ids is None else torch.as_tensor(item_token_ids, dtype=torch.long)
        return cls(mode, ids if mode == "catalog" else None, history_weight,  # type: ignore[arg-type]
                   weighting or TokenWeighting())

    def weights(self, labels: Tensor) -> Tensor:
        """:func:`target_weights` of ``labels`` [B, T] with this loss's history weight."""
        return target_weights(labels, self.history_weight)

    def _catalog_index(self, targets: Tensor) -> Tensor:
        """Catalog column of each target token id (a clear error for targets that are no item)."""
        device = targets.device
        if device not in self._lookup:
            assert self.item_token_ids is not None
            ids = self.item_token_ids.to(device)
            if int(ids.min()) < 0:
                raise ValueError(f"item token ids must be >= 0, got {int(ids.min())}")
            lookup = torch.full((int(ids.max()) + 1,), -1, dtype=torch.long, device=device)
            lookup[ids] = torch.arange(ids.numel(), device=device)
            self._lookup[device] = lookup
        lookup = self._lookup[device]
        inside = (targets >= 0) & (targets < lookup.numel())
        index = torch.where(inside, lookup[targets.clamp(0, lookup.numel() - 1)], -1)
        if bool((index < 0).any()):
            bad = targets[index < 0][:5].tolist()
            raise ValueError(f"train.loss=catalog: target token(s) {bad} are not catalog item tokens")
        return index

    def position_ce(self, logits: Tensor, targets: Tensor, item_columns: bool = False) -> Tensor:
        """Cross-entropy (fp32) of each position whose target is not -100, in order; ``logits``
        [N, V], ``targets`` [N] (token ids). ``item_columns``: catalog mode's logits are the item
        rows' already, column j = item j (:mod:`gems.catalog_head`)."""
        valid = targets != IGNORE_INDEX
        rows = logits[valid]
        if self.mode == "vocab":
            return F.cross_entropy(rows.float(), targets[valid], reduction="none")
        assert self.item_token_ids is not None
        index = self._catalog_index(targets[valid])
        if item_columns:
            if logits.shape[-1] != self.item_token_ids.numel():
                raise ValueError(f"item-column logits have {logits.shape[-1]} columns, the catalog "
                                 f"{self.item_token_ids.numel()} items")
            restricted = rows.float()
        else:
            if int(self.item_token_ids.max()) >= logits.shape[-1]:
                raise ValueError(f"item token ids reach {int(self.item_token_ids.max())}, beyond the "
                                 f"logits' {logits.shape[-1]} columns")
            restricted = rows.index_select(-1, self.item_token_ids.to(rows.device)).float()
        return F.cross_entropy(restricted, index, reduction="none")

    def ce_sum(self, logits: Tensor, targets: Tensor, weights: Tensor | None = None,
               item_columns: bool = False, sequence: Tensor | None = None) -> Tensor:
        """Sum of CE over positions whose target is not -100 (:meth:`position_ce`); ``weights`` [N]
        (default 1) scale each position's CE (:meth:`weights`, times FLOW's example weights);
        ``sequence`` [N]: the row of each position, for TALR's per-sequence temperature (default:
        every position its own row)."""
        valid = targets != IGNORE_INDEX
        if not bool(valid.any()):
            return logits.float().sum() * 0.0
        ce = self.position_ce(logits, targets, item_columns)
        if weights is None and self.weighting.mode != "talr":
            return ce.sum()
        base = (torch.ones_like(ce) if weights is None
                else weights.to(ce.device)[valid.to(weights.device)].to(ce.dtype))
        if self.weighting.mode == "talr":
            rows = (torch.arange(targets.numel(), device=ce.device) if sequence is None
                    else sequence.to(ce.device))[valid.to(ce.device)]
            base = base * talr_weights(ce, rows, base, self.weighting)
        return (ce * base).sum()
