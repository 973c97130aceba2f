"""Damaged or swapped files of a run directory: each is found on load and named, never used silently."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from hdiff.cli import main
from hdiff.ghm import GHM
from hdiff.training import load_trained, train

from .conftest import tiny_config


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two finished tiny runs on different GHMs (``a`` and ``b``); tests copy them before damaging anything."""
    root = tmp_path_factory.mktemp("runs")
    cfg = tiny_config(optim={"max_steps": 4}, run={"checkpoint_every": 4, "eval_every": 4})
    train(cfg, root / "a")
    train(cfg.replace(**{"ghm.seed": 1}), root / "b")
    return root


def _copy(runs: Path, tmp_path: Path, name: str = "a") -> Path:
    return Path(shutil.copytree(runs / name, tmp_path / name))


def test_the_ghm_hash_is_recorded_and_checked(runs: Path) -> None:
    model, ghm, cfg = load_trained(runs / "a")
    recorded = json.loads((runs / "a" / "train_meta.json").read_text())["ghm_sha256"]
    assert ghm.sha256() == recorded == cfg.ghm.build().sha256()
    assert json.loads((runs / "a" / "ghm" / "ghm.json").read_text())["sha256"] == recorded
    assert GHM.load(runs / "b" / "ghm").sha256() != recorded


def test_another_runs_ghm_is_refused(runs: Path, tmp_path: Path) -> None:
    run = _copy(runs, tmp_path)
    shutil.rmtree(run / "ghm")
    shutil.copytree(runs / "b" / "ghm", run / "ghm")  # a valid GHM, but not this run's
    with pytest.raises(ValueError, match=r"ghm: not the GHM this run was trained on"):
        load_trained(run)


def test_a_kernel_deleted_from_ghm_json_is_refused(runs: Path, tmp_path: Path) -> None:
    run = _copy(runs, tmp_path)
    meta = json.loads((run / "ghm" / "ghm.json").read_text())
    meta["kernels"].pop()  # loads as a shallower, self-consistent GHM without the hash
    (run / "ghm" / "ghm.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="were changed since they were saved"):
        GHM.load(run / "ghm")
    del meta["sha256"]  # an older file without a hash: the run's own record still catches it
    (run / "ghm" / "ghm.json").write_text(json.dumps(meta))
    assert GHM.load(run / "ghm").depth == 2
    with pytest.raises(ValueError, match="not the GHM this run was trained on"):
        load_trained(run)


@pytest.mark.parametrize("name, match", [
    ("ghm/ghm.json", r"ghm\.json: corrupt or truncated JSON"),
    ("ghm/ghm.safetensors", r"ghm\.safetensors: corrupt or truncated safetensors"),
    ("model/diffusion_pytorch_model.safetensors", r"model: cannot load the model"),
    ("train_meta.json", r"train_meta\.json: corrupt or truncated JSON"),
])
def test_truncated_files_are_named(runs: Path, tmp_path: Path, name: str, match: str) -> None:
    run = _copy(runs, tmp_path)
    data = (run / name).read_bytes()
    (run / name).write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match=match):
        load_trained(run)


def test_sampling_from_a_damaged_run_is_one_line_naming_the_file(runs: Path, tmp_path: Path, capsys) -> None:
    run = _copy(runs, tmp_path)
    (run / "ghm" / "ghm.safetensors").write_bytes(b"\0" * 16)
    assert main(["sample", "--denoiser", str(run), "--num", "4", "--steps", "4", "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ghm.safetensors: corrupt or truncated" in err[0], err
    assert not (tmp_path / "s").exists()
