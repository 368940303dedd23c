"""The shared command line of the five jobs (pipelines/cli.py): every smoke file loads on the config
its job puts it on, --set wins over it in every job, and every job keeps its flags."""

from __future__ import annotations

import argparse
import importlib

import pytest

from pipelines.cli import SMOKE_DIR, load_job_config, smoke_overrides
from tune.config import load_config

JOBS = ["preprocess", "train", "full", "nightly", "compare"]


def _job(name: str):
    return importlib.import_module(f"pipelines.{name}").JOB


def test_every_job_has_a_smoke_file_that_states_its_command() -> None:
    assert sorted(p.stem for p in SMOKE_DIR.glob("*.yaml")) == sorted(JOBS)
    for name in JOBS:
        assert f"# Run: .venv/bin/python pipelines/{name}.py --smoke-test" in (
            SMOKE_DIR / f"{name}.yaml").read_text()


@pytest.mark.parametrize("name", JOBS)
def test_set_wins_over_every_jobs_smoke_file(name: str) -> None:
    job = _job(name)
    args = argparse.Namespace(config=None if job.own_smoke_config else job.default_config,
                              set=["train.max_steps=7", "eval.max_examples=3"], smoke_test=True)
    cfg = load_job_config(args, job)
    base = "tiny" if job.own_smoke_config else job.default_config
    assert cfg == load_config(base, [*smoke_overrides(name), *args.set])
    assert cfg.train.max_steps == 7 and cfg.eval.max_examples == 3
    smoke_only = load_job_config(argparse.Namespace(config=args.config, set=[], smoke_test=True), job)
    assert smoke_only.train.max_steps != 7, "the smoke file itself sets fewer steps"


def test_smoke_values_keep_their_yaml_type() -> None:
    cfg = load_job_config(argparse.Namespace(config="demo", set=[], smoke_test=True), _job("train"))
    assert cfg.train.lr == pytest.approx(1e-3) and cfg.model.name_or_path == "tiny-llama"
    assert cfg.train.num_workers == 1


@pytest.mark.parametrize("name,flags", [
    ("preprocess", {"--config", "--set", "--smoke-test", "--num-cpus"}),
    ("train", {"--config", "--set", "--smoke-test", "--num-cpus", "--resume", "--run-name"}),
    ("full", {"--config", "--set", "--smoke-test"}),
    ("nightly", {"--config", "--set", "--smoke-test", "--num-cpus"}),
    ("compare", {"--config", "--set", "--smoke-test", "--methods", "--seeds", "--out", "--no-resume",
                 "--keep-checkpoints"}),
])
def test_every_job_keeps_its_flags(name: str, flags: set[str], capsys: pytest.CaptureFixture) -> None:
    main = importlib.import_module(f"pipelines.{name}").main
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    shown = {word.strip(",[]") for word in capsys.readouterr().out.split() if word.startswith("--")}
    assert flags <= shown
