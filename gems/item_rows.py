"""Item rows learn at their own rate and decay, under every method's optimizer.

Item tokens are new rows of the embedding (and of an untied LM head): the pretrained text rows
around them need small steps, while item rows start from a title mean and carry most of what
recommendation has to learn. The rows share one tensor with the text vocabulary, so no optimizer
can give them a parameter group of their own; instead each step's change of the item rows is
rescaled after the optimizer has made it: ``row <- old + s (new - old) - lr s wd (old - anchor)``. For
Adam-family optimizers (AdamW, GaLore's non-target params, GEMS's AdamW part) this is exactly a
per-row learning rate ``s * lr`` with decoupled weight decay ``wd`` on those rows, whatever the
optimizer's own state and schedule. The anchor is zero (plain decay) or the rows as they were when
training started (``decay_to="init"``, L2-SP): under the catalog softmax an item that is never a
target only ever has its row pushed down, and Adam turns that small, same-signed gradient into
full-size steps; the pull toward the start keeps what the row's initialisation (title, neighbours)
knew about such an item. LoRA trains item rows as peft's trainable-token deltas, whose whole tensor
is item rows. With ``s = 1`` and ``wd = 0`` nothing is copied (the default costs nothing).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

TRAINABLE_TOKENS_DELTA = "trainable_tokens_delta"
DecayTarget = Literal["zero", "init"]


def item_row_weights(model: nn.Module) -> list[nn.Parameter]:
    """The weights that hold item rows: the input embedding, and the LM head when it is untied."""
    out: list[nn.Parameter] = []
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        weight = getattr(module, "weight", None)
        if weight is not None and all(weight is not w for w in out):
            out.append(weight)
    return out


@dataclass(frozen=True)
class RowBlock:
    """Rows ``rows`` of ``param`` (None = the whole tensor) that belong to items."""

    param: nn.Parameter
    rows: Tensor | None

    def read(self) -> Tensor:
        data = self.param.detach()
        return data.clone() if self.rows is None else data.index_select(0, self.rows)

    def write(self, values: Tensor) -> None:
        with torch.no_grad():
            if self.rows is None:
                self.param.copy_(values)
            else:
                self.param.index_copy_(0, self.rows, values.to(self.param.dtype))


class ItemRows:
    """The item rows of a model and their learning-rate scale and weight decay (toward zero or
    toward the rows at construction: build it before a checkpoint is loaded into the model)."""

    def __init__(self, blocks: Sequence[RowBlock], lr_scale: float = 1.0, weight_decay: float = 0.0,
                 decay_to: DecayTarget = "zero") -> None:
        if not lr_scale > 0:
            raise ValueError(f"train.item_lr_scale must be > 0, got {lr_scale}")
        if weight_decay < 0:
            raise ValueError(f"train.item_weight_decay must be >= 0, got {weight_decay}")
        if decay_to not in ("zero", "init"):
            raise ValueError(f"train.item_decay_to must be zero or init, got {decay_to!r}")
        self.blocks = list(blocks)
        self.lr_scale, self.weight_decay = float(lr_scale), float(weight_decay)
        self.anchors: list[Tensor] | None = (
            [b.read() for b in self.blocks] if decay_to == "init" and weight_decay > 0 else None)

    @property
    def active(self) -> bool:
        return bool(self.blocks) and (self.lr_scale != 1.0 or self.weight_decay > 0)

    @classmethod
    def of_model(cls, model: nn.Module, item_token_ids: Sequence[int], lr_scale: float = 1.0,
                 weight_decay: float = 0.0, decay_to: DecayTarget = "zero") -> ItemRows:
        """Item rows of a plain model (embedding, and the LM head when untied) or of a peft model
        (its trainable-token deltas)."""
        peft_deltas = [p for n, p in model.named_parameters()
                       if TRAINABLE_TOKENS_DELTA in n and p.requires_grad]
        if peft_deltas:
            return cls([RowBlock(p, None) for p in peft_deltas], lr_scale, weight_decay, decay_to)
        ids = torch.as_tensor(list(item_token_ids), dtype=torch.long)
        if ids.numel() == 0:
            return cls([], lr_scale, weight_decay, decay_to)
        blocks = [RowBlock(w, ids.to(w.device)) for w in item_row_weights(model) if w.requires_grad]
        return cls(blocks, lr_scale, weight_decay, decay_to)

    @contextmanager
    def rescaled(self, optimizer: torch.optim.Optimizer) -> Iterator[None]:
        """Wrap ``optimizer.step()``: the item rows' change is rescaled and decayed afterwards."""
        if not self.active:
            yield
            return
        before = [b.read() for b in self.blocks]
        lr = float(optimizer.param_groups[0]["lr"])
        yield
        anchors = self.anchors if self.anchors is not None else [None] * len(self.blocks)
        for block, old, anchor in zip(self.blocks, before, anchors, strict=True):
            new = block.read()
            scaled = old + self.lr_scale * (new - old)
            if self.weight_decay > 0:
                pull = old if anchor is None else old - anchor
                scaled = scaled - (lr * self.lr_scale * self.weight_decay) * pull
            block.write(scaled)
