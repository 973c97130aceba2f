"""TrainConfig: strict keys and types, values checked, TOML round trip, the shipped demo config."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from hdiff.training import TrainConfig, load_train_config, train_config_from_dict, train_config_to_toml
from hdiff.training.models import build_model, model_class

from .conftest import TINY, tiny_config

REPO = Path(__file__).resolve().parents[2]


def test_demo_config_loads_and_round_trips(tmp_path: Path) -> None:
    cfg = load_train_config(REPO / "configs" / "train_demo.toml")
    assert cfg.noise.process == "masking" and cfg.data.n_train == 512 and cfg.model.channels == 64
    assert cfg.model.kind == "tree_unet" and cfg.optim.batch_size == 128
    (tmp_path / "c.toml").write_text(train_config_to_toml(cfg))
    assert load_train_config(tmp_path / "c.toml") == cfg


def test_round_trip_with_model_options(tmp_path: Path) -> None:
    cfg = tiny_config(model={"options": {"hidden": 64}})
    text = train_config_to_toml(cfg)
    assert train_config_from_dict(tomllib.loads(text)) == cfg


@pytest.mark.parametrize("table, key", [(None, "epochs"), ("optim", "learning_rate"), ("data", "n"), ("run", "sed")])
def test_unknown_key_is_a_value_error_naming_it(table: str | None, key: str) -> None:
    data = {k: dict(v) for k, v in TINY.items()}
    (data[table] if table else data)[key] = 1
    with pytest.raises(ValueError, match=key):
        train_config_from_dict(data)


@pytest.mark.parametrize("table, key, value", [("optim", "lr", "fast"), ("data", "n_train", 12.5),
                                               ("optim", "max_steps", True), ("noise", "elbo_weight", 1),
                                               ("optim", "betas", 0.9), ("model", "options", 3)])
def test_wrong_type_is_a_type_error_naming_the_field(table: str, key: str, value) -> None:
    with pytest.raises(TypeError, match=key):
        tiny_config(**{table: {key: value}})


def test_n_train_smaller_than_the_batch() -> None:
    with pytest.raises(ValueError, match=r"data\.n_train"):
        tiny_config(data={"n_train": 16}, optim={"batch_size": 32})


@pytest.mark.parametrize("overrides, field", [
    ({"optim": {"lr": 0.0}}, "optim.lr"),
    ({"optim": {"max_steps": 0}}, "optim.max_steps"),
    ({"optim": {"ema_decay": 1.0}}, "optim.ema_decay"),
    ({"optim": {"betas": [0.9]}}, "optim.betas"),
    ({"noise": {"process": "uniform", "elbo_weight": True}}, "noise.elbo_weight"),
    ({"noise": {"process": "blur"}}, "noise.process"),
    ({"run": {"checkpoint_every": 0}}, "run.checkpoint_every"),
])
def test_bad_values_name_the_field(overrides: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        tiny_config(**overrides)


def test_unknown_model_kind_and_clashing_options() -> None:
    with pytest.raises(ValueError, match="model.kind"):
        model_class("transformer")
    cfg = tiny_config(model={"options": {"vocab_size": 4}})
    with pytest.raises(ValueError, match="model.options"):
        build_model(cfg, cfg.ghm.build())


def test_replace_revalidates() -> None:
    cfg = tiny_config()
    assert cfg.replace(**{"optim.max_steps": 7}).optim.max_steps == 7
    with pytest.raises(ValueError, match=r"data\.n_train"):
        cfg.replace(**{"data.n_train": 8})
    with pytest.raises(ValueError, match="optim.steps"):
        cfg.replace(**{"optim.steps": 8})
    assert isinstance(TrainConfig(), TrainConfig)  # the defaults are a valid config
