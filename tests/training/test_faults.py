"""Faults injected into training runs: kills, a second writer, divergence, damaged and malicious checkpoints.

Each test breaks a run the way it breaks in practice (a signal from outside, a second process on
the same ``--out``, a NaN step, a truncated file, a planted pickle) and checks that hdiff loses
nothing, runs nothing it should not, and says what happened. (hdiff installs no signal handler, so
SIGTERM ends a run exactly as SIGKILL does; the kill test uses SIGKILL, the harsher.)
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hdiff.cli import main
from hdiff.runs import LOCK_FILE
from hdiff.training import TrainingDiverged, latest_checkpoint, list_checkpoints, train, train_config_to_toml
from hdiff.training import trainer as trainer_module

from .conftest import tiny_config

REPO = Path(__file__).resolve().parents[2]


def _records(out: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "time"} for r in map(json.loads, (out / "log.jsonl").open())]


def _weights(out: Path) -> dict[str, bytes]:
    return {sub: (out / sub / "diffusion_pytorch_model.safetensors").read_bytes() for sub in ("model", "model_raw")}


def _start(config: Path, out: Path, *extra: str) -> subprocess.Popen:
    """``hdiff train`` in a subprocess (one thread, like the in-process runs it is compared with)."""
    return subprocess.Popen([sys.executable, "-m", "hdiff.cli", "train", "--config", str(config), "--out", str(out),
                             *extra], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})


def _wait_for_checkpoint(procs: list[subprocess.Popen], out: Path) -> int:
    """Poll until ``out`` has a checkpoint; return its step."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        latest = latest_checkpoint(out)
        if latest is not None:
            return latest[0]
        assert any(p.poll() is None for p in procs), [p.stderr.read() for p in procs]
        time.sleep(0.02)
    raise AssertionError("no checkpoint appeared")


def test_a_second_writer_is_refused_and_a_killed_run_resumes_bit_identically(tmp_path: Path, capsys) -> None:
    cfg = tiny_config(model={"channels": 16}, data={"n_train": 128, "n_heldout": 64},
                      optim={"max_steps": 200, "batch_size": 16}, run={"checkpoint_every": 10, "eval_every": 50,
                                                                      "log_every": 10, "keep_checkpoints": 2})
    config = tmp_path / "tiny.toml"
    config.write_text(train_config_to_toml(cfg))
    out = tmp_path / "killed"
    proc = _start(config, out)
    try:
        _wait_for_checkpoint([proc], out)
        proc.send_signal(signal.SIGSTOP)  # keep it mid-run, holding the lock, while a second writer tries
        capsys.readouterr()
        # a second `hdiff train` (this process) on the same --out exits at once, naming the holder
        assert main(["train", "--config", str(config), "--out", str(out), "--resume"]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"is in use by hdiff train (pid {proc.pid} " in err[0], err
        proc.send_signal(signal.SIGKILL)  # killed mid-run: no cleanup, the lock file stays behind
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert 0 < latest_checkpoint(out)[0] < 200 and not (out / "model").exists()
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == proc.pid  # the dead holder's lock ...

    assert main(["train", "--config", str(config), "--out", str(out), "--resume"]) == 0  # ... is taken over
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "whole")]) == 0
    assert _records(out) == _records(tmp_path / "whole")  # the same curve, no step lost or repeated
    assert _weights(out) == _weights(tmp_path / "whole")  # bit-identical weights


class _Boom(Exception):
    pass


def test_divergence_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path: Path, monkeypatch) -> None:
    cfg = tiny_config(optim={"max_steps": 20}, run={"checkpoint_every": 5, "eval_every": 10})
    real, calls = trainer_module.diffusion_loss, []

    def nan_at_step_13(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == 13 else loss

    monkeypatch.setattr(trainer_module, "diffusion_loss", nan_at_step_13)
    with pytest.raises(TrainingDiverged, match=r"diverged in '.*run'.*loss is nan at step 13.*checkpoint \(step 10\)"):
        train(cfg, tmp_path / "run")
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [5, 10]  # nothing of the bad step was saved
    assert not (tmp_path / "run" / "model").exists()
    monkeypatch.setattr(trainer_module, "diffusion_loss", real)
    assert train(cfg, tmp_path / "run", resume=True).step == 20  # the last good checkpoint resumes


def test_a_too_large_learning_rate_exits_nonzero_naming_the_run(tmp_path: Path, capsys) -> None:
    config = tmp_path / "c.toml"
    config.write_text(train_config_to_toml(tiny_config(optim={"lr": 1e30, "max_steps": 20, "grad_clip": 0.0},
                                                       run={"checkpoint_every": 1})))
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "training diverged in" in err[0] and "run" in err[0], err
    assert not (tmp_path / "run" / "model").exists()  # no NaN model saved
    steps = [s for s, _ in list_checkpoints(tmp_path / "run")]
    assert steps and all(torch.isfinite(t).all() for t in _checkpoint_weights(tmp_path / "run", steps[-1]))
    config.write_text(config.read_text().replace("lr = 1e+30", "lr = inf"))
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "inf")]) == 2
    assert "optim.lr must be a finite number" in capsys.readouterr().err


def _checkpoint_weights(out: Path, step: int) -> list[torch.Tensor]:
    from safetensors.torch import load_file

    return list(load_file(str(out / "checkpoints" / f"step_{step:06d}" / "model.safetensors")).values())


def test_a_truncated_latest_checkpoint_falls_back_to_the_previous_one(tmp_path: Path) -> None:
    cfg = tiny_config(optim={"max_steps": 15}, run={"checkpoint_every": 5, "eval_every": 5, "keep_checkpoints": 3})
    train(cfg, tmp_path / "whole")
    out = tmp_path / "cut"
    shutil.copytree(tmp_path / "whole", out)
    shutil.rmtree(out / "model")  # as if killed before the final save
    shutil.rmtree(out / "model_raw")
    weights = out / "checkpoints" / "step_000015" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.warns(RuntimeWarning, match=r"step_000015.*model\.safetensors.*changed or truncated"):
        assert train(cfg, out, resume=True).step == 15  # redone from step 10
    assert _records(out) == _records(tmp_path / "whole") and _weights(out) == _weights(tmp_path / "whole")


class _Evil:
    """Unpickling this runs ``os.system``: what a crafted checkpoint would do on ``--resume``."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


def test_resume_never_unpickles_a_planted_checkpoint(tmp_path: Path) -> None:
    cfg = tiny_config(optim={"max_steps": 10}, run={"checkpoint_every": 5, "eval_every": 5, "keep_checkpoints": 3})
    train(cfg, tmp_path / "run")
    sentinel = tmp_path / "pwned"
    ckpt = tmp_path / "run" / "checkpoints" / "step_000010"
    # the current format lists every file's hash: a planted pickle is a changed file, skipped with a warning
    (ckpt / "optimizer.bin").write_bytes(pickle.dumps(_Evil(sentinel)))
    with pytest.warns(RuntimeWarning, match=r"optimizer\.bin.*changed or truncated"):
        assert train(cfg, tmp_path / "run", resume=True).step == 10  # redone from step 5: step 10 saved anew
    assert not sentinel.exists()

    marker = json.loads((ckpt / "hdiff_state.json").read_text())
    # the older format (no hashes; the EMA pickled by accelerate, which unpickled it with weights_only=False)
    from safetensors.torch import load_file

    shadow = load_file(str(ckpt / "hdiff_ema.safetensors"))
    ema = {**marker["ema"], "shadow_params": [shadow[f"shadow.{i}"] for i in range(len(shadow))]}
    process = json.loads((ckpt / "hdiff_process_0.json").read_text())
    process["noise_rng"] = torch.frombuffer(bytearray(base64.b64decode(process["noise_rng"])), dtype=torch.uint8)
    for name in ("hdiff_ema.safetensors", "hdiff_process_0.json"):
        (ckpt / name).unlink()
    (ckpt / "hdiff_state.json").write_text(json.dumps({"step": 10, "num_processes": 1}))
    planted = {"custom_checkpoint_0.pkl": ema, "hdiff_process_0.pt": process}
    for name in planted:
        for other, value in planted.items():
            (ckpt / other).write_bytes(pickle.dumps(_Evil(sentinel)) if other == name else b"")
            if other != name:
                torch.save(value, ckpt / other)
        with pytest.raises(ValueError, match=rf"{name.replace('.', '[.]')}: refused to load"):
            train(cfg, tmp_path / "run", resume=True)
        assert not sentinel.exists()
    for name, value in planted.items():  # an honest old checkpoint still resumes
        torch.save(value, ckpt / name)
    assert train(cfg, tmp_path / "run", resume=True).step == 10
