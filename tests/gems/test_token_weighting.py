"""TALR and FLOW: the formulas on hand-computed batches, detached weights, and `none` == the plain loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from optim_helpers import mixed_batches

from gems.batching import MixedTaskBatcher, TokenizedExample
from gems.config import GEMSConfig
from gems.flow_pass import base_losses, flow_example_weights, scheduled_indices
from gems.model import add_item_tokens
from gems.step import TaskBatch, example_losses, task_ce_sum
from gems.target_loss import TargetLoss
from gems.token_weighting import MIN_TAU, TokenWeighting, dynamic_tau, flow_weights, talr_weights

torch.set_num_threads(1)


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Five target positions over three sequences (0: two targets, 1: one, 2: two), vocab 4."""
    logits = torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 3.0],
                           [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 4.0, 0.0]], requires_grad=True)
    targets = torch.tensor([0, 2, 3, 1, 2])
    sequence = torch.tensor([0, 0, 1, 2, 2])
    return logits, targets, sequence


def _hand_nll(logits: torch.Tensor, targets: torch.Tensor) -> list[float]:
    out = []
    for row, t in zip(logits.tolist(), targets.tolist(), strict=True):
        out.append(math.log(sum(math.exp(v) for v in row)) - row[t])
    return out


def test_none_is_the_plain_loss_exactly() -> None:
    logits, targets, sequence = _batch()
    targets = torch.cat([targets, torch.tensor([-100])])
    logits = torch.cat([logits, torch.zeros(1, 4)])
    plain = F.cross_entropy(logits[:-1].float(), targets[:-1], reduction="none").sum()
    loss = TargetLoss("vocab", weighting=TokenWeighting("none"))
    assert torch.equal(loss.ce_sum(logits, targets, sequence=torch.cat([sequence, torch.tensor([3])])), plain)
    assert torch.equal(TargetLoss("vocab").ce_sum(logits, targets), plain)


def test_talr_dynamic_tau_self_norm_matches_the_formula() -> None:
    logits, targets, sequence = _batch()
    nll = _hand_nll(logits.detach(), targets)
    seq_means = [(nll[0] + nll[1]) / 2, nll[2], (nll[3] + nll[4]) / 2]
    tau = sorted(seq_means)[1]  # median of three sequences
    w = [math.exp(-v) ** (1 / tau) for v in nll]
    expected = sum(wi * li for wi, li in zip(w, nll, strict=True)) / sum(w) * len(w)
    loss = TargetLoss("vocab", weighting=TokenWeighting("talr"))
    got = loss.ce_sum(logits, targets, sequence=sequence)
    assert float(got.detach()) == pytest.approx(expected, rel=1e-5)
    assert dynamic_tau(torch.tensor(nll), sequence, torch.ones(5)) == pytest.approx(tau, rel=1e-6)


def test_talr_fixed_tau_mean_norm_floors_and_keeps_history_shares() -> None:
    logits, targets, sequence = _batch()
    nll = _hand_nll(logits.detach(), targets)
    base = torch.tensor([0.5, 1.0, 1.0, 0.25, 1.0])  # history shares
    tau = 0.2
    w = [max(max(math.exp(-v), 1e-6) ** (1 / tau), 0.01) for v in nll]
    expected = sum(b * wi * li for b, wi, li in zip(base.tolist(), w, nll, strict=True))
    loss = TargetLoss("vocab", weighting=TokenWeighting("talr", tau=tau, norm="mean"))
    assert float(loss.ce_sum(logits, targets, base, sequence=sequence)) == pytest.approx(expected, rel=1e-5)
    assert min(w) == 0.01  # the floor is reached on this batch: the test exercises it


def test_talr_weights_carry_no_gradient() -> None:
    logits, targets, sequence = _batch()
    loss = TargetLoss("vocab", weighting=TokenWeighting("talr"))
    loss.ce_sum(logits, targets, sequence=sequence).backward()
    got = logits.grad.clone()
    # the same loss with the weights frozen as constants: gradient = sum w * dCE
    ref_logits = logits.detach().clone().requires_grad_(True)
    ce = F.cross_entropy(ref_logits, targets, reduction="none")
    w = talr_weights(ce, sequence, torch.ones(5), TokenWeighting("talr")).detach()
    (ce * w).sum().backward()
    assert torch.allclose(got, ref_logits.grad, atol=1e-6)
    assert not torch.allclose(w, torch.ones(5))  # the weights are not trivially 1


def test_talr_on_the_catalog_softmax() -> None:
    """Under the catalog loss p is the item softmax's probability, not the vocabulary's."""
    logits, targets, sequence = _batch()
    items = torch.tensor([0, 2, 3, 1])  # catalog order differs from token order
    restricted = logits.detach()[:, items]
    index = torch.tensor([0, 1, 2, 3, 1])  # column of each target token in the catalog order
    nll = F.cross_entropy(restricted, index, reduction="none")
    w = talr_weights(nll, sequence, torch.ones(5), TokenWeighting("talr", tau=0.5))
    loss = TargetLoss("catalog", items, weighting=TokenWeighting("talr", tau=0.5))
    expected = float((w * nll).sum())
    assert float(loss.ce_sum(logits, targets, sequence=sequence)) == pytest.approx(expected, rel=1e-5)


def test_dynamic_tau_never_reaches_zero() -> None:
    assert dynamic_tau(torch.zeros(3), torch.arange(3), torch.ones(3)) == MIN_TAU


def test_flow_weights_formula_mean_one_and_unseen() -> None:
    losses = np.array([1.0, 2.0, np.nan, 4.0])
    weights, tau = flow_weights(losses)
    assert tau == 2.0  # median of the seen losses
    raw = np.exp(-np.array([1.0, 2.0, 4.0]) / 2.0)
    assert np.allclose(weights[[0, 1, 3]], raw / raw.mean())
    assert weights[2] == 1.0 and weights[[0, 1, 3]].mean() == pytest.approx(1.0)
    fixed, used = flow_weights(losses, tau=1.0)
    assert used == 1.0 and fixed[0] / fixed[3] == pytest.approx(math.exp(3.0))
    with pytest.raises(ValueError, match="at least one"):
        flow_weights(np.array([np.nan]))


@pytest.mark.parametrize("bad", [{"mode": "focal"}, {"mode": "talr", "tau": 0.0},
                                 {"mode": "talr", "norm": "sum"}, {"mode": "talr", "tau": float("inf")}])
def test_bad_settings_are_named(bad: dict) -> None:
    with pytest.raises(ValueError, match="token_weighting|weighting_tau|weighting_norm"):
        TokenWeighting(**bad)


def _item_batches(tok_len: int, item_ids: list[int], seed: int) -> dict[str, list[TaskBatch]]:
    batches = mixed_batches(tok_len, seed=seed)
    for task_batches in batches.values():
        for b in task_batches:
            b.labels[:, -1] = torch.tensor(item_ids)[torch.arange(len(b.labels)) % len(item_ids)]
            b.input_ids[:, -1] = b.labels[:, -1]
    return batches


def test_example_weights_scale_each_row(tiny_model_and_tokenizer, tiny_items) -> None:
    model, tok = tiny_model_and_tokenizer
    item_ids = add_item_tokens(model, tok, tiny_items)
    batch = _item_batches(len(tok), item_ids, seed=3)["search"][0]
    loss = TargetLoss.build("catalog", item_ids)
    per_row = example_losses(model, batch, None, loss)
    weights = torch.tensor([0.5, 2.0, 0.0, 1.5])
    weighted = TaskBatch(batch.input_ids, batch.attention_mask, batch.labels, example_weights=weights)
    with torch.no_grad():
        expected = float((per_row * weights).sum())
        assert float(task_ce_sum(model, weighted, None, loss)) == pytest.approx(expected, rel=1e-5)
        assert float(task_ce_sum(model, batch, None, loss)) == pytest.approx(float(per_row.sum()), rel=1e-5)
    with pytest.raises(ValueError, match="example_weights"):
        TaskBatch(batch.input_ids, batch.attention_mask, batch.labels, example_weights=torch.ones(3))


@pytest.mark.parametrize("loss_mode", ["catalog", "vocab"])
@pytest.mark.parametrize("method", ["gems", "adamw", pytest.param("lora", marks=pytest.mark.slow), "galore"])
def test_every_method_trains_with_talr_and_flow(tiny_model_and_tokenizer, tiny_items, method: str,
                                                loss_mode: str) -> None:
    from gems.methods import build_method

    model, tok = tiny_model_and_tokenizer
    item_ids = add_item_tokens(model, tok, tiny_items)
    batches = _item_batches(len(tok), item_ids, seed=5)
    flow = {t: [TaskBatch(b.input_ids, b.attention_mask, b.labels,
                          example_weights=torch.linspace(0.5, 1.5, b.input_ids.shape[0])) for b in bs]
            for t, bs in batches.items()}
    cfg = GEMSConfig(method=method, r_shared=4, t_svd=3, k=0, lora_r=4, lora_alpha=8)
    lm = build_method(model, cfg, lr=1e-2, bases=None, item_token_ids=item_ids, loss=loss_mode,
                      weighting=TokenWeighting("talr"))
    plain = TargetLoss.build(loss_mode, item_ids)
    with torch.no_grad():
        start = sum(float(task_ce_sum(lm.model, b, None, plain)) for bs in batches.values() for b in bs)
    for step in range(6):
        stats = lm.train_step(batches if step % 2 else flow, max_grad_norm=1.0, measure_conflict=False)
        assert all(math.isfinite(v) for v in stats.loss.values())
    with torch.no_grad():
        end = sum(float(task_ce_sum(lm.model, b, None, plain)) for bs in batches.values() for b in bs)
    assert end < start, f"{method}/{loss_mode}: {start:.3f} -> {end:.3f}"


def _examples(n: int, item_ids: list[int], seed: int) -> list[TokenizedExample]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        ids = [int(v) for v in rng.integers(5, 40, size=int(rng.integers(4, 9)))]
        target = item_ids[i % len(item_ids)]
        out.append(TokenizedExample(ids + [target], [-100] * len(ids) + [target]))
    return out


def test_flow_pass_scores_exactly_the_scheduled_examples(tiny_model_and_tokenizer, tiny_items) -> None:
    model, tok = tiny_model_and_tokenizer
    item_ids = add_item_tokens(model, tok, tiny_items)
    examples = {"search": _examples(30, item_ids, 1), "rec": _examples(25, item_ids, 2)}
    batcher = MixedTaskBatcher(examples, batch_size=6, search_fraction=0.5, grad_accum=1, seed=0,
                               pad_token_id=int(tok.pad_token_id))
    loss = TargetLoss.build("catalog", item_ids)
    losses = base_losses(model, batcher, steps=4, loss=loss, batch_size=5)
    used = scheduled_indices(batcher, 4)
    for task in ("search", "rec"):
        assert len(used[task]) == 12  # 4 steps x 3 examples, no epoch wrap yet
        scored = np.flatnonzero(np.isfinite(losses[task]))
        assert scored.tolist() == used[task].tolist()
        one = example_losses(model, batcher.batches_at(0)[task][0], None, loss)
        assert np.allclose(losses[task][batcher.indices_at(0)[task]], one.numpy(), rtol=1e-4)
    weights, taus = flow_example_weights(losses)
    batcher.set_example_weights(weights)
    step0 = batcher.batches_at(0)["rec"][0]
    assert np.allclose(step0.example_weights.numpy(), weights["rec"][batcher.indices_at(0)["rec"]])
    assert taus["rec"] == pytest.approx(float(np.nanmedian(losses["rec"])))
    with pytest.raises(ValueError, match="example weights for search"):
        batcher.set_example_weights({"search": np.ones(3), "rec": weights["rec"]})
