"""DPMoE as a training method: its examples, batches and step behind the interface every method has.

The training loop treats it like the others (mixed-task batches, ``method.train_step``, checkpoints,
val evaluation), but an example is two views and an answer (:class:`DualViewExample`), and the step
is DPMoE's own: per task, ``(loss_x * n_x / n)`` back-propagated per micro-batch, where ``loss_x`` is
the catalog CE of the fused state plus the InfoNCE and balance terms (gems.dpmoe), so every task
keeps its share of the step as in :mod:`gems.step`; then clipping and one AdamW step on the experts,
routers and fusion. Under DDP the per-rank example counts are summed first, like gems.step does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from gems.dpmoe import DPMoEModel, ViewBatch
from gems.dual_view import EncodedView, collate_views, encode_views
from gems.step import StepStats, all_reduce_sum, micro_batch_context, world_size
from gems.target_loss import TargetLoss
from gems.tasks import TASKS


@dataclass(frozen=True)
class DualViewExample:
    """One training example: both views of its prompt and its answer's catalog column."""

    views: dict[str, EncodedView]
    target: int

    @property
    def input_ids(self) -> list[int]:
        """The semantic view's ids (what length bucketing and token counts read)."""
        return self.views["semantic"][0]


@dataclass(frozen=True)
class DualViewBatch:
    """A micro-batch of one task: each view left-padded, and the answers' catalog columns."""

    views: dict[str, ViewBatch]
    targets: Tensor

    @property
    def tokens(self) -> tuple[int, int]:
        """(real tokens, tokens incl. padding) over both views."""
        real = sum(int(v.attention_mask.sum()) for v in self.views.values())
        return real, sum(v.attention_mask.numel() for v in self.views.values())


def dual_view_encoder(tokenizer: Any, max_len: int, catalog_index: Mapping[str, int],
                      titles: Mapping[str, str] | None = None, title_words: int = 8
                      ) -> Callable[[Mapping[str, Any]], DualViewExample]:
    """Row (``prompt``, ``target_item_id``) -> DualViewExample; a clear error for an unknown answer.
    ``titles``/``title_words``: the semantic view's history titles (gems.dual_view)."""
    def encode(row: Mapping[str, Any]) -> DualViewExample:
        target = str(row["target_item_id"])
        if target not in catalog_index:
            raise ValueError(f"example {row.get('example_id', '?')}: target item {target} is not in "
                             "the catalog")
        views = encode_views(tokenizer, str(row["prompt"]), max_len, titles, title_words)
        return DualViewExample(views, catalog_index[target])

    return encode


def collate_dual_view(examples: Sequence[DualViewExample], pad_token_id: int) -> DualViewBatch:
    return DualViewBatch(collate_views([e.views for e in examples], pad_token_id),
                         torch.tensor([e.target for e in examples], dtype=torch.long))


@dataclass
class DPMoEMethod:
    """DPMoE's model and optimizer, stepped on its own loss (the interface of gems.methods.Method)."""

    model: DPMoEModel
    optimizer: torch.optim.Optimizer
    name: str = "dpmoe"
    target_loss: TargetLoss = field(default_factory=TargetLoss)  # unused: DPMoE has its own loss

    def train_step(self, batches: Mapping[str, Sequence[DualViewBatch]], max_grad_norm: float | None = None,
                   autocast_dtype: torch.dtype | None = None, measure_conflict: bool = True,
                   model: nn.Module | None = None) -> StepStats:
        """One optimizer step; ``model``: what runs forward (the DDP wrapper), default this one."""
        unknown = set(batches) - set(TASKS)
        if unknown:
            raise ValueError(f"unknown task(s) in batches: {sorted(unknown)}; expected {TASKS}")
        runner = model if model is not None else self.model
        local = torch.tensor([float(sum(len(b.targets) for b in batches.get(t, ()))) for t in TASKS],
                             dtype=torch.float64)
        counts = all_reduce_sum(local)
        total = float(counts.sum())
        if total == 0:
            raise ValueError("DPMoE step: the batches hold no examples")
        device = self.model.item_token_ids.device
        autocast = (torch.autocast(device_type=device.type, dtype=autocast_dtype) if autocast_dtype
                    else None)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        sums = torch.zeros(len(TASKS), dtype=torch.float64)
        parts_sum: dict[str, float] = {"bpc": 0.0, "balance": 0.0}
        passes = 0
        for i, task in enumerate(TASKS):
            micro = list(batches.get(task, ()))
            for j, batch in enumerate(micro):
                n = len(batch.targets)
                with micro_batch_context(runner, j, len(micro)):
                    if autocast is not None:
                        with autocast:
                            out = runner(batch.views["semantic"], batch.views["behavioural"])
                    else:
                        out = runner(batch.views["semantic"], batch.views["behavioural"])
                    loss, parts = self.model.loss(out, batch.targets)
                    (loss * (world_size() * n / total)).backward()
                sums[i] += parts["ce"] * n
                parts_sum["bpc"] += parts["bpc"]
                parts_sum["balance"] += parts["balance"]
                passes += 1
        sums = all_reduce_sum(sums)
        params = [p for p in self.model.trainable_parameters() if p.grad is not None]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm or math.inf))
        self.optimizer.step()
        losses = {t: float(sums[i] / counts[i]) for i, t in enumerate(TASKS) if counts[i] > 0}
        samples = {t: int(counts[i]) for i, t in enumerate(TASKS) if counts[i] > 0}
        return StepStats(loss=losses, samples=samples, grad_norm=grad_norm,
                         aux={"dpmoe_bpc": parts_sum["bpc"] / max(passes, 1),
                              "dpmoe_balance": parts_sum["balance"] / max(passes, 1)})

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.model.trainable_parameters())

    def merged_model(self) -> nn.Module:
        return self.model

