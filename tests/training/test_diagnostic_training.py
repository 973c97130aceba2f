"""The training modes behind compare's diagnostics: fresh data (n = inf), oracle targets, snapshots, constant LR."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hdiff.training import load_trained, train
from hdiff.training.fresh import FreshBatchSampler, FreshGHMDataset

from .conftest import tiny_config


class _Interrupt(Exception):
    pass


def _weights(run: Path, sub: str = "model") -> dict[str, torch.Tensor]:
    model = load_trained(run)[0]
    return type(model).from_pretrained(run / sub).state_dict()


def test_fresh_batches_are_a_function_of_the_batch_index() -> None:
    cfg = tiny_config()
    ds = FreshGHMDataset(cfg.ghm.build(), seed=0)
    a = [ds.__getitems__(b) for b in FreshBatchSampler(8, start=0, count=3)]
    b = [ds.__getitems__(b) for b in FreshBatchSampler(8, start=1, count=2)]
    assert torch.equal(a[1], b[0]) and torch.equal(a[2], b[1]) and not torch.equal(a[0], a[1])


def test_fresh_data_trains_and_resumes_bit_identically(tmp_path: Path) -> None:
    """An n = inf run interrupted after its checkpoint and resumed ends where an uninterrupted one does."""
    cfg = tiny_config(data={"fresh": True, "n_train": 64}, optim={"max_steps": 20},
                      run={"checkpoint_every": 10, "eval_every": 10, "log_every": 5})
    train(cfg, tmp_path / "a", progress=False)

    def crash(step: int) -> None:
        if step == 13:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        train(cfg, tmp_path / "b", callback=crash, progress=False)
    train(cfg, tmp_path / "b", resume=True, progress=False)
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)
    # a fresh run does not see the fixed training set: its weights differ from a fixed-data run's
    fixed = tiny_config(data={"n_train": 64}, optim={"max_steps": 20}, run={"checkpoint_every": 10, "eval_every": 10})
    train(fixed, tmp_path / "c", progress=False)
    c = _weights(tmp_path / "c")
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_oracle_targets_snapshots_and_constant_lr(tmp_path: Path) -> None:
    cfg = tiny_config(noise={"target": "oracle"}, optim={"max_steps": 12, "schedule": "constant", "warmup_steps": 2},
                      run={"checkpoint_every": 12, "eval_every": 6, "log_every": 2, "snapshot_steps": [4, 8]})
    result = train(cfg, tmp_path, progress=False)
    assert result.step == 12 and torch.isfinite(torch.tensor(result.loss))
    for step in (4, 8):
        model = load_trained(tmp_path, snapshot=step)[0]
        assert (tmp_path / "snapshots" / f"step_{step:06d}").is_dir() and model.training is False
    with pytest.raises(ValueError, match="no snapshot"):
        load_trained(tmp_path, snapshot=5)
    lrs = [r["lr"] for r in map(json.loads, (tmp_path / "log.jsonl").read_text().splitlines()) if "lr" in r]
    assert lrs[-1] == pytest.approx(cfg.optim.lr) and len(set(lrs[1:])) == 1  # constant after warmup


def test_bad_snapshot_steps_are_refused() -> None:
    with pytest.raises(ValueError, match="run.snapshot_steps"):
        tiny_config(optim={"max_steps": 10}, run={"snapshot_steps": [11]})
