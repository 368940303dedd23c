"""The search space: config ranges -> Optuna distributions -> validated trial configs."""

from __future__ import annotations

import optuna
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gems.config import CONFIG_DIR, ConfigError
from tune.config import SearchRange, load_config
from tune.sweep.space import apply_params, to_optuna, validate_points, validate_space


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
def test_every_shipped_space_is_valid(name: str) -> None:
    cfg = load_config(name)
    dists = to_optuna(cfg.tune.space)
    assert set(dists) == set(cfg.tune.space)


def test_distributions_keep_scale_and_type() -> None:
    space = {"gems.r_shared": SearchRange(low=8, high=32, log=True, integer=True),
             "train.lr": SearchRange(low=1e-5, high=1e-3, log=True),
             "gems.tau": SearchRange(low=0.3, high=3.0)}
    dists = to_optuna(space)
    assert dists["gems.r_shared"] == optuna.distributions.IntDistribution(8, 32, log=True)
    assert dists["train.lr"] == optuna.distributions.FloatDistribution(1e-5, 1e-3, log=True)
    assert dists["gems.tau"] == optuna.distributions.FloatDistribution(0.3, 3.0)


@pytest.mark.parametrize("key,message", [
    ("gems.not_a_field", "not a config field"),
    ("data.seed", "gems.* or train.*"),
    ("model.name_or_path", "not a numeric field"),
    ("tau", "gems.* or train.*"),
    ("gems.method", "not a numeric field"),
    ("gems.gate_weights.nope", "not a config field"),
    ("gems.tau.x", "not a section"),
])
def test_bad_keys_are_named(key: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        validate_space({key: SearchRange(low=1, high=2, integer=True)})
    assert key in str(err.value)


def test_integer_field_needs_integer_range() -> None:
    with pytest.raises(ConfigError, match="integer: true"):
        validate_space({"gems.r_shared": SearchRange(low=2, high=8)})


def test_nested_field_can_be_tuned() -> None:
    cfg = apply_params(load_config("tiny"), {"gems.gate_weights.loss": 0.7})
    assert cfg.gems.gate_weights.loss == 0.7


def test_apply_params_sets_values_and_keeps_the_rest() -> None:
    base = load_config("tiny")
    cfg = apply_params(base, {"gems.r_shared": 6, "train.lr": 1.5e-05, "gems.tau": 0.5})
    assert (cfg.gems.r_shared, cfg.train.lr, cfg.gems.tau) == (6, 1.5e-05, 0.5)
    assert isinstance(cfg.train.lr, float)
    assert cfg.model_dump(exclude={"gems", "train"}) == base.model_dump(exclude={"gems", "train"})
    assert base.gems.tau != 0.5  # the base config is not mutated


@pytest.mark.parametrize("params,field", [({"gems.tau": -1.0}, "gems.tau"),
                                          ({"gems.r_shared": 0}, "gems.r_shared"),
                                          ({"train.lr": 5.0}, "train.lr")])
def test_invalid_point_fails_with_the_field_named(params: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        apply_params(load_config("tiny"), params)


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_every_sampled_point_of_the_demo_space_is_a_valid_config(data: st.DataObject) -> None:
    """Sampling the shipped space never produces a config pydantic rejects."""
    cfg = load_config("demo")
    params = {}
    for name, dist in to_optuna(cfg.tune.space).items():
        if isinstance(dist, optuna.distributions.IntDistribution):
            params[name] = data.draw(st.integers(dist.low, dist.high), label=name)
        else:
            params[name] = data.draw(st.floats(dist.low, dist.high), label=name)
    trial_cfg = apply_params(cfg, params)
    for name, value in params.items():
        section, field = name.split(".")
        assert getattr(getattr(trial_cfg, section), field) == value


def test_points_to_evaluate_must_lie_in_the_space() -> None:
    space = {"gems.tau": SearchRange(low=0.3, high=3.0, log=True)}
    validate_points(space, [{"gems.tau": 1.0}])
    with pytest.raises(ConfigError, match=r"points_to_evaluate\[0\]: gems.tau=-1.0 is outside"):
        validate_points(space, [{"gems.tau": -1.0}])
    with pytest.raises(ConfigError, match="not in tune.space"):
        validate_points(space, [{"train.lr": 1e-4}])


def test_fields_with_fixed_values_are_searched_by_choice() -> None:
    space = {"train.loss": SearchRange(choices=["catalog", "vocab"]),
             "model.chat_template": SearchRange(choices=["auto", "none"]),
             "train.token_weighting": SearchRange(choices=["none", "talr", "flow"]),
             "train.item_lr_scale": SearchRange(low=1.0, high=10.0, log=True)}
    dists = to_optuna(space)
    assert dists["train.loss"] == optuna.distributions.CategoricalDistribution(["catalog", "vocab"])
    validate_points(space, [{"train.loss": "vocab", "train.item_lr_scale": 3.0,
                             "train.token_weighting": "talr"}])
    with pytest.raises(ConfigError, match="not among"):
        validate_space({"train.token_weighting": SearchRange(choices=["none", "focal"])})
    validate_space({"gems.method": SearchRange(choices=["gems", "dpmoe", "lora"])})  # methods are choices
    with pytest.raises(ConfigError, match="not one of"):
        validate_points(space, [{"train.loss": "bpr"}])
    with pytest.raises(ConfigError, match="not among"):
        validate_space({"train.loss": SearchRange(choices=["catalog", "softmax"])})
    with pytest.raises(ConfigError, match="no fixed set of values"):
        validate_space({"train.lr": SearchRange(choices=["1e-4"])})
    with pytest.raises(ConfigError, match="give it choices"):
        validate_space({"train.loss": SearchRange(low=0, high=1)})
    with pytest.raises(ValueError, match="not both"):
        SearchRange(low=0, high=1, choices=["a"])
