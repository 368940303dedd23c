"""Speed probes: they measure without touching the model or leaving gradients behind."""

from __future__ import annotations

import math

import torch
from optim_helpers import mixed_batches, snapshot

from gems.speed_probe import forward_probe_seconds, machine_probe


def test_forward_probe_times_a_forward_and_leaves_the_model_as_it_was(tiny_model_and_tokenizer) -> None:
    model, tok = tiny_model_and_tokenizer
    model.train()
    before = snapshot(model)
    batch = mixed_batches(len(tok))["search"][0]
    for dtype in (None, torch.bfloat16):
        seconds = forward_probe_seconds(model, batch, dtype)
        assert math.isfinite(seconds) and seconds > 0
    assert all(p.grad is None for p in model.parameters())
    assert model.training
    after = snapshot(model)
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_machine_probe_reports_both_precisions_in_milliseconds() -> None:
    probe = machine_probe(torch.device("cpu"))
    assert set(probe) == {"machine/matmul_fp32_ms", "machine/matmul_bf16_ms"}
    assert all(math.isfinite(v) and 0 < v < 60_000 for v in probe.values())
