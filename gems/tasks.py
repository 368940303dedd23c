"""The two tasks one model is fine-tuned for, in the order every per-task table, loop and tensor
index uses (search first): data, batching, the gate, the training step, metrics and serving all
read them from here so they cannot disagree."""

from __future__ import annotations

from typing import Literal

TASKS: tuple[str, str] = ("search", "rec")
Task = Literal["search", "rec"]
