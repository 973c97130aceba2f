"""The training loop: it learns, it saves and loads exactly, and a resumed run equals an uninterrupted one."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from hdiff.training import GHMDataset, evaluation_loss, latest_checkpoint, list_checkpoints, load_trained, train
from hdiff.training.models import build_model, process_of

from .conftest import tiny_config


def _records(out: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "time"} for r in map(json.loads, (out / "log.jsonl").open())]


@pytest.mark.parametrize("kind, process, elbo", [("tree_unet", "masking", True), ("tiny_mlp", "uniform", False),
                                                ("tiny_mlp", "gaussian", False)])
def test_a_few_hundred_steps_learn_the_ghm(tmp_path: Path, kind: str, process: str, elbo: bool) -> None:
    cfg = tiny_config(model={"kind": kind}, data={"n_train": 512}, noise={"process": process, "elbo_weight": elbo},
                      optim={"max_steps": 300, "warmup_steps": 20},
                      run={"checkpoint_every": 300, "eval_every": 100, "log_every": 50})
    result = train(cfg, tmp_path)
    curve = [r["heldout_loss"] for r in _records(tmp_path) if "heldout_loss" in r]
    log_v = math.log(cfg.ghm.vocab_size)
    # log v is what a denoiser that learned nothing scores; the leaf marginals alone give ~0.94 log v here
    assert result.heldout_loss < 0.7 * log_v, curve
    assert curve[-1] < curve[0] and result.step == 300
    meta = json.loads((tmp_path / "train_meta.json").read_text())
    assert meta["n_train"] == 512 and meta["data_seed"] == 0 and meta["steps"] == 300
    assert meta["final_heldout_loss"] == result.heldout_loss


def test_save_load_gives_identical_outputs(tmp_path: Path) -> None:
    cfg = tiny_config()
    result = train(cfg, tmp_path / "run")
    model, ghm, loaded_cfg = load_trained(tmp_path / "run")
    assert loaded_cfg == cfg and ghm.leaf_shape == model.leaf_shape
    assert not model.training
    _, heldout = GHMDataset.split(ghm, cfg.data.n_train, cfg.data.n_heldout, seed=cfg.data.data_seed)
    # the loaded EMA weights are the ones evaluated at the last step, to the bit
    kw = dict(schedule=cfg.schedule, t_min=cfg.noise.t_min, elbo=cfg.noise.elbo_weight,
              batch_size=cfg.optim.batch_size, device=torch.device("cpu"))
    from hdiff.training.data import stream_seed
    from hdiff.training.trainer import _EVAL_STREAM  # the evaluation noise seed of the run

    seed = stream_seed(cfg.run.seed, _EVAL_STREAM)
    assert evaluation_loss(model, heldout.tokens, process_of(model, 8), seed=seed, **kw) == result.heldout_loss
    raw, _, _ = load_trained(tmp_path / "run", raw=True)
    assert evaluation_loss(raw, heldout.tokens, process_of(raw, 8), seed=seed, **kw) == result.heldout_loss_raw
    # and a second save / load round trip changes nothing
    model.save_pretrained(tmp_path / "again")
    again = type(model).from_pretrained(tmp_path / "again").eval()
    x_t = process_of(model, 8).add_noise(heldout.tokens[:16], 0.5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x_t, 0.5), again(x_t, 0.5))


class _Interrupt(Exception):
    pass


def test_interrupted_and_resumed_equals_uninterrupted(tmp_path: Path) -> None:
    cfg = tiny_config(optim={"max_steps": 40}, run={"checkpoint_every": 10, "eval_every": 10, "log_every": 5})
    train(cfg, tmp_path / "a")

    def crash(step: int) -> None:
        if step == 23:  # after the checkpoint at 20 and log records at 21..23 that must be redone
            raise _Interrupt

    with pytest.raises(_Interrupt):
        train(cfg, tmp_path / "b", callback=crash)
    assert latest_checkpoint(tmp_path / "b")[0] == 20
    (tmp_path / "b" / "checkpoints" / ".tmp_step_000030").mkdir()  # a save cut short: ignored
    with pytest.raises(ValueError, match="--resume"):
        train(cfg, tmp_path / "b")
    result = train(cfg, tmp_path / "b", resume=True)

    assert result.step == 40
    assert _records(tmp_path / "a") == _records(tmp_path / "b")  # the same curve, no duplicated steps
    for sub in ("model", "model_raw"):
        a = type(load_trained(tmp_path / "a")[0]).from_pretrained(tmp_path / "a" / sub).state_dict()
        b = type(load_trained(tmp_path / "b")[0]).from_pretrained(tmp_path / "b" / sub).state_dict()
        assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)
    meta_a, meta_b = (json.loads((tmp_path / d / "train_meta.json").read_text()) for d in "ab")
    assert meta_a["steps"] == meta_b["steps"] == 40
    assert meta_a["final_heldout_loss"] == meta_b["final_heldout_loss"]
    assert [s for s, _ in list_checkpoints(tmp_path / "b")] == [30, 40]  # keep_checkpoints = 2


def test_resume_refuses_another_config_but_may_extend(tmp_path: Path) -> None:
    cfg = tiny_config(optim={"max_steps": 10}, run={"checkpoint_every": 5, "eval_every": 5})
    first = train(cfg, tmp_path)
    again = train(cfg, tmp_path, resume=True)  # already at max_steps: nothing to do but report
    assert again.step == 10 and again.loss == first.loss and again.heldout_loss == first.heldout_loss
    with pytest.raises(ValueError, match=r"data\.n_train"):
        train(cfg.replace(**{"data.n_train": 64}), tmp_path, resume=True)
    with pytest.raises(ValueError, match=r"run\.seed"):
        train(cfg.replace(**{"run.seed": 1}), tmp_path, resume=True)
    longer = train(cfg.replace(**{"optim.max_steps": 15}), tmp_path, resume=True)
    assert longer.step == 15 and [r["step"] for r in _records(tmp_path)][-1] == 15
    # --resume on a directory without checkpoints starts from scratch
    shutil.rmtree(tmp_path / "checkpoints")
    shutil.rmtree(tmp_path / "model")
    assert train(cfg, tmp_path, resume=True).step == 10


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_resume_matches(tmp_path: Path) -> None:
    cfg = tiny_config(optim={"max_steps": 20}, run={"checkpoint_every": 10, "eval_every": 10})
    train(cfg, tmp_path / "a")

    def crash(step: int) -> None:
        if step == 13:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        train(cfg, tmp_path / "b", callback=crash)
    train(cfg, tmp_path / "b", resume=True)
    assert _records(tmp_path / "a") == _records(tmp_path / "b")


@pytest.mark.parametrize("layout", ["sequence", "image"])
def test_diffusers_baselines_train_and_load(tmp_path: Path, layout: str) -> None:
    image = layout == "image"
    ghm = {"vocab_size": 4, "num_rules": 2, "branching": 4 if image else 2, "depth": 2 if image else 3,
           "layout": layout}
    width = {"block_out_channels": [8, 16]}
    cfg = tiny_config(ghm=ghm, model={"kind": "unet_baseline", "channels": None, "options": width},
                      optim={"max_steps": 4}, run={"checkpoint_every": 4, "eval_every": 4})
    train(cfg, tmp_path)
    model, ghm_loaded, _ = load_trained(tmp_path)
    assert type(model).__name__ == ("UNet2DBaseline" if layout == "image" else "UNet1DBaseline")
    assert model.leaf_shape == ghm_loaded.leaf_shape
    with pytest.raises(ValueError, match="model.channels: not an argument of"):
        build_model(cfg.replace(**{"model.channels": 16}), cfg.ghm.build())
