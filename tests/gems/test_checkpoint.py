"""Checkpoints: a save/load round trip restores weights, optimizer, schedule, RNG and progress so the
next step is bit-identical; files holding anything but tensors are refused before they can run code."""

from __future__ import annotations

import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from gems.checkpoint import (
    OPTIMIZER_FILE,
    CheckpointError,
    TrainerState,
    load_training_checkpoint,
    read_trainer_state,
    save_training_checkpoint,
)
from gems.config import GEMSConfig, ModelConfig
from gems.methods import Method, build_method
from gems.model import add_item_tokens, load_backbone
from gems.schedule import build_lr_schedule
from gems.step import TaskBatch

ITEMS = [("a1", "red stapler"), ("b2", "laser printer toner"), ("c3", "blue pen")]
IGNORE = -100


def _setup(tmp_path: Path, tied: bool, method: str = "adamw"):
    cfg = ModelConfig(name_or_path="tiny-llama", tiny={"tie_word_embeddings": tied})
    model, tok = load_backbone(cfg, tmp_path / "cache")
    item_ids = add_item_tokens(model, tok, ITEMS)
    gems_cfg = GEMSConfig(method=method, k=0, r_shared=4, t_svd=2, lora_r=2)
    built = build_method(model, gems_cfg, 1e-2, None, item_token_ids=item_ids)
    return built, tok, build_lr_schedule(built.optimizer, 1, 10)


def _batch(vocab: int) -> TaskBatch:
    ids = torch.randint(0, vocab, (2, 6))  # draws from the torch RNG on purpose
    labels = torch.full_like(ids, IGNORE)
    labels[:, -1] = ids[:, -1]
    return TaskBatch(ids, torch.ones_like(ids), labels)


def _step(method: Method, sched) -> None:
    vocab = method.model.get_input_embeddings().weight.shape[0]
    method.train_step({"search": [_batch(vocab)], "rec": [_batch(vocab)]}, max_grad_norm=1.0)
    sched.step()


@pytest.mark.parametrize(("method", "tied"), [("gems", True), ("adamw", True), ("adamw", False),
                                              ("lora", True), ("lora", False), ("galore", True)])
def test_round_trip_continues_bit_identically(tmp_path: Path, method: str, tied: bool) -> None:
    torch.manual_seed(0)
    run, tok, sched = _setup(tmp_path, tied, method)
    for _ in range(3):  # past a basis refresh (t_svd=2) for gems and galore
        _step(run, sched)
    np.random.seed(5), random.seed(5)
    state = TrainerState(step=3, data_position={"step": 3}, extra={"history": [{"loss": 1.5}]})
    ckpt = save_training_checkpoint(tmp_path / "ckpt", model=run.model, tokenizer=tok,
                                    optimizer=run.optimizer, scheduler=sched, state=state)
    expected_draws = (np.random.rand(), random.random())
    for _ in range(2):  # the uninterrupted run's next steps (incl. a refresh)
        _step(run, sched)
    expected = {k: v.clone() for k, v in run.model.state_dict().items()}

    torch.manual_seed(123), np.random.seed(9), random.seed(9)  # a fresh process: other RNG states
    run2, _, sched2 = _setup(tmp_path, tied, method)
    restored = load_training_checkpoint(ckpt, model=run2.model, optimizer=run2.optimizer,
                                        scheduler=sched2)
    assert (restored.step, restored.data_position, restored.extra) == (3, {"step": 3}, state.extra)
    assert (np.random.rand(), random.random()) == expected_draws
    for _ in range(2):
        _step(run2, sched2)
    got = run2.model.state_dict()
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(got[name], value), name
    weights = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
    assert (ckpt / "model" / weights).is_file()
    assert "<item_b2>" in (ckpt / "model" / "tokenizer.json").read_text()


def test_checkpoint_from_another_catalog_is_refused(tmp_path: Path) -> None:
    run, tok, sched = _setup(tmp_path, tied=True)
    model, opt = run.model, run.optimizer
    ckpt = save_training_checkpoint(tmp_path / "ckpt", model=model, tokenizer=tok, optimizer=opt,
                                    scheduler=sched, state=TrainerState(0, {}))
    cfg = ModelConfig(name_or_path="tiny-llama")
    other, _ = load_backbone(cfg, tmp_path / "cache")  # no item tokens: a smaller vocabulary
    other_opt = torch.optim.AdamW(other.parameters())
    with pytest.raises(CheckpointError, match="different backbone or item catalog"):
        load_training_checkpoint(ckpt, model=other, optimizer=other_opt, scheduler=None)


class _RunsCode:
    def __reduce__(self):
        return (Path.touch, (Path(_RunsCode.marker),))


def test_pickle_that_would_run_code_is_refused(tmp_path: Path) -> None:
    run, tok, sched = _setup(tmp_path, tied=True)
    model, opt = run.model, run.optimizer
    ckpt = save_training_checkpoint(tmp_path / "ckpt", model=model, tokenizer=tok, optimizer=opt,
                                    scheduler=sched, state=TrainerState(0, {}))
    marker = tmp_path / "pwned"
    _RunsCode.marker = str(marker)
    torch.save({"state": {}, "param_groups": [], "payload": _RunsCode()}, ckpt / OPTIMIZER_FILE)
    pickle.loads(pickle.dumps(_RunsCode()))  # proof that plain unpickling runs the payload
    assert marker.exists()
    marker.unlink()
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_training_checkpoint(ckpt, model=model, optimizer=opt, scheduler=sched)
    assert not marker.exists()


def test_not_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not a training checkpoint"):
        read_trainer_state(tmp_path)
