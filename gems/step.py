"""One training step: per-task backward passes, clipping, optimizer step, statistics.

The mixed-batch loss averages each task's loss over its examples and weighs the tasks by their
example counts: ``L = w_s L_s + w_r L_r`` with ``w_x = n_x / (n_s + n_r)`` (n = examples) and
``L_x = sum CE_x / N_x`` (N = summed target weight: one per example, plus ``train.history_targets``
for an example whose history items are targets too; :func:`gems.target_loss.target_weights`). With
one target per example this is the token-mean over the batch. Each micro-batch of task x is
back-propagated with loss ``w_x sum CE / N_x``: after the search passes ``.grad`` holds ``w_s g_s``,
after the rec passes it holds the mixed-batch gradient ``g_sh``. Two passes per step (one per
task's sub-batch, times its micro-batches), never a third. The passes are the same for every method;
what happens between them and the update after them belong to the method (:class:`StepMethod`,
implemented in :mod:`gems.methods`): GEMS takes each task's part of ``.grad`` between the passes,
the other methods measure the conflict there and take one ordinary step on the mixed gradient.

Under DDP (``model`` wrapped in DistributedDataParallel) target weights and example counts are
summed over ranks first and each rank scales task x's loss by ``world_size * w_x / N_x`` (global
figures), so DDP's gradient average is the gradient of the global mixed loss; micro-batches other
than each task's last run under ``no_sync``. Every rank must see the same micro-batch structure
(``gems.batching`` ensures it).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor, nn

from gems.catalog_head import restricted as restricted_head
from gems.conflict import ConflictSummary
from gems.prompts import IGNORE_INDEX
from gems.scoring import accepts_logits_to_keep
from gems.target_loss import TargetLoss
from gems.tasks import TASKS


@dataclass(frozen=True)
class TaskBatch:
    """A left-padded micro-batch of one task: labels are -100 except at target tokens.

    ``example_weights`` [batch]: a fixed per-example loss weight (FLOW, :mod:`gems.token_weighting`);
    None = 1 for every row."""

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor
    example_weights: Tensor | None = None

    def __post_init__(self) -> None:
        shapes = {tuple(self.input_ids.shape), tuple(self.attention_mask.shape), tuple(self.labels.shape)}
        if len(shapes) != 1 or self.input_ids.dim() != 2:
            got = [tuple(t.shape) for t in (self.input_ids, self.attention_mask, self.labels)]
            raise ValueError(f"TaskBatch tensors must share one [batch, seq] shape, got {got}")
        w = self.example_weights
        if w is not None and (tuple(w.shape) != (self.input_ids.shape[0],)
                              or not bool(torch.isfinite(w).all()) or bool((w < 0).any())):
            raise ValueError(f"example_weights must be {self.input_ids.shape[0]} finite weights >= 0, "
                             f"got shape {tuple(w.shape)}")

    @property
    def tokens(self) -> tuple[int, int]:
        """(real tokens, tokens incl. padding)."""
        return int(self.attention_mask.sum()), self.attention_mask.numel()

    @property
    def target_tokens(self) -> int:
        """Tokens that carry a loss (labels are shifted by one inside the model's causal LM loss)."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())


@dataclass
class StepStats:
    """What one step did, for logging (MLflow via the training loop) and for tests."""

    loss: dict[str, float]
    samples: dict[str, int]
    grad_norm: float
    gate: dict[str, float] = field(default_factory=dict)
    conflict_before: ConflictSummary | None = None
    conflict_after: ConflictSummary | None = None
    svd_refresh: bool = False
    ranks: dict[str, float] = field(default_factory=dict)
    aux: dict[str, float] = field(default_factory=dict)  # a method's own loss terms, logged as named

    @property
    def mixed_loss(self) -> float:
        total = sum(self.samples.values())
        return sum(self.loss[t] * self.samples[t] for t in self.loss) / total if total else math.nan

    def as_metrics(self) -> dict[str, float]:
        """Flat name -> value dict (what gets logged per step)."""
        out: dict[str, float] = {"loss": self.mixed_loss, "grad_norm": self.grad_norm,
                                 "svd_refresh": float(self.svd_refresh)}
        out.update({f"loss_{t}": v for t, v in self.loss.items()})
        out.update({f"samples_{t}": float(v) for t, v in self.samples.items()})
        out.update({f"gate_{t}": v for t, v in self.gate.items()})
        out.update({f"rank_{s}": v for s, v in self.ranks.items()})
        out.update(self.aux)
        for when, summary in (("before", self.conflict_before), ("after", self.conflict_after)):
            if summary is not None:
                out[f"conflict_{when}_mean_rho"] = summary.mean_rho
                out[f"conflict_{when}_share_negative"] = summary.share_negative
        return out


class StepMethod(Protocol):
    """What :func:`train_step` asks of a method around the shared per-task passes."""

    target_loss: TargetLoss

    def begin_step(self) -> None:
        """Zero the gradients and forget any per-task state of an earlier (possibly failed) step."""

    def after_task_backward(self, task: str, measure_conflict: bool) -> None:
        """``task``'s passes have just added its gradient to ``.grad`` (only tasks with target tokens)."""

    def finish_step(self, losses: dict[str, float], samples: dict[str, int],
                    max_grad_norm: float | None) -> StepStats:
        """Clip, update the weights, and say what the step did (``losses``/``samples``: global)."""


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_sum(values: Tensor) -> Tensor:
    if world_size() > 1:
        values = values.clone()
        dist.all_reduce(values)
    return values


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@dataclass(frozen=True)
class _TargetLogits:
    """The logits at a micro-batch's target-predicting positions, flattened, with what the loss needs."""

    logits: Tensor       # [N, V] (or [N, n_items] with item_columns)
    targets: Tensor      # [N] token ids, -100 = no target
    weights: Tensor      # [N] history shares times the row's example weight
    sequence: Tensor     # [N] the row of each position
    item_columns: bool


def _target_logits(model: nn.Module, batch: TaskBatch, autocast_dtype: torch.dtype | None,
                   loss: TargetLoss) -> _TargetLogits:
    device = _device(model)
    ids = batch.input_ids.to(device)
    mask = batch.attention_mask.to(device)
    shifted = batch.labels[:, 1:].to(device)
    weights = loss.weights(shifted)
    if batch.example_weights is not None:
        weights = weights * batch.example_weights.to(device, weights.dtype)[:, None]
    keep = (shifted != IGNORE_INDEX).any(dim=0).nonzero().squeeze(-1)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids,
                              "use_cache": False}
    sliced = accepts_logits_to_keep(model) and keep.numel() > 0
    if sliced:
        kwargs["logits_to_keep"] = keep
    autocast = (torch.autocast(device_type=device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    catalog = loss.item_token_ids if loss.mode == "catalog" else None
    with autocast, restricted_head(model, catalog) as item_columns:
        logits = model(**kwargs).logits
    targets = shifted[:, keep] if sliced else shifted
    weights = weights[:, keep] if sliced else weights
    if not sliced:
        logits = logits[:, :-1]
    sequence = torch.arange(targets.shape[0], device=device)[:, None].expand_as(targets)
    return _TargetLogits(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), weights.reshape(-1),
                         sequence.reshape(-1), item_columns)


def task_ce_sum(model: nn.Module, batch: TaskBatch, autocast_dtype: torch.dtype | None = None,
                loss: TargetLoss | None = None) -> Tensor:
    """Summed next-token cross-entropy over the batch's target tokens (fp32 scalar with grad).

    Position ids skip the left padding (as in scoring), and the LM head runs only at positions
    that predict a target (``logits_to_keep``), so the big-vocabulary logits stay small; under the
    catalog loss a plain linear head computes its item rows only (:mod:`gems.catalog_head`). ``loss``
    chooses the softmax's candidates (default: the whole vocabulary) and its weighting (history
    shares, TALR, and the batch's FLOW example weights).
    """
    loss = loss or TargetLoss()
    t = _target_logits(model, batch, autocast_dtype, loss)
    return loss.ce_sum(t.logits, t.targets, t.weights, item_columns=t.item_columns, sequence=t.sequence)


@torch.no_grad()
def example_losses(model: nn.Module, batch: TaskBatch, autocast_dtype: torch.dtype | None = None,
                   loss: TargetLoss | None = None) -> Tensor:
    """Each row's loss [batch] (fp32, no grad): the weighted mean CE of its targets (the answer, and
    its history items' shares under ``train.history_targets``); NaN for a row without a target.
    What FLOW weighs examples by (:mod:`gems.flow_pass`)."""
    loss = loss or TargetLoss()
    was_training = model.training
    model.eval()
    try:
        t = _target_logits(model, batch, autocast_dtype, loss)
    finally:
        model.train(was_training)
    valid = t.targets != IGNORE_INDEX
    ce = loss.position_ce(t.logits, t.targets, t.item_columns).double()
    rows, w = t.sequence[valid], t.weights[valid].double()
    n = batch.input_ids.shape[0]
    total = torch.zeros(n, dtype=torch.float64, device=ce.device).index_add_(0, rows, ce * w)
    mass = torch.zeros(n, dtype=torch.float64, device=ce.device).index_add_(0, rows, w)
    return torch.where(mass > 0, total / mass.clamp(min=1e-30), torch.nan).float().cpu()


def micro_batch_context(model: nn.Module, index: int, count: int) -> contextlib.AbstractContextManager:
    """DDP: sync gradients only on each task's last micro-batch."""
    if hasattr(model, "no_sync") and index < count - 1:
        return model.no_sync()
    return contextlib.nullcontext()


def _target_totals(batches: Mapping[str, Sequence[TaskBatch]], loss: TargetLoss
                   ) -> tuple[dict[str, float], dict[str, int]]:
    """Global (summed target weight, examples with a target) per task: the loss's normaliser and
    the samples the gate and the logs see. With one target per example both are the example count."""
    local = torch.zeros(2, len(TASKS), dtype=torch.float64)
    for i, task in enumerate(TASKS):
        for b in batches.get(task, ()):
            shifted = b.labels[:, 1:]
            local[0, i] += float(loss.weights(shifted).sum())
            local[1, i] += int((shifted != IGNORE_INDEX).any(-1).sum())
    total = all_reduce_sum(local)
    return ({t: float(total[0, i]) for i, t in enumerate(TASKS)},
            {t: int(total[1, i]) for i, t in enumerate(TASKS)})


def train_step(model: nn.Module, method: StepMethod,
               batches: Mapping[str, Sequence[TaskBatch]], max_grad_norm: float | None = None,
               autocast_dtype: torch.dtype | None = None, measure_conflict: bool = True,
               loss: TargetLoss | None = None) -> StepStats:
    """One optimizer step on ``batches`` (task -> micro-batches); returns its statistics.

    ``model`` is what runs forward (possibly DDP-wrapped); ``method`` is a :class:`StepMethod`
    (:class:`gems.methods.Method`; :func:`gems.methods.as_method` gives one for a bare torch
    optimizer). ``measure_conflict=False`` skips the conflict
    coefficient (GEMS then keeps no extra full-size gradient on steps without an SVD refresh);
    loops pass it on logging steps. ``loss``: the target softmax's candidates
    (:class:`gems.target_loss.TargetLoss`; default the method's own).
    """
    unknown = set(batches) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown task(s) in batches: {sorted(unknown)}; expected {TASKS}")
    loss = loss or method.target_loss
    counts, examples = _target_totals(batches, loss)
    total = sum(examples.values())
    if total == 0 or sum(counts.values()) == 0:
        raise ValueError("train_step: the batches hold no target tokens (all labels are -100)")
    # w_x / N_x per task, times the world size that DDP's gradient average divides by
    scales = {t: world_size() * examples[t] / total / counts[t] if counts[t] > 0 else 0.0 for t in TASKS}
    model.train()
    method.begin_step()
    ce_sums = torch.zeros(len(TASKS), dtype=torch.float64)
    for i, task in enumerate(TASKS):
        micro = list(batches.get(task, ()))
        for j, batch in enumerate(micro):
            with micro_batch_context(model, j, len(micro)):
                ce = task_ce_sum(model, batch, autocast_dtype, loss)
                (ce * scales[task]).backward()
            ce_sums[i] += float(ce.detach())
        if counts[task] > 0:
            method.after_task_backward(task, measure_conflict)
    ce_sums = all_reduce_sum(ce_sums)
    losses = {t: float(ce_sums[i]) / counts[t] for i, t in enumerate(TASKS) if counts[t] > 0}
    samples = {t: examples[t] for t in TASKS if counts[t] > 0}
    return method.finish_step(losses, samples, max_grad_norm)
