"""Every method behind one interface: ``build_method(...) -> Method`` with the same ``train_step``.

``gems.method`` selects:

- ``gems``: :class:`gems.optim.GEMSAdamW` (full weights, low-rank multi-subspace updates);
- ``adamw``: full fine-tuning with ``torch.optim.AdamW`` on the mixed loss;
- ``lora``: ``peft`` LoRA adapters (``r = gems.lora_r``, ``lora_alpha = gems.lora_alpha``) on the same
  target modules. Item tokens are new rows of the embedding (and of the LM head): frozen, they
  would stay at their title-mean initialisation, so they are trained with peft's
  ``trainable_token_indices`` (only those rows get a delta; tied LM heads follow the embedding).
  ``modules_to_save`` would train full copies of the whole vocabulary's embedding instead;
- ``galore``: ``galore_torch.GaLoreAdamW`` (the reference implementation) with ``rank = r_shared``,
  ``update_proj_gap = t_svd``, ``scale = galore_scale``, ``proj_type = std`` on the target weights.

:func:`gems.step.train_step` runs the two per-task passes for every method and leaves what happens
between and after them to the method (:class:`gems.step.StepMethod`): :class:`GemsMethod` hands
each task's gradient to GEMSAdamW and lets it clip and step; the baselines (:class:`Method`, and
:class:`LoraMethod`) set the first task's gradient aside to log the gradient conflict coefficient
on the same layers as GEMS, then take one ordinary optimizer step on the mixed gradient (the sum).
GaLore's optimizer state holds its projector objects (not tensors only, unlike GEMS);
``gems.checkpoint`` converts them for weights-only files.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from gems.config import GEMSConfig
from gems.conflict import conflict_and_restore, restore_grads, summarize, take_grads
from gems.dpmoe import DPMoEModel
from gems.dpmoe_config import DPMoEConfig
from gems.dpmoe_method import DPMoEMethod
from gems.item_rows import ItemRows
from gems.optim import GEMSAdamW
from gems.step import StepMethod, StepStats, TaskBatch, train_step
from gems.subspace import target_parameter_names
from gems.target_loss import TargetLoss
from gems.token_weighting import TokenWeighting

log = logging.getLogger(__name__)


@dataclass
class Method:
    """A model with its optimizer, stepped on the mixed gradient (adamw, galore; base of the others).

    ``conflict_params``: the weights whose per-task gradients are compared (the conflict
    coefficient); the first task's gradients wait in ``_stash`` until the second task's passes end.
    """

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    conflict_params: dict[str, nn.Parameter] = field(default_factory=dict)
    target_loss: TargetLoss = field(default_factory=TargetLoss)
    item_rows: ItemRows | None = None
    _stash: dict[str, Tensor] = field(default_factory=dict, init=False, repr=False)
    _rhos: dict[str, float] = field(default_factory=dict, init=False, repr=False)

    def train_step(self, batches: Mapping[str, Sequence[TaskBatch]], max_grad_norm: float | None = None,
                   autocast_dtype: torch.dtype | None = None, measure_conflict: bool = True,
                   model: nn.Module | None = None) -> StepStats:
        """:func:`gems.step.train_step` on ``model`` (default: this method's; pass the DDP wrapper)."""
        return train_step(model if model is not None else self.model, self, batches, max_grad_norm,
                          autocast_dtype, measure_conflict, self.target_loss)

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def merged_model(self) -> nn.Module:
        """The plain model to evaluate / export."""
        return self.model

    def begin_step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self._stash, self._rhos = {}, {}

    def after_task_backward(self, task: str, measure_conflict: bool) -> None:
        """First task: set its gradients aside; second: compare, then add them back."""
        if measure_conflict and self.conflict_params:
            if not self._stash:
                self._stash = take_grads(self.conflict_params)
            else:
                self._rhos = conflict_and_restore(self.conflict_params, self._stash)

    def finish_step(self, losses: dict[str, float], samples: dict[str, int],
                    max_grad_norm: float | None) -> StepStats:
        stash, rhos = self._stash, self._rhos
        self._stash, self._rhos = {}, {}  # the stash may hold full-size gradients: free them now
        if stash and not rhos:  # one task only: put its gradient back
            restore_grads(self.conflict_params, stash)
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        max_norm = max_grad_norm if max_grad_norm else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        with self._rows_rescaled():
            self.optimizer.step()
        return StepStats(loss=losses, samples=samples, grad_norm=grad_norm,
                         conflict_before=summarize(rhos) if rhos else None)

    def _rows_rescaled(self) -> contextlib.AbstractContextManager:
        """Item rows' own learning rate and decay around the optimizer step (:mod:`gems.item_rows`)."""
        if self.item_rows is None:
            return contextlib.nullcontext()
        return self.item_rows.rescaled(self.optimizer)


@dataclass
class LoraMethod(Method):
    """LoRA adapters on a peft-wrapped model: exported merged into the weights."""

    def merged_model(self) -> nn.Module:
        """A merged copy; the trainable model is untouched."""
        return copy.deepcopy(self.model).merge_and_unload()


@dataclass
class GemsMethod(Method):
    """GEMSAdamW: it takes each task's gradient between the passes, clips and steps itself."""

    optimizer: GEMSAdamW

    def after_task_backward(self, task: str, measure_conflict: bool) -> None:
        self.optimizer.capture_task_grad(task, keep_full=measure_conflict)

    def finish_step(self, losses: dict[str, float], samples: dict[str, int],
                    max_grad_norm: float | None) -> StepStats:
        self.optimizer.set_task_stats(losses, samples)
        grad_norm = self.optimizer.clip_grad_norm_(max_grad_norm)
        with self._rows_rescaled():
            self.optimizer.step()
        report = self.optimizer.last_report
        return StepStats(loss=losses, samples=samples, grad_norm=grad_norm, gate=report.gate,
                         conflict_before=report.conflict_before, conflict_after=report.conflict_after,
                         svd_refresh=report.refreshed, ranks=report.ranks)


def as_method(model: nn.Module, method: StepMethod | torch.optim.Optimizer) -> StepMethod:
    """``method`` itself, or the method that drives a bare optimizer over ``model`` (tests and
    benchmarks step optimizers directly): GEMS for GEMSAdamW, else the plain mixed-gradient step."""
    if not isinstance(method, torch.optim.Optimizer):
        return method
    if isinstance(method, GEMSAdamW):
        return GemsMethod("gems", model, method)
    return Method(type(method).__name__, model, method)


def _named_trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _module_name(model: nn.Module, module: nn.Module | None) -> str | None:
    for name, m in model.named_modules():
        if m is module:
            return name.split(".")[-1]
    return None


def _adamw(params: list[nn.Parameter], lr: float, cfg: GEMSConfig) -> torch.optim.AdamW:
    """torch's AdamW, fused (one pass per tensor) where every parameter allows it."""
    fused = all(p.dtype in (torch.float32, torch.float16, torch.bfloat16) and p.device.type in ("cpu", "cuda")
                for p in params) or None
    return torch.optim.AdamW(params, lr=lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                             fused=fused)


def _lora(model: nn.Module, cfg: GEMSConfig, item_token_ids: Sequence[int] | None) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    tokens: dict[str, list[int]] | None = None
    if item_token_ids:
        ids = [int(i) for i in item_token_ids]
        embed = _module_name(model, model.get_input_embeddings())
        tokens = {embed: ids}
        tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
        head = _module_name(model, model.get_output_embeddings()) if not tied else None
        if head is not None:
            tokens[head] = ids
    else:
        log.warning("LoRA without item_token_ids: item-token embeddings stay frozen at their init")
    lora_cfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                          target_modules=list(cfg.target_modules), trainable_token_indices=tokens,
                          task_type="CAUSAL_LM")
    return get_peft_model(model, lora_cfg)


def build_method(model: nn.Module, gems_cfg: GEMSConfig, lr: float, bases: Mapping[str, Tensor] | None = None,
                 item_token_ids: Sequence[int] | None = None, *, loss: str = "vocab",
                 item_lr_scale: float = 1.0, item_weight_decay: float = 0.0,
                 item_decay_to: str = "zero", history_weight: float = 0.0,
                 weighting: TokenWeighting | None = None, dpmoe: DPMoEConfig | None = None,
                 item_titles: Mapping[str, str] | None = None) -> Method | DPMoEMethod:
    """The method ``gems_cfg.method`` for ``model`` (build it BEFORE wrapping the model in DDP).

    ``bases``: null-space bases for GEMS (``gems.nullspace.bases_for_run``; ignored by baselines).
    ``item_token_ids``: the catalog's item token ids (catalog order): the candidates of
    ``loss="catalog"``, the rows that ``item_lr_scale`` / ``item_weight_decay`` / ``item_decay_to``
    apply to, and the extra embedding rows LoRA trains. ``history_weight``: the weight of an example's history
    item targets (``train.history_targets``; :func:`gems.target_loss.target_weights`).
    ``weighting``: TALR/FLOW (``train.token_weighting``; :mod:`gems.token_weighting`), inside each
    task's loss for every method. ``dpmoe``: DPMoE's settings (``gems.method=dpmoe``; its own loss,
    :mod:`gems.dpmoe_method`); ``item_titles``: what its semantic view shows of history items.
    """
    if gems_cfg.method == "dpmoe":
        unused = [name for name, off in (("train.item_lr_scale", item_lr_scale == 1.0),
                                         ("train.item_weight_decay", item_weight_decay == 0),
                                         ("train.history_targets", history_weight == 0)) if not off]
        if unused:
            log.info("dpmoe: %s do not apply (item rows stay frozen, only answers are targets)",
                     ", ".join(unused))
        return _dpmoe(model, gems_cfg, lr, item_token_ids, dpmoe or DPMoEConfig(), item_titles)
    method = _build(model, gems_cfg, lr, bases, item_token_ids)
    method.target_loss = TargetLoss.build(loss, item_token_ids, history_weight, weighting)
    if item_token_ids is not None and (item_lr_scale != 1.0 or item_weight_decay > 0):
        method.item_rows = ItemRows.of_model(method.model, item_token_ids, item_lr_scale, item_weight_decay,
                                             item_decay_to)  # type: ignore[arg-type]
    return method


def _dpmoe(model: nn.Module, gems_cfg: GEMSConfig, lr: float, item_token_ids: Sequence[int] | None,
           settings: DPMoEConfig, titles: Mapping[str, str] | None) -> DPMoEMethod:
    if not lr > 0:
        raise ValueError(f"train.lr must be > 0, got {lr}")
    if not item_token_ids:
        raise ValueError("gems.method=dpmoe needs the catalog's item token ids (it scores the item rows)")
    wrapped = DPMoEModel(model, settings, gems_cfg.target_modules, item_token_ids, titles)
    return DPMoEMethod(wrapped, _adamw(wrapped.trainable_parameters(), lr, gems_cfg))


def _build(model: nn.Module, gems_cfg: GEMSConfig, lr: float, bases: Mapping[str, Tensor] | None,
           item_token_ids: Sequence[int] | None) -> Method:
    if not lr > 0:
        raise ValueError(f"train.lr must be > 0, got {lr}")
    method = gems_cfg.method
    targets = target_parameter_names(model, gems_cfg.target_modules)
    if method == "gems":
        protect = gems_cfg.k > 0 or gems_cfg.energy is not None
        optimizer = GEMSAdamW.for_model(model, gems_cfg, lr, bases if protect else None)
        return GemsMethod("gems", model, optimizer)
    if method == "adamw":
        named = _named_trainable(model)
        optimizer = _adamw([p for _, p in named], lr, gems_cfg)
        return Method("adamw", model, optimizer, {n: p for n, p in named if n in targets})
    if method == "lora":
        wrapped = _lora(model, gems_cfg, item_token_ids)
        named = _named_trainable(wrapped)
        optimizer = _adamw([p for _, p in named], lr, gems_cfg)
        return LoraMethod("lora", wrapped, optimizer, {n: p for n, p in named if "lora_" in n})
    if method == "galore":
        from galore_torch import GaLoreAdamW

        named = _named_trainable(model)
        groups = [{"params": [p for n, p in named if n in targets], "rank": gems_cfg.r_shared,
                   "update_proj_gap": gems_cfg.t_svd, "scale": gems_cfg.galore_scale, "proj_type": "std"}]
        rest = [p for n, p in named if n not in targets]
        if rest:
            groups.append({"params": rest})
        optimizer = GaLoreAdamW(groups, lr=lr, betas=gems_cfg.betas, eps=gems_cfg.eps,
                                weight_decay=gems_cfg.weight_decay, no_deprecation_warning=True)
        return Method("galore", model, optimizer, {n: p for n, p in named if n in targets})
    raise ValueError(f"gems.method={method!r} is not one of gems, adamw, lora, galore")
