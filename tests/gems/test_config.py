"""Every shipped config loads; every kind of bad value fails at load time naming the field."""

from pathlib import Path

import pytest

from gems.config import CONFIG_DIR, Config, ConfigError, validate_config
from tune.config import load_config

CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))


def test_there_are_configs() -> None:
    assert {p.stem for p in CONFIGS} >= {"demo", "tiny"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_loads_and_states_its_command(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.model.name_or_path
    assert "# Run:" in path.read_text(), f"{path.name} must state the command that runs it"


def test_override_is_typed() -> None:
    cfg = load_config("tiny", ["gems.tau=0.5", "train.max_steps=3", "gems.complementary=false"])
    assert cfg.gems.tau == 0.5 and cfg.train.max_steps == 3 and cfg.gems.complementary is False


def test_task_ranks_default_to_half_shared() -> None:
    cfg = load_config("tiny", ["gems.r_shared=10"])
    assert (cfg.gems.rank_search, cfg.gems.rank_rec) == (5, 5)


BAD = [
    ("gems.r_shared=-1", "gems.r_shared"),
    ("gems.tau=0", "gems.tau"),
    ("gems.alpha=0", "gems.alpha"),
    ("gems.t_svd=0", "gems.t_svd"),
    ("gems.method=sgd", "gems.method"),
    ("gems.not_a_field=1", "gems.not_a_field"),
    ("train.max_steps=[1, 2]", "train.max_steps"),
    ("model.name_or_path=/does/not/exist", "model.name_or_path"),
    ("model.name_or_path=", "model.name_or_path"),
    ("gems.tau", "gems.tau"),
    ("=3", "section.field=value"),
    ("data.split_mode=time_cut", "data.cut_day"),
    ("gems.betas=[0.9, 1.5]", "gems.betas"),
    ("tune.num_samples=0", "tune.num_samples"),
    ("tune.space={gems.tau: {low: 2, high: 1}}", "tune.space.gems.tau"),
    ("mlflow.top_k=0", "mlflow.top_k"),
    ("nightly.tolerance=2", "nightly.tolerance"),
]


@pytest.mark.parametrize("override,field", BAD)
def test_bad_values_fail_naming_the_field(override: str, field: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config("tiny", [override])
    assert field in str(err.value)


def test_the_library_config_has_no_job_sections() -> None:
    """tune, mlflow and nightly belong to the job's config (tune/config.py), not to gems'."""
    raw = {"model": {"name_or_path": "tiny-llama"}, "tune": {"num_samples": 2}}
    assert load_config("tiny").tune.num_samples == 2
    with pytest.raises(ConfigError, match="tune: unknown key"):
        validate_config(Config, raw)


def test_missing_required_model_section(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("name: x\n")
    with pytest.raises(ConfigError, match="model: required field is missing"):
        load_config(p)


def test_missing_config_file() -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config("no-such-config")


def test_state_dir_is_absolute() -> None:
    assert load_config("tiny").state_path.is_absolute()


def test_relative_paths_reach_outside_a_state_dir_that_does_not_exist_yet(tmp_path: Path) -> None:
    data = tmp_path / "shared" / "data"
    data.mkdir(parents=True)
    cfg = load_config("tiny").model_copy(update={"state_dir": str(tmp_path / "proj" / ".state" / "x")})
    resolved = cfg.resolve("../../../shared/data")
    assert not (tmp_path / "proj").exists()
    assert resolved == data and resolved.is_dir()
