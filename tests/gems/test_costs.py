"""Cost figures the study reports per method: optimizer state and peak RSS."""

from __future__ import annotations

import torch
from torch import nn

from gems.costs import optimizer_state_mb, peak_rss_gb, tensor_bytes


def test_tensor_bytes_counts_each_reachable_tensor_once() -> None:
    a, b = torch.zeros(10), torch.zeros(4, dtype=torch.float64)

    class Holder:
        def __init__(self) -> None:
            self.inner = [a, {"b": b}]

    assert tensor_bytes({"x": a, "y": [a, (b,)], "z": Holder(), "n": 3}) == 10 * 4 + 4 * 8


def test_adamw_state_is_two_moments_per_parameter() -> None:
    layer = nn.Linear(64, 32)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-3)
    assert optimizer_state_mb(opt) == 0  # no state before the first step
    layer(torch.randn(3, 64)).sum().backward()
    opt.step()
    params = sum(p.numel() for p in layer.parameters())
    moments = 2 * params * 4 / 2**20
    assert moments <= optimizer_state_mb(opt) <= moments + 2 * 8 / 2**20  # + one step counter each


def test_peak_rss_grows_with_a_large_allocation() -> None:
    before = peak_rss_gb()
    block = torch.ones(256 * 2**20 // 4)  # 256 MiB, touched
    assert block.sum() > 0
    assert peak_rss_gb() >= max(before, 0.25)
