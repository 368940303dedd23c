"""Shared fixtures: the tiny test backbone and a small item table.

Two cores are shared by every test process, so torch is held to at most two threads.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from gems.config import Config
from gems.model import load_backbone
from tune.config import load_config

torch.set_num_threads(min(2, torch.get_num_threads()))

TINY_ITEMS: list[tuple[str, str]] = [
    ("1", "Laser printer toner"),
    ("2", "Stapler"),
    ("3", "Copy paper 500 sheets"),
    ("4", "Blue ballpoint pen"),
    ("5", "Spiral notebook"),
    ("6", "Running shoes"),
    ("7", "Hiking boots"),
    ("8", "Wireless headphones"),
    ("9", "Bluetooth speaker"),
    ("10", "Coffee beans"),
    ("11", "Green tea"),
    ("12", "Stainless steel water bottle"),
    ("13", "Yoga mat"),
    ("14", "Desk lamp"),
    ("15", "Office chair"),
    ("16", "Frying pan"),
    ("17", "Kitchen knife"),
    ("18", "Rain jacket"),
    ("19", "Travel backpack"),
    ("20", "Dog food"),
]


@pytest.fixture(autouse=True)
def _isolated_mlflow_globals() -> Iterator[None]:
    """MLflow keeps the tracking URI and the active experiment (and exports them to the environment)
    per process: a test that points them somewhere must not decide where the next test's runs go."""
    saved = {key: os.environ.get(key) for key in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID")}
    uri = mlflow.get_tracking_uri()
    experiment = mlflow.tracking.fluent._active_experiment_id  # set_experiment's id, of another store
    yield
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(uri)
    mlflow.tracking.fluent._active_experiment_id = experiment
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def tiny_cfg() -> Config:
    """The tiny test config (tiny-llama backbone, small synthetic data)."""
    return load_config("tiny")


@pytest.fixture
def tiny_model_and_tokenizer(tiny_cfg: Config, tmp_path: Path) -> tuple[PreTrainedModel,
                                                                        PreTrainedTokenizerBase]:
    """A fresh tiny Llama and its tokenizer per test (building one takes ~0.1 s), no item tokens."""
    return load_backbone(tiny_cfg.model, tmp_path / "models")


@pytest.fixture
def tiny_items() -> list[tuple[str, str]]:
    """Twenty (item_id, title) pairs with non-empty, office/consumer-style titles."""
    return list(TINY_ITEMS)
