"""Mixed-task batches: every optimizer step sees both tasks, in a fixed ratio, reproducibly.

GEMS needs a search and a rec gradient at every step (a step without one task gives it a zero
gate), so batches are drawn per task, not from a shuffled union. Each task's examples form an
endless stream of seeded per-epoch permutations; step ``t`` takes the next ``n_task * world_size``
examples of each stream and rank ``r`` keeps its slice. Everything is a pure function of
(seed, step, rank, world size, example counts), so:

- a run resumed at step ``t`` sees exactly the batches an uninterrupted run would;
- every rank has the same micro-batch structure (same counts per task), so the collective
  all-reduces of DDP line up even when one task is rarer than the other.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, overload

import numpy as np
import torch

from gems.prompts import IGNORE_INDEX
from gems.step import TaskBatch
from gems.tasks import TASKS


@dataclass(frozen=True)
class TokenizedExample:
    """One training example: prompt + target token ids, labels -100 except at the target."""

    input_ids: list[int]
    labels: list[int]

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.labels) or not self.input_ids:
            raise ValueError(f"bad example: {len(self.input_ids)} input ids vs "
                             f"{len(self.labels)} labels (must be equal and > 0)")


RowT = TypeVar("RowT")


class LazyEncoded(Sequence[TokenizedExample], Generic[RowT]):
    """Tokenize rows on first use: a short run touches a fraction of a large train split."""

    def __init__(self, rows: Sequence[RowT], encode: Callable[[RowT], TokenizedExample]) -> None:
        self._rows, self._encode = rows, encode
        self._cache: dict[int, TokenizedExample] = {}

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def rows(self) -> Sequence[RowT]:
        """The raw rows, in example order (e.g. to estimate lengths without tokenizing)."""
        return self._rows

    @overload
    def __getitem__(self, index: int) -> TokenizedExample: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[TokenizedExample]: ...

    def __getitem__(self, index: int | slice) -> TokenizedExample | Sequence[TokenizedExample]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index not in self._cache:
            self._cache[index] = self._encode(self._rows[index])
        return self._cache[index]


def task_counts(batch_size: int, search_fraction: float) -> dict[str, int]:
    """Examples per task in one step: both tasks get at least one."""
    if batch_size < 2:
        raise ValueError(f"train.batch_size must be >= 2 so both tasks fit, got {batch_size}")
    if not 0 < search_fraction < 1:
        raise ValueError(f"train.search_fraction must be in (0, 1), got {search_fraction}")
    n_search = min(max(round(batch_size * search_fraction), 1), batch_size - 1)
    return {"search": n_search, "rec": batch_size - n_search}


def collate_left_padded(examples: Sequence[TokenizedExample], pad_token_id: int,
                        example_weights: Sequence[float] | None = None) -> TaskBatch:
    """Left padding, so every prompt's last token sits at the same position (as in scoring);
    ``example_weights``: one fixed loss weight per example (FLOW), else none."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[row, width - n:] = torch.tensor(e.input_ids, dtype=torch.long)
        labels[row, width - n:] = torch.tensor(e.labels, dtype=torch.long)
        attention_mask[row, width - n:] = 1
    weights = None if example_weights is None else torch.tensor(list(example_weights), dtype=torch.float32)
    return TaskBatch(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                     example_weights=weights)


def _split_evenly(items: Sequence[Any], parts: int) -> list[Sequence[Any]]:
    bounds = np.linspace(0, len(items), min(parts, len(items)) + 1).round().astype(int)
    return [items[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


class MixedTaskBatcher:
    """Deterministic per-step batches for one rank; ``batches_at(step)`` for any step, any order."""

    def __init__(self, examples: Mapping[str, Sequence[TokenizedExample]], *, batch_size: int,
                 search_fraction: float, grad_accum: int, seed: int, pad_token_id: int,
                 rank: int = 0, world_size: int = 1, lengths: Mapping[str, Sequence[int]] | None = None,
                 bucket_steps: int = 1,
                 collate: Callable[[Sequence[Any], int], Any] = collate_left_padded) -> None:
        missing = [t for t in TASKS if len(examples.get(t, ())) == 0]
        if missing:
            raise ValueError(f"no train examples for task(s) {missing}: every step needs both "
                             "tasks; check the train shards")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if grad_accum < 1:
            raise ValueError(f"train.grad_accum must be >= 1, got {grad_accum}")
        self.examples = {t: examples[t] for t in TASKS}
        self.per_rank = task_counts(batch_size, search_fraction)
        self.grad_accum, self.seed, self.pad_token_id = grad_accum, seed, pad_token_id
        self.collate = collate  # examples -> one micro-batch (DPMoE's dual views have their own)
        self.rank, self.world_size = rank, world_size
        if bucket_steps < 1:
            raise ValueError(f"train.length_bucket_steps must be >= 1, got {bucket_steps}")
        self.bucket_steps = bucket_steps
        self.lengths: dict[str, np.ndarray] | None = None
        if lengths is not None and bucket_steps > 1:
            self.lengths = {t: np.asarray(lengths[t], dtype=np.int64) for t in TASKS}
            wrong = [t for t in TASKS if len(self.lengths[t]) != len(self.examples[t])]
            if wrong:
                raise ValueError(f"lengths for task(s) {wrong} do not match their example counts")
        self._perms: dict[tuple[str, int], np.ndarray] = {}
        #: per task, a fixed loss weight per example (FLOW, gems.flow_pass); None = unweighted
        self.example_weights: dict[str, np.ndarray] | None = None

    def set_example_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        """Give every example of every task a fixed loss weight (carried by the batches from now on)."""
        if self.collate is not collate_left_padded:
            raise ValueError("example weights need the default collate (TaskBatch carries them)")
        checked = {}
        for task in TASKS:
            w = np.asarray(weights[task], dtype=np.float64)
            if w.shape != (len(self.examples[task]),) or not np.isfinite(w).all() or (w < 0).any():
                raise ValueError(f"example weights for {task} must be {len(self.examples[task])} finite "
                                 f"values >= 0, got shape {w.shape}")
            checked[task] = w
        self.example_weights = checked

    def _permutation(self, task: str, epoch: int) -> np.ndarray:
        key = (task, epoch)
        if key not in self._perms:
            seq = np.random.SeedSequence([self.seed, TASKS.index(task), epoch])
            rng = np.random.default_rng(seq)
            perm = rng.permutation(len(self.examples[task]))
            self._perms[key] = perm if self.lengths is None else self._bucketed(task, epoch, perm, rng)
            # Only the current and next epoch are ever needed; keep memory flat on long runs.
            for old in [k for k in self._perms if k[0] == task and k[1] < epoch - 1]:
                del self._perms[old]
        return self._perms[key]

    def _bucketed(self, task: str, epoch: int, perm: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The epoch's order grouped by length: each window of ``bucket_steps`` batches is sorted by
        prompt length and cut into batches (one rank's share of a step), whose order is then
        shuffled so lengths do not rise step after step. Batches are aligned with the endless
        stream's slices (an epoch may start mid-batch), and nothing depends on the world size, so
        2 ranks at step s still see what 1 rank sees at steps 2s and 2s+1. A pure function of
        (seed, task, epoch)."""
        assert self.lengths is not None
        group = self.per_rank[task]
        lead = (-epoch * len(perm)) % group  # examples that complete the batch begun last epoch
        out = [perm[:lead]]
        rest = perm[lead:]
        window = group * self.bucket_steps
        for start in range(0, len(rest), window):
            chunk = rest[start:start + window]
            chunk = chunk[np.argsort(self.lengths[task][chunk], kind="stable")]
            full = [chunk[i:i + group] for i in range(0, len(chunk) - group + 1, group)]
            out.extend(full[i] for i in rng.permutation(len(full)))
            out.append(chunk[len(full) * group:])  # a partial batch stays last
        return np.concatenate(out)

    def _stream_indices(self, task: str, start: int, count: int) -> list[int]:
        n = len(self.examples[task])
        return [int(self._permutation(task, i // n)[i % n]) for i in range(start, start + count)]

    def indices_at(self, step: int) -> dict[str, list[int]]:
        """Example indices (per task) this rank trains on at ``step`` (0-based)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        out = {}
        for task, n in self.per_rank.items():
            start = (step * self.world_size + self.rank) * n
            out[task] = self._stream_indices(task, start, n)
        return out

    def batches_at(self, step: int) -> dict[str, list[TaskBatch]]:
        """Per task: up to ``grad_accum`` left-padded micro-batches (fewer if the task has fewer
        examples than micro-batches); the same structure on every rank."""
        out = {}
        for task, idx in self.indices_at(step).items():
            chosen = [self.examples[task][i] for i in idx]
            parts = _split_evenly(chosen, self.grad_accum)
            if self.example_weights is None:
                out[task] = [self.collate(part, self.pad_token_id) for part in parts]
                continue
            weights = _split_evenly([float(self.example_weights[task][i]) for i in idx], self.grad_accum)
            out[task] = [collate_left_padded(part, self.pad_token_id, w)
                         for part, w in zip(parts, weights, strict=True)]
        return out

    def position(self, step: int) -> dict[str, Any]:
        """Data position after ``step`` completed steps, for the checkpoint (JSON-able)."""
        pos: dict[str, Any] = {"step": step, "seed": self.seed, "world_size": self.world_size}
        for task, n in self.per_rank.items():
            consumed = step * self.world_size * n
            size = len(self.examples[task])
            pos[task] = {"epoch": consumed // size, "offset": consumed % size, "num_examples": size}
        return pos

    def resume_step(self, position: Mapping[str, Any]) -> int:
        """The step to continue from; refuses a position taken over different data or layout."""
        step = int(position["step"])
        expected = self.position(step)
        if dict(position) != expected:
            raise ValueError(f"checkpoint data position {dict(position)} does not match this run "
                             f"({expected}): train data, seed, batch layout or worker count "
                             "changed, so exact resumption is impossible")
        return step
