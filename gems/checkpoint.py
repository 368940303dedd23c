"""Training checkpoints that resume exactly and can never run code.

A checkpoint directory holds everything a resumed run needs to take the very step an
uninterrupted run would have taken next:

    model/               save_pretrained(safe_serialization=True) + tokenizer with item tokens
                         (a plain HF model dir, or a peft adapter dir for LoRA): servable as is
    optimizer.pt         optimizer state (tensors and plain containers only; GaLore's projector
                         objects are stored as plain dicts and rebuilt on load)
    scheduler.pt         LR schedule state
    rng.pt               torch / CUDA / numpy / python RNG states, as tensors
    trainer_state.json   step, data position, and whatever the loop adds (metrics history, ...)

Weights are safetensors and every ``.pt`` file is read with ``torch.load(weights_only=True)``: a
checkpoint fetched from shared storage cannot execute code (pickle's ``__reduce__``) on load.
"""

from __future__ import annotations

import json
import pickle
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from safetensors.torch import load_file

from gems.dpmoe import ADAPTER_FILE, DPMoEModel

CHECKPOINT_FORMAT = 1
MODEL_DIR, STATE_FILE = "model", "trainer_state.json"
OPTIMIZER_FILE, SCHEDULER_FILE, RNG_FILE = "optimizer.pt", "scheduler.pt", "rng.pt"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, from another run layout, or unsafe to load."""


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state_dict: dict[str, Any]) -> Any: ...


@dataclass
class TrainerState:
    """The loop's own progress: JSON, so it is human-readable and safe."""

    step: int
    data_position: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)


def _is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """DDP (and similar wrappers) keep the real model in ``.module``."""
    while isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    return model


def capture_rng_state() -> dict[str, Any]:
    """All RNG states as tensors and ints (loadable with weights_only=True)."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64),
                   "gauss": py_gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["state"].tolist()), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


GALORE_PROJECTORS = "galore_projectors"


def plain_optimizer_state(state_dict: dict[str, Any]) -> dict[str, Any]:
    """The optimizer state with GaLore's projector objects moved out into plain dicts of tensors
    and scalars (under ``galore_projectors``), so ``weights_only`` loading accepts it. They stay
    outside ``state`` because ``Optimizer.load_state_dict`` mangles non-tensor values there."""
    out = dict(state_dict)
    out["state"], projectors = {}, {}
    for key, entry in state_dict["state"].items():
        entry = dict(entry)
        projector = entry.pop("projector", None)
        if projector is not None:
            projectors[key] = dict(vars(projector))
        out["state"][key] = entry
    if projectors:
        out[GALORE_PROJECTORS] = projectors
    return out


def load_optimizer_state(optimizer: Any, saved: dict[str, Any]) -> None:
    """Inverse of :func:`plain_optimizer_state`: load, then rebuild GaLore's projectors."""
    saved = dict(saved)
    projectors = saved.pop(GALORE_PROJECTORS, {})
    optimizer.load_state_dict(saved)
    if not projectors:
        return
    from galore_torch.galore_projector import GaLoreProjector

    index_to_param = {idx: p for saved_group, group in zip(saved["param_groups"], optimizer.param_groups,
                                                            strict=True)
                      for idx, p in zip(saved_group["params"], group["params"], strict=True)}
    for idx, attrs in projectors.items():
        projector = GaLoreProjector.__new__(GaLoreProjector)
        projector.__dict__.update(attrs)
        optimizer.state[index_to_param[idx]]["projector"] = projector


def save_training_checkpoint(directory: Path, *, model: torch.nn.Module, tokenizer: Any,
                             optimizer: Stateful, scheduler: Stateful | None,
                             state: TrainerState) -> Path:
    """Write a checkpoint into ``directory`` (created; must be empty or absent)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if any(directory.iterdir()):
        raise CheckpointError(f"checkpoint directory {directory} is not empty")
    model = _unwrap(model)
    model.save_pretrained(directory / MODEL_DIR, safe_serialization=True)
    tokenizer.save_pretrained(directory / MODEL_DIR)
    torch.save(plain_optimizer_state(optimizer.state_dict()), directory / OPTIMIZER_FILE)
    if scheduler is not None:
        torch.save(scheduler.state_dict(), directory / SCHEDULER_FILE)
    torch.save(capture_rng_state(), directory / RNG_FILE)
    payload = {"format": CHECKPOINT_FORMAT, "step": state.step, "data_position": state.data_position,
               "extra": state.extra}
    (directory / STATE_FILE).write_text(json.dumps(payload, indent=2, sort_keys=True))
    return directory


def safe_torch_load(path: Path) -> Any:
    """``torch.load`` that refuses anything but tensors and plain containers."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint file missing: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"refusing to load {path}: it holds objects other than tensors "
                              f"and plain containers, which could run code ({err})") from None


def _load_full_weights(model: torch.nn.Module, model_dir: Path) -> None:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no safetensors weights in {model_dir}")
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        weights.update(load_file(f))
    try:
        result = model.load_state_dict(weights, strict=False)
    except RuntimeError as err:  # shape mismatches: another backbone or item catalog
        raise CheckpointError(f"{model_dir} does not fit this model (different backbone or item "
                              f"catalog?): {str(err)[:500]}") from None
    if result.unexpected_keys:
        raise CheckpointError(f"{model_dir} has weights this model lacks: "
                              f"{result.unexpected_keys[:5]} (different model or item catalog?)")
    # save_pretrained drops tied copies (lm_head.weight when embeddings are tied): those are fine.
    loaded_storage = {model.state_dict()[k].data_ptr() for k in weights}
    untied = [k for k in result.missing_keys if model.state_dict()[k].data_ptr() not in loaded_storage]
    if untied:
        raise CheckpointError(f"{model_dir} lacks weights {untied[:5]}")


def _load_adapter_weights(model: torch.nn.Module, model_dir: Path) -> None:
    from peft import set_peft_model_state_dict

    path = model_dir / "adapter_model.safetensors"
    if not path.is_file():
        raise CheckpointError(f"{model_dir} is not a LoRA adapter checkpoint (no {path.name})")
    result = set_peft_model_state_dict(model, load_file(path))
    if result.unexpected_keys:
        raise CheckpointError(f"{path} has weights this model lacks: {result.unexpected_keys[:5]}")


def load_model_weights(model: torch.nn.Module, checkpoint_dir: Path) -> None:
    """Load a checkpoint's trained weights into a model built the same way (same items, method)."""
    model = _unwrap(model)
    model_dir = Path(checkpoint_dir) / MODEL_DIR
    if isinstance(model, DPMoEModel):
        if not (model_dir / ADAPTER_FILE).is_file():
            raise CheckpointError(f"{model_dir} is not a DPMoE checkpoint (no {ADAPTER_FILE})")
        try:
            model.load_adapter(model_dir)
        except ValueError as err:
            raise CheckpointError(str(err)) from None
    elif _is_peft(model):
        _load_adapter_weights(model, model_dir)
    else:
        _load_full_weights(model, model_dir)


def read_trainer_state(checkpoint_dir: Path) -> TrainerState:
    path = Path(checkpoint_dir) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{checkpoint_dir} is not a training checkpoint (no {STATE_FILE})")
    raw = json.loads(path.read_text())
    if raw.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {raw.get('format')} is not "
                              f"{CHECKPOINT_FORMAT}")
    return TrainerState(step=int(raw["step"]), data_position=raw["data_position"],
                        extra=raw.get("extra", {}))


def load_training_checkpoint(checkpoint_dir: Path, *, model: torch.nn.Module, optimizer: Stateful,
                             scheduler: Stateful | None, restore_rng: bool = True) -> TrainerState:
    """Restore model, optimizer, schedule and RNG in place; return the loop's progress."""
    checkpoint_dir = Path(checkpoint_dir)
    state = read_trainer_state(checkpoint_dir)
    load_model_weights(model, checkpoint_dir)
    load_optimizer_state(optimizer, safe_torch_load(checkpoint_dir / OPTIMIZER_FILE))
    if scheduler is not None:
        scheduler.load_state_dict(safe_torch_load(checkpoint_dir / SCHEDULER_FILE))
    if restore_rng:
        restore_rng_state(safe_torch_load(checkpoint_dir / RNG_FILE))
    return state
