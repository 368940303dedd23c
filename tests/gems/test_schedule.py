"""LR schedule: linear warm-up to the peak, cosine to zero at the last planned step, resumable."""

import math

import torch

from gems.schedule import build_lr_schedule, current_lr


def _lrs(warmup: int, steps: int, peak: float = 1.0) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    sched = build_lr_schedule(opt, warmup, steps)
    out = []
    for _ in range(steps + 1):
        out.append(current_lr(sched))
        opt.step()
        sched.step()
    return out


def test_warmup_then_cosine() -> None:
    lrs = _lrs(warmup=4, steps=12, peak=2.0)
    assert lrs[:5] == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:], strict=False))
    assert math.isclose(lrs[8], 1.0, abs_tol=1e-9)  # half-way through the decay
    assert lrs[12] == 0.0


def test_warmup_longer_than_run_is_clamped() -> None:
    lrs = _lrs(warmup=50, steps=5)
    assert max(lrs) == 1.0 and lrs == sorted(lrs)


def test_state_round_trip_continues_the_curve() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_lr_schedule(opt, 2, 10)
    for _ in range(5):
        opt.step()
        sched.step()
    saved = sched.state_dict()
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched2 = build_lr_schedule(opt2, 2, 10)
    opt2.load_state_dict(opt.state_dict())  # the optimizer's groups carry the current lr
    sched2.load_state_dict(saved)
    assert current_lr(sched2) == current_lr(sched) == opt2.param_groups[0]["lr"]
    opt.step(), sched.step(), opt2.step(), sched2.step()
    assert current_lr(sched2) == current_lr(sched) == opt2.param_groups[0]["lr"]
