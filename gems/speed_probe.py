"""Speed probes logged with every report, so a run's step time can be read against the machine.

A step that slows during a run has two readings: the machine slowed (other tenants, clocks) or the
process did (memory layout, caches, more work per step). Two probes tell them apart: a fixed
matmul (what the hardware does right now, from :func:`gems.precision.probe_matmul_ms`) and a
no-grad forward of one fixed micro-batch through the model being trained (the process's speed on
the model's own ops). A step that slows while both probes hold means the step itself does more.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from gems.precision import probe_matmul_ms, time_ms
from gems.scoring import accepts_logits_to_keep
from gems.step import TaskBatch

PROBE_REPEATS = 3
# Rows of the fixed micro-batch the forward probe runs: a whole 16-row batch costs ~0.7 s per
# forward on two cores, three of them every report would add ~3 % to a run.
PROBE_ROWS = 4


def machine_probe(device: torch.device) -> dict[str, float]:
    """Best-of-3 ms of a fixed fp32 and bf16 linear forward+backward (a few ms in all)."""
    return {f"machine/matmul_{key}": value
            for key, value in probe_matmul_ms(device, repeats=PROBE_REPEATS).items()}


def forward_probe_seconds(model: nn.Module, batch: TaskBatch, autocast_dtype: torch.dtype | None) -> float:
    """Best-of-3 seconds of a no-grad forward of ``batch``'s first rows (last position's logits only).

    ``model`` must be the unwrapped module: a DDP wrapper would synchronise ranks.
    """
    device = next(model.parameters()).device
    ids, mask = batch.input_ids[:PROBE_ROWS].to(device), batch.attention_mask[:PROBE_ROWS].to(device)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    autocast = (torch.autocast(device_type=device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    kwargs = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}
    def forward() -> object:
        return model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False, **kwargs)

    with torch.no_grad(), autocast:
        return min(time_ms(forward, device) for _ in range(PROBE_REPEATS)) / 1000.0
