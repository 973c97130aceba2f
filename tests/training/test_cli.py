"""``hdiff train`` end to end on a tiny config, then ``hdiff sample --denoiser <run dir>``.

``main`` reports errors as one line on stderr and exit status 2 (tests/test_cli_errors.py covers the
general rule); here each error is checked for the field or flag it names.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hdiff.cli import main
from hdiff.training import train_config_to_toml

from .conftest import tiny_config


def _fails(capsys: pytest.CaptureFixture, args: list[str], match: str, code: int = 2) -> str:
    """Run ``main(args)``; it must exit with ``code`` and print one error line containing ``match``."""
    capsys.readouterr()
    assert main(args) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hdiff") and match in err[0], err
    return err[0]


def test_train_then_sample(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "tiny.toml"
    config.write_text(train_config_to_toml(tiny_config(run={"checkpoint_every": 10, "eval_every": 10})))
    out = tmp_path / "run"
    args = ["train", "--config", str(config), "--out", str(out), "--n-train", "128", "--max-steps", "20"]
    assert main(args) == 0
    assert "trained 20 steps" in capsys.readouterr().out
    for name in ("model/config.json", "model_raw/config.json", "config.toml", "ghm/ghm.json", "train_meta.json",
                 "log.jsonl", "checkpoints/step_000020"):
        assert (out / name).exists(), name
    meta = json.loads((out / "train_meta.json").read_text())
    assert meta["n_train"] == 128 and meta["steps"] == 20  # the command-line overrides won
    assert "n_train = 128" in (out / "config.toml").read_text()

    _fails(capsys, args, "--resume")
    assert main(args[:-1] + ["30", "--resume"]) == 0  # extend the run by 10 steps
    assert json.loads((out / "train_meta.json").read_text())["steps"] == 30

    samples = tmp_path / "samples"
    assert main(["sample", "--denoiser", str(out), "--num", "32", "--steps", "8", "--out", str(samples)]) == 0
    metrics = json.loads((samples / "metrics.json").read_text())
    assert metrics["process"] == "masking" and metrics["denoiser"] == str(out)
    assert 0.0 <= metrics["validity"] <= 1.0
    _fails(capsys, ["sample", "--denoiser", str(out), "--process", "uniform", "--scheduler", "uniform",
                    "--out", str(samples)], "trained with masking noise")


def test_sample_needs_a_ghm_for_the_oracle_and_a_run_dir_otherwise(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    _fails(capsys, ["sample", "--out", str(tmp_path / "s")], "--ghm is required")
    _fails(capsys, ["sample", "--denoiser", str(tmp_path), "--out", str(tmp_path / "s")], "trained run directory")
    assert not (tmp_path / "s").exists()  # refused before anything was written


def test_bad_config_file_names_the_key(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(train_config_to_toml(tiny_config()) + "\n[extra]\nx = 1\n")
    _fails(capsys, ["train", "--config", str(config), "--out", str(tmp_path / "run")], "extra")
    config.write_text(train_config_to_toml(tiny_config()).replace("batch_size = 32", 'batch_size = "32"'))
    _fails(capsys, ["train", "--config", str(config), "--out", str(tmp_path / "run")], "batch_size")
    assert not (tmp_path / "run").exists()
