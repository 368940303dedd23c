"""The training step and GEMSAdamW on tiny-llama: mixed gradient, complementarity, resume, edge cases."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import pytest
import torch
from optim_helpers import mixed_batches, snapshot, step_optimizer, task_batch
from pydantic import ValidationError

from gems.config import Config, ConfigError, GEMSConfig, validate_config
from gems.model import load_backbone
from gems.nullspace import bases_for_run
from gems.optim import GEMSAdamW, target_parameter_names
from gems.step import TaskBatch

torch.set_num_threads(1)


def _mixed_gradient(model, batches: dict[str, list[TaskBatch]]) -> dict[str, torch.Tensor]:
    """One forward/backward over the concatenated batch with HF's own token-mean loss."""
    model = copy.deepcopy(model)
    model.zero_grad(set_to_none=True)
    parts = [b for task in ("search", "rec") for b in batches.get(task, [])]
    ids = torch.cat([b.input_ids for b in parts])
    mask = torch.cat([b.attention_mask for b in parts])
    labels = torch.cat([b.labels for b in parts])
    out = model(input_ids=ids, attention_mask=mask, labels=labels,
                position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=False)
    out.loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("micro", [1, 2], ids=["one-pass", "accumulated"])
def test_shared_gradient_equals_mixed_batch_gradient(tiny_model_and_tokenizer, micro: int) -> None:
    model, tok = tiny_model_and_tokenizer
    batches = mixed_batches(len(tok), seed=5, rows=(4, 2))
    batches["search"][0] = task_batch(4, 12, len(tok), 5, pad_left=2)  # left padding too
    expected = _mixed_gradient(model, batches)
    if micro == 2:  # the search sub-batch as two micro-batches
        b = batches["search"][0]
        batches["search"] = [TaskBatch(b.input_ids[i:i + 2], b.attention_mask[i:i + 2], b.labels[i:i + 2])
                             for i in (0, 2)]
    frozen = torch.optim.SGD(model.parameters(), lr=0.0)  # a step that leaves .grad = g_sh in place
    step_optimizer(model, frozen, batches, max_grad_norm=None, measure_conflict=False)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], atol=1e-5, rtol=1e-4, msg=name)


def test_gems_lean_step_leaves_the_mixed_gradient(tiny_model_and_tokenizer) -> None:
    """On a step without refresh GEMS keeps no copy: .grad of every parameter is exactly g_sh."""
    model, tok = tiny_model_and_tokenizer
    opt = GEMSAdamW.for_model(model, GEMSConfig(r_shared=4, t_svd=100, k=0), 1e-3)
    batches = mixed_batches(len(tok), seed=7)
    step_optimizer(model, opt, batches, None, measure_conflict=False)  # step 0 refreshes
    expected = _mixed_gradient(model, batches)
    stats = step_optimizer(model, opt, batches, None, measure_conflict=False)
    assert not stats.svd_refresh and stats.conflict_before is None
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], atol=1e-5, rtol=1e-4, msg=name)


def test_task_subspaces_are_complementary(tiny_model_and_tokenizer) -> None:
    model, tok = tiny_model_and_tokenizer
    for complementary in (True, False):
        m = copy.deepcopy(model)
        opt = GEMSAdamW.for_model(m, GEMSConfig(r_shared=4, t_svd=2, k=0, complementary=complementary), 1e-3)
        for step in range(5):
            step_optimizer(m, opt, mixed_batches(len(tok), seed=step), 1.0)
        overlaps = []
        for p in opt._layers:
            st = opt.state[p]
            for task in ("search", "rec"):
                overlaps.append(float(torch.linalg.matrix_norm(st["q_shared"].T @ st[f"q_{task}"])))
                eye = torch.eye(st[f"q_{task}"].shape[1])
                torch.testing.assert_close(st[f"q_{task}"].T @ st[f"q_{task}"], eye, atol=1e-5, rtol=0)
        if complementary:
            assert max(overlaps) < 1e-5
        else:
            assert max(overlaps) > 1e-2  # the test can tell the difference


def test_batch_missing_a_task_gets_zero_gate_and_untouched_moments(tiny_model_and_tokenizer) -> None:
    model, tok = tiny_model_and_tokenizer
    opt = GEMSAdamW.for_model(model, GEMSConfig(r_shared=4, t_svd=3, k=0), 1e-3)
    before = snapshot(model)
    stats = step_optimizer(model, opt, {"search": mixed_batches(len(tok))["search"], "rec": []}, 1.0)
    assert stats.gate == {"search": 1.0, "rec": 0.0}
    assert set(stats.loss) == {"search"} and stats.conflict_before is None
    for p in opt._layers:
        assert int(opt.state[p]["t_rec"]) == 0 and bool(opt.state[p]["due_rec"])  # refresh waits for rec
        assert int(opt.state[p]["t_search"]) == 1
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
    step_optimizer(model, opt, mixed_batches(len(tok)), 1.0)  # rec arrives: its basis is computed now
    assert all(not bool(opt.state[p]["due_rec"]) for p in opt._layers)


def test_bf16_autocast_and_clipping(tiny_model_and_tokenizer) -> None:
    model, tok = tiny_model_and_tokenizer
    opt = GEMSAdamW.for_model(model, GEMSConfig(r_shared=4, t_svd=3, k=0), 1e-3)
    stats = step_optimizer(model, opt, mixed_batches(len(tok)), max_grad_norm=1e-3,
                           autocast_dtype=torch.bfloat16)
    assert stats.grad_norm > 1e-3 and opt.last_report.clip_coef < 1
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(torch.isfinite(torch.tensor(v)) for v in stats.as_metrics().values())


def _run(model, opt, steps: range, tok) -> None:
    for step in steps:
        step_optimizer(model, opt, mixed_batches(len(tok), seed=step), 1.0, measure_conflict=step % 3 == 0)


def test_resume_continues_exactly(tiny_cfg, tmp_path: Path) -> None:
    """10 steps, save, fresh model + optimizer, load, 10 more == 20 uninterrupted (1e-6)."""
    cfg = GEMSConfig(r_shared=4, t_svd=4, k=8, moment_transfer="rotate", weight_decay=0.01,
                     general_max_tokens=512)
    model, tok = load_backbone(tiny_cfg.model, tmp_path / "models")
    bases = bases_for_run(model, tok, cfg, tmp_path)
    reference = copy.deepcopy(model)
    ref_opt = GEMSAdamW.for_model(reference, cfg, 1e-3, bases)
    _run(reference, ref_opt, range(20), tok)

    opt = GEMSAdamW.for_model(model, cfg, 1e-3, bases)
    _run(model, opt, range(10), tok)
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, tmp_path / "ckpt.pt")
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)  # tensors only: no pickled objects
    fresh, _ = load_backbone(tiny_cfg.model, tmp_path / "models")
    fresh.load_state_dict(saved["model"])
    fresh_opt = GEMSAdamW.for_model(fresh, cfg, 1e-3, bases)
    fresh_opt.load_state_dict(saved["optim"])
    _run(fresh, fresh_opt, range(10, 20), tok)
    for (name, a), b in zip(reference.named_parameters(), fresh.parameters(), strict=True):
        assert (a - b).abs().max() < 1e-6, name


def test_invalid_hyperparameters_name_the_field() -> None:
    for field, value in [("r_shared", 0), ("r_search", 0), ("r_rec", -1), ("t_svd", 0), ("tau", 0),
                         ("alpha", 0), ("k", -1), ("energy", 1.5)]:
        with pytest.raises(ValidationError, match=field):
            GEMSConfig(**{field: value})
        with pytest.raises(ConfigError, match=f"gems.{field}"):
            validate_config(Config, {"model": {"name_or_path": "tiny-llama"}, "gems": {field: value}})


def test_k_beyond_the_layer_and_rank_clamping(tiny_model_and_tokenizer, caplog) -> None:
    model, _ = tiny_model_and_tokenizer
    names = target_parameter_names(model, GEMSConfig().target_modules)
    bad = {n: torch.linalg.qr(torch.randn(p.shape[1], p.shape[1])).Q for n, p in model.named_parameters()
           if n in names}
    bad["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(64, 65)
    with pytest.raises(ValueError, match="gems.k=65 exceeds the input dimension 64"):
        GEMSAdamW.for_model(model, GEMSConfig(k=65), 1e-3, bad)
    with pytest.raises(ValueError, match="gems.k"):
        GEMSAdamW.for_model(model, GEMSConfig(k=8), 1e-3, None)  # k > 0 without bases
    with caplog.at_level(logging.WARNING, logger="gems.subspace"):
        opt = GEMSAdamW.for_model(model, GEMSConfig(r_shared=100, k=0), 1e-3)
    assert "gems.r_shared=100" in caplog.text and "clamped to 32" in caplog.text
    k_proj = dict(model.named_parameters())["model.layers.0.self_attn.k_proj.weight"]  # 32 x 64
    assert opt._layers[k_proj].ranks == {"shared": 32}  # no room left for task subspaces
    with pytest.raises(ValueError, match="gems.target_modules"):
        GEMSAdamW.for_model(model, GEMSConfig(target_modules=["nothing_like_this"], k=0), 1e-3)


def test_single_subspace_ablation_and_fixed_gate(tiny_model_and_tokenizer) -> None:
    model, tok = tiny_model_and_tokenizer
    opt = GEMSAdamW.for_model(model, GEMSConfig(r_shared=4, k=0, task_subspaces=False, fixed_gate=0.25), 1e-3)
    stats = step_optimizer(model, opt, mixed_batches(len(tok)), 1.0)
    assert stats.gate == {"search": 0.25, "rec": 0.75}
    assert all(set(layer.ranks) == {"shared"} for layer in opt._layers.values())
    assert stats.conflict_before is not None and stats.conflict_after is None  # no task updates


def test_lean_capture_keeps_no_gradient_copy(tiny_model_and_tokenizer) -> None:
    """Off refresh/conflict steps the first task's gradient stays in .grad (accumulated on), not copied."""
    from gems.step import task_ce_sum

    model, tok = tiny_model_and_tokenizer
    opt = GEMSAdamW.for_model(model, GEMSConfig(r_shared=4, t_svd=100, k=0), 1e-3)
    batches = mixed_batches(len(tok))
    step_optimizer(model, opt, batches, None)  # step 0: refresh
    assert not opt.refresh_due()
    opt.zero_grad()
    (task_ce_sum(model, batches["search"][0]) / 7).backward()
    q = dict(model.named_parameters())["model.layers.0.self_attn.q_proj.weight"]
    before = q.grad.data_ptr()
    opt.capture_task_grad("search", keep_full=False)
    assert q.grad is not None and q.grad.data_ptr() == before and not opt._pending.stash
    opt.zero_grad()
    (task_ce_sum(model, batches["search"][0]) / 7).backward()
    opt.capture_task_grad("search", keep_full=True)  # conflict steps set the gradient aside instead
    assert q.grad is None and q in opt._pending.stash


def test_requested_refresh_recomputes_the_bases_at_the_next_step(tiny_model_and_tokenizer) -> None:
    model, tok = tiny_model_and_tokenizer
    opt = GEMSAdamW.for_model(model, GEMSConfig(r_shared=4, t_svd=100, k=0), 1e-3)
    step_optimizer(model, opt, mixed_batches(len(tok)), None)  # step 0 refreshes
    step_optimizer(model, opt, mixed_batches(len(tok), seed=1), None)
    assert not opt.refresh_due() and not opt.last_report.refreshed
    q = dict(model.named_parameters())["model.layers.0.self_attn.q_proj.weight"]
    before = opt.state[q]["q_shared"].clone()
    opt.request_refresh()
    assert opt.refresh_due()
    step_optimizer(model, opt, mixed_batches(len(tok), seed=2), None)
    assert opt.last_report.refreshed and not opt.refresh_due()
    assert not torch.allclose(opt.state[q]["q_shared"], before)  # a new basis from the new gradient
