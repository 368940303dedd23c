"""Mixed-precision choice: bf16 autocast over fp32 master weights, only where it actually pays.

bf16 autocast halves a step's time on GPUs and on CPUs with bf16 matrix units, but it is *slower*
than fp32 on CPUs that emulate bf16. Rather than guess from CPU flags, ``precision: auto`` times a
few matmuls of a realistic size both ways at start-up and keeps bf16 only when it wins; the choice
and the timings are recorded so a run's speed can be explained later. Weights and optimizer math
stay fp32 in every mode: autocast only lowers the precision of the matmuls inside the forward pass.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Literal

import torch

PrecisionSetting = Literal["auto", "bf16", "fp32"]

# A SmolLM2-135M MLP projection over a 256-token micro-batch: large enough that the matrix units
# (not Python overhead) dominate, small enough that the probe costs well under a second.
PROBE_TOKENS, PROBE_IN, PROBE_OUT = 256, 576, 1536
PROBE_REPEATS = 5
# bf16 must beat fp32 by this factor: a tie is not worth the rounding error.
MIN_SPEEDUP = 1.1


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 autocast runs on ``device`` at all (speed is the probe's question)."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    # CPU autocast supports bf16 everywhere; without AMX/AVX512-BF16 it is merely slow.
    return device.type == "cpu"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Milliseconds of one call of ``fn``, synchronised on GPUs."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - start) * 1000.0


def probe_matmul_ms(device: torch.device, repeats: int = PROBE_REPEATS,
                    shape: tuple[int, int, int] = (PROBE_TOKENS, PROBE_IN, PROBE_OUT)
                    ) -> dict[str, float]:
    """Best-of-``repeats`` ms of a forward+backward linear layer in fp32 and under bf16 autocast.

    The two variants run interleaved and the minimum is kept: on a shared machine other load
    only ever adds time, so the minimum is the fairest estimate of what the hardware can do.
    """
    gen = torch.Generator(device="cpu").manual_seed(0)
    tokens, n_in, n_out = shape
    x = torch.randn(tokens, n_in, generator=gen).to(device)
    w = torch.randn(n_out, n_in, generator=gen).to(device).requires_grad_(True)

    def step(dtype: torch.dtype | None) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                y = torch.nn.functional.linear(x, w)
            (grad,) = torch.autograd.grad(y.float().sum(), w)
            return grad
        return run

    fp32, bf16 = step(None), step(torch.bfloat16)
    fp32(), bf16()  # warm-up: kernel selection, oneDNN primitive caches, CUDA context
    times: dict[str, list[float]] = {"fp32_ms": [], "bf16_ms": []}
    for _ in range(repeats):
        times["fp32_ms"].append(time_ms(fp32, device))
        times["bf16_ms"].append(time_ms(bf16, device))
    return {key: min(values) for key, values in times.items()}


def resolve_precision(setting: PrecisionSetting, device: torch.device | str
                      ) -> tuple[torch.dtype | None, dict[str, Any]]:
    """(autocast dtype or None for plain fp32, a record of the choice for the run's metadata)."""
    device = torch.device(device)
    if setting not in ("auto", "bf16", "fp32"):
        raise ValueError(f"train.precision: {setting!r} is not one of auto, bf16, fp32")
    record: dict[str, Any] = {"precision_setting": setting, "precision_device": device.type}
    if setting == "fp32":
        return None, {**record, "precision": "fp32", "precision_reason": "configured"}
    supported = bf16_supported(device)
    if setting == "bf16":
        if not supported:
            raise ValueError(f"train.precision: bf16 was requested but device {device} has no "
                             "bf16 support; use precision: auto or fp32")
        return torch.bfloat16, {**record, "precision": "bf16", "precision_reason": "configured"}
    if not supported:
        return None, {**record, "precision": "fp32", "precision_reason": "bf16 unsupported"}
    timings = probe_matmul_ms(device)
    speedup = timings["fp32_ms"] / max(timings["bf16_ms"], 1e-9)
    record.update(timings, precision_probe_speedup=speedup)
    if speedup >= MIN_SPEEDUP:
        return torch.bfloat16, {**record, "precision": "bf16",
                                "precision_reason": f"probe: bf16 {speedup:.2f}x faster"}
    return None, {**record, "precision": "fp32",
                  "precision_reason": f"probe: bf16 only {speedup:.2f}x fp32 speed"}
