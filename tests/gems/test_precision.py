"""Precision choice: configured modes are honoured, auto picks bf16 only when the probe says it pays."""

import pytest
import torch

import gems.precision as precision
from gems.precision import MIN_SPEEDUP, resolve_precision


def test_fp32_means_no_autocast() -> None:
    dtype, record = resolve_precision("fp32", "cpu")
    assert dtype is None and record["precision"] == "fp32"


def test_bf16_forced_on_cpu_gives_bf16_matmuls_over_fp32_weights() -> None:
    dtype, record = resolve_precision("bf16", "cpu")
    assert dtype is torch.bfloat16 and record["precision"] == "bf16"
    layer = torch.nn.Linear(8, 4)
    with torch.autocast("cpu", dtype=dtype):
        out = layer(torch.randn(2, 8))
    assert out.dtype == torch.bfloat16 and layer.weight.dtype == torch.float32


def test_auto_choice_agrees_with_its_own_timings() -> None:
    dtype, record = resolve_precision("auto", "cpu")
    assert record["fp32_ms"] > 0 and record["bf16_ms"] > 0
    speedup = record["fp32_ms"] / record["bf16_ms"]
    assert (dtype is torch.bfloat16) == (speedup >= MIN_SPEEDUP), record
    assert record["precision"] == ("bf16" if dtype is torch.bfloat16 else "fp32")


@pytest.mark.parametrize(("fp32_ms", "bf16_ms", "expected"), [(10.0, 4.0, torch.bfloat16),
                                                                 (10.0, 10.0, None),
                                                                 (10.0, 30.0, None)])
def test_auto_rule(monkeypatch: pytest.MonkeyPatch, fp32_ms: float, bf16_ms: float,
                   expected: torch.dtype | None) -> None:
    monkeypatch.setattr(precision, "probe_matmul_ms",
                        lambda device: {"fp32_ms": fp32_ms, "bf16_ms": bf16_ms})
    dtype, record = resolve_precision("auto", "cpu")
    assert dtype is expected and "probe" in record["precision_reason"]


def test_unsupported_device_falls_back_or_fails_clearly() -> None:
    dtype, record = resolve_precision("auto", "meta")
    assert dtype is None and record["precision_reason"] == "bf16 unsupported"
    with pytest.raises(ValueError, match="bf16 was requested"):
        resolve_precision("bf16", "meta")
    with pytest.raises(ValueError, match="train.precision"):
        resolve_precision("fp16", "cpu")  # type: ignore[arg-type]
