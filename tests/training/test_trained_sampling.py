"""A trained TreeUNet runs through every scheduler family of the oracle, unchanged."""

from __future__ import annotations

import pytest
import torch

from hdiff.sampling import sample
from hdiff.schedulers import make_scheduler, scheduler_options
from hdiff.training import load_trained, train

from .conftest import tiny_config

FAMILIES = {"masking": [("masked", {}), ("masked", {"unmasking": "fixed"})],
            "uniform": [("uniform", {}), ("discrete-ddim", {})],
            "gaussian": [("ddim", {}), ("euler", {}), ("dpmsolver", {}), ("ddpm", {})]}


@pytest.mark.parametrize("process", list(FAMILIES))
def test_trained_tree_unet_samples_with_every_scheduler(process, tmp_path):
    cfg = tiny_config(noise={"process": process}, optim={"max_steps": 20}, run={"checkpoint_every": 20, "eval_every": 20})
    train(cfg, tmp_path / "run", progress=False)
    model, ghm, _ = load_trained(tmp_path / "run")
    for name, kwargs in FAMILIES[process]:
        steps = ghm.num_leaves if kwargs.get("unmasking") == "fixed" else 6
        x = sample(model, make_scheduler(name, **kwargs), batch_size=8, num_inference_steps=steps,
                   generator=torch.Generator().manual_seed(0), **scheduler_options(name))
        assert x.shape == (8, *ghm.leaf_shape) and x.dtype == torch.long
        assert int(x.min()) >= 0 and int(x.max()) < ghm.vocab_size  # clean tokens, no MASK left
