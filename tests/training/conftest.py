"""Training-test fixtures: tiny configs (a small TreeUNet) and a faster stand-in model, ``tiny_mlp``."""

from __future__ import annotations

import pytest

from hdiff.training import TrainConfig, register_model, train_config_from_dict

from ._tiny_model import TinyDenoiser

register_model("tiny_mlp", TinyDenoiser)

#: RHM v=8, m=2, s=2, L=3: 8 leaves, 1024 distinct strings, entropy 0.87 nats/leaf vs log 8 = 2.08
TINY = {
    "ghm": {"vocab_size": 8, "num_rules": 2, "branching": 2, "depth": 3, "seed": 0},
    "model": {"kind": "tree_unet", "channels": 32},
    "noise": {"process": "masking"},
    "data": {"n_train": 256, "n_heldout": 128, "data_seed": 0},
    "optim": {"lr": 3e-3, "warmup_steps": 10, "max_steps": 40, "batch_size": 32, "ema_decay": 0.99},
    "run": {"seed": 0, "checkpoint_every": 10, "eval_every": 10, "log_every": 5},
}


def tiny_config(**overrides: dict) -> TrainConfig:
    """:data:`TINY` with some tables updated, e.g. ``tiny_config(optim={"max_steps": 20})``."""
    data = {k: dict(v) for k, v in TINY.items()}
    for table, values in overrides.items():
        data.setdefault(table, {}).update(values)
    return train_config_from_dict(data)


@pytest.fixture
def tiny_cfg() -> TrainConfig:
    """The tiny training config."""
    return tiny_config()


@pytest.fixture(autouse=True)
def one_thread():
    """Run on one CPU thread: for models this small, intra-op threading costs more than it saves
    (measured 6x slower steps with 2 threads on the 2-core CI machines)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
