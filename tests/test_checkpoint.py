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
from gems.config import ModelConfig
from gems.model import add_item_tokens, load_backbone
from gems.schedule import build_lr_schedule

ITEMS = [("a1", "red stapler"), ("b2", "laser printer toner"), ("c3", "blue pen")]


def _setup(tmp_path: Path, tied: bool):
    cfg = ModelConfig(name_or_path="tiny-llama", tiny={"tie_word_embeddings": tied})
    model, tok = load_backbone(cfg, tmp_path / "cache")
    add_item_tokens(model, tok, ITEMS)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, tok, opt, build_lr_schedule(opt, 1, 10)


def _step(model, opt, sched) -> None:
    ids = torch.randint(0, model.config.vocab_size, (2, 6))  # draws from the torch RNG on purpose
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad()


@pytest.mark.parametrize("tied", [True, False], ids=["tied-head", "untied-head"])
def test_round_trip_continues_bit_identically(tmp_path: Path, tied: bool) -> None:
    torch.manual_seed(0)
    model, tok, opt, sched = _setup(tmp_path, tied)
    for _ in range(2):
        _step(model, opt, sched)
    np.random.seed(5), random.seed(5)
    state = TrainerState(step=2, data_position={"step": 2}, extra={"history": [{"loss": 1.5}]})
    ckpt = save_training_checkpoint(tmp_path / "ckpt", model=model, tokenizer=tok, optimizer=opt,
                                    scheduler=sched, state=state)
    expected_draws = (np.random.rand(), random.random())
    _step(model, opt, sched)  # the uninterrupted run's third step
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    torch.manual_seed(123), np.random.seed(9), random.seed(9)  # a fresh process: other RNG states
    model2, _, opt2, sched2 = _setup(tmp_path, tied)
    restored = load_training_checkpoint(ckpt, model=model2, optimizer=opt2, scheduler=sched2)
    assert (restored.step, restored.data_position, restored.extra) == (2, {"step": 2}, state.extra)
    assert (np.random.rand(), random.random()) == expected_draws
    _step(model2, opt2, sched2)
    got = model2.state_dict()
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(got[name], value), name
    assert (ckpt / "model" / "model.safetensors").is_file()
    assert "<item_b2>" in (ckpt / "model" / "tokenizer.json").read_text()


def test_checkpoint_from_another_catalog_is_refused(tmp_path: Path) -> None:
    model, tok, opt, sched = _setup(tmp_path, tied=True)
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
    model, tok, opt, sched = _setup(tmp_path, tied=True)
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
