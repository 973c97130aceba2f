"""Experiment tracking: ``[run] log_with = "tensorboard"`` sends the ``log.jsonl`` records to TensorBoard."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hdiff.training import train

from .conftest import tiny_config

tensorboard = pytest.importorskip("tensorboard")  # in the dev extra; without it only these tests are skipped


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def _scalars(out: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar TensorBoard shows for the run in ``out`` (purged steps of a resumed run left out)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tracking" / "hdiff"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _expected(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    tags = sorted({k for r in records for k in r} - {"step"})
    return {tag: [(r["step"], pytest.approx(r[tag], rel=1e-6)) for r in records if tag in r] for tag in tags}


def _cfg(**run):
    return tiny_config(optim={"max_steps": 10}, run={"checkpoint_every": 5, "eval_every": 5, "log_every": 2, **run})


def test_tensorboard_gets_every_logged_scalar_and_training_is_unchanged(tmp_path: Path) -> None:
    tracked = train(_cfg(log_with="tensorboard"), tmp_path / "tb", progress=False)
    records = _records(tmp_path / "tb")
    assert [r["step"] for r in records] == [2, 4, 5, 6, 8, 10]
    scalars = _scalars(tmp_path / "tb")
    assert sorted(scalars) == ["heldout_loss", "heldout_loss_raw", "loss", "lr", "time", "train_eval_loss"]
    assert scalars == _expected(records)
    hparams = list((tmp_path / "tb" / "tracking" / "hdiff").rglob("hparams.yml"))
    assert len(hparams) == 1 and "optim.lr: 0.003" in hparams[0].read_text()  # the config, flattened
    # log_with = "none" (the default): no tracking/ and the same run, to the bit
    plain = train(_cfg(), tmp_path / "plain", progress=False)
    assert not (tmp_path / "plain" / "tracking").exists()
    strip = lambda rs: [{k: v for k, v in r.items() if k != "time"} for r in rs]  # noqa: E731
    assert strip(_records(tmp_path / "plain")) == strip(records)
    assert (plain.loss, plain.heldout_loss) == (tracked.loss, tracked.heldout_loss)
    a, b = ((tmp_path / d / "model" / "diffusion_pytorch_model.safetensors").read_bytes() for d in ("tb", "plain"))
    assert a == b


def test_a_resumed_run_shows_each_step_once(tmp_path: Path) -> None:
    cfg = _cfg(log_with="tensorboard")

    class Crash(Exception):
        pass

    def crash(step: int) -> None:
        if step == 7:
            raise Crash

    with pytest.raises(Crash):
        train(cfg, tmp_path, callback=crash, progress=False)
    assert [s for s, _ in _scalars(tmp_path)["loss"]] == [2, 4, 5, 6]  # the trackers were flushed on the crash
    train(cfg, tmp_path, resume=True, progress=False)  # from the checkpoint at step 5: steps 6-10 again
    records = _records(tmp_path)
    assert [r["step"] for r in records] == [2, 4, 5, 6, 8, 10]
    assert _scalars(tmp_path) == _expected(records)  # step 6 of the first segment is purged, not shown twice


def test_log_with_is_validated() -> None:
    with pytest.raises(ValueError, match=r"run.log_with must be \"none\" or one of .*'tensorboard'.*got 'tensorbord'"):
        _cfg(log_with="tensorbord")
    for bad in ("all", ["none", "tensorboard"], ["tensorboard", "tensorboard"]):
        with pytest.raises(ValueError, match="run.log_with"):
            _cfg(log_with=bad)
    assert _cfg(log_with=["tensorboard"]).run.log_with == ["tensorboard"]
    with pytest.raises(ValueError, match="run.project_name"):
        _cfg(project_name="../elsewhere")


def test_a_tracker_that_is_not_installed_is_refused_before_anything_is_written(tmp_path: Path, monkeypatch) -> None:
    import accelerate.tracking

    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: [])
    with pytest.raises(ValueError, match=r"run.log_with = 'tensorboard': the tensorboard tracker is not installed"):
        train(_cfg(log_with="tensorboard"), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_compare_tracks_each_cell_in_its_own_run_directory(tmp_path: Path) -> None:
    from hdiff.cli import main
    from hdiff.config import to_toml

    config = {
        "ghm": {"vocab_size": 4, "num_rules": 2, "branching": 2, "depth": 3, "seed": 0},
        "model": {"kind": "tree_unet", "channels": 8},
        "data": {"n_heldout": 16},
        "optim": {"batch_size": 8, "warmup_steps": 1},
        "run": {"log_every": 2, "eval_every": 4, "checkpoint_every": 4, "log_with": "tensorboard"},
        "compare": {"n_train": [8, 16], "max_steps": [4], "num_samples": 8, "nelbo_samples": 8, "nelbo_draws": 2,
                    "kl_samples": 4, "kl_bins": 2, "panel_size": 2,
                    "samplers": [{"name": "fixed", "scheduler": "masked", "unmasking": "fixed", "steps": 0}]},
    }
    (tmp_path / "c.toml").write_text(to_toml(config))
    assert main(["compare", "--config", str(tmp_path / "c.toml"), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    runs = sorted((tmp_path / "out" / "runs").iterdir())
    assert [r.name.split("-")[0] for r in runs] == ["tree_unet_n16", "tree_unet_n8"]
    for run in runs:
        assert _scalars(run) == _expected(_records(run))
