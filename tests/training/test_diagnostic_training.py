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


@pytest.mark.parametrize("schedule", ["constant", "inverse_sqrt"])
def test_budget_free_schedules_make_a_snapshot_a_shorter_run(tmp_path: Path, schedule: str) -> None:
    """What compare's decomposition relies on: the snapshot at S steps of a longer run is a run of S steps."""
    optim = {"schedule": schedule, "warmup_steps": 2, "decay_timescale": 3}
    long = tiny_config(optim={**optim, "max_steps": 12}, run={"checkpoint_every": 12, "snapshot_steps": [8]})
    short = tiny_config(optim={**optim, "max_steps": 8}, run={"checkpoint_every": 8})
    train(long, tmp_path / "long", progress=False)
    train(short, tmp_path / "short", progress=False)
    snap = load_trained(tmp_path / "long", snapshot=8)[0].state_dict()
    end = load_trained(tmp_path / "short")[0].state_dict()
    assert all(torch.allclose(snap[k], end[k], atol=1e-6, rtol=0) for k in snap)


def test_inverse_sqrt_decays_as_documented(tmp_path: Path) -> None:
    cfg = tiny_config(optim={"max_steps": 12, "schedule": "inverse_sqrt", "warmup_steps": 2, "decay_timescale": 3},
                      run={"checkpoint_every": 12, "log_every": 1, "eval_every": 12})
    train(cfg, tmp_path, progress=False)
    lrs = {r["step"]: r["lr"] for r in map(json.loads, (tmp_path / "log.jsonl").read_text().splitlines()) if "lr" in r}
    # the logged rate is the one for the next step: after `step` optimizer steps the factor is sqrt(3 / (3 + step - 2))
    for step in (4, 8, 12):
        assert lrs[step] == pytest.approx(cfg.optim.lr * (3 / (3 + step - 2)) ** 0.5, rel=1e-6)


def test_stratified_noise_levels_cover_the_interval() -> None:
    from hdiff.training.loss import sample_t
    gen = torch.Generator().manual_seed(0)
    t = sample_t(64, 0.0, generator=gen, device=torch.device("cpu"), stratified=True)
    # one point in every 1/64-wide cell of [0, 1), at the same offset
    cells = torch.sort(torch.floor(t * 64)).values
    assert torch.equal(cells, torch.arange(64, dtype=cells.dtype))
    # and each t is still U(0, 1): the mean over many batches is 1/2 within 4 standard errors (0.29 / sqrt(n))
    many = torch.stack([sample_t(8, 0.0, generator=gen, device=torch.device("cpu"), stratified=True)[3]
                        for _ in range(4000)])
    assert abs(float(many.mean()) - 0.5) < 4 * 0.2887 / 4000 ** 0.5


def test_empirical_targets_train_and_need_a_training_set(tmp_path: Path) -> None:
    """target = "empirical": the soft target is the training set's exact posterior (no GHM), so a fresh run has none."""
    with pytest.raises(ValueError, match="noise.target"):
        tiny_config(noise={"target": "empirical"}, data={"fresh": True})
    cfg = tiny_config(noise={"target": "empirical"}, optim={"max_steps": 12}, run={"checkpoint_every": 12})
    result = train(cfg, tmp_path / "emp", progress=False)
    assert result.step == 12 and torch.isfinite(torch.tensor(result.loss))
    plain = tiny_config(optim={"max_steps": 12}, run={"checkpoint_every": 12})
    train(plain, tmp_path / "x0", progress=False)
    a, b = _weights(tmp_path / "emp"), _weights(tmp_path / "x0")
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the target reached the gradient


def test_empirical_target_has_the_one_hot_targets_expected_gradient() -> None:
    """Same noise draws, many batches: the mean gradient of the soft-target loss equals the one-hot loss's
    within Monte-Carlo error (their difference has mean zero: Rao-Blackwell), and its variance is lower."""
    from hdiff.denoisers import EmpiricalDenoiser
    from hdiff.models import TreeUNet
    from hdiff.noise import get_process
    from hdiff.training.loss import diffusion_loss

    cfg = tiny_config()
    ghm = cfg.ghm.build()
    process = get_process("masking", ghm.vocab_size)
    tokens = ghm.sample(16, generator=torch.Generator().manual_seed(0))
    model = TreeUNet(vocab_size=ghm.vocab_size, depth=ghm.depth, branching=ghm.branching, channels=8)
    for block in model.decoder:
        torch.nn.init.normal_(block.fc2.weight, std=0.3)
    target = EmpiricalDenoiser(tokens, process)

    def grad(seed: int, soft: bool) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        x0 = tokens[torch.randint(0, 16, (32,), generator=gen)]
        model.zero_grad()
        diffusion_loss(model, x0, process, schedule="linear", t_min=1e-3, elbo=False, generator=gen,
                       oracle=target if soft else None).backward()
        return model.head.weight.grad.flatten().clone()

    diffs = torch.stack([grad(s, True) - grad(s, False) for s in range(300)])
    hard = torch.stack([grad(s, False) for s in range(300)])
    se = diffs.std(0) / 300 ** 0.5
    assert bool((diffs.mean(0).abs() <= 5 * se + 1e-7).all())
    soft = hard + diffs
    assert float(soft.var(0).sum()) < float(hard.var(0).sum())
