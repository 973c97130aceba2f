"""Every CLI error is one line on stderr naming the file or field: exit 2 for usage / config errors, 1 at run time.

Each case below was seen as a traceback, a silent success or a half-written directory; here each
must be refused before anything is written, in one line, and ``--debug`` / ``HDIFF_DEBUG=1`` must
bring the traceback back.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hdiff.cli import main
from hdiff.config import to_toml
from hdiff.runs import claim

REPO = Path(__file__).resolve().parents[1]
GHM_TOML = "[ghm]\nvocab_size = 4\nnum_rules = 2\nbranching = 2\ndepth = 2\n"
TRAIN = {
    "ghm": {"vocab_size": 4, "num_rules": 2, "branching": 2, "depth": 2},
    "model": {"kind": "tree_unet", "channels": 8},
    "data": {"n_train": 32, "n_heldout": 16},
    "optim": {"max_steps": 2, "batch_size": 8, "warmup_steps": 0},
    "run": {"checkpoint_every": 2, "eval_every": 2, "log_every": 1},
}


def _error(capsys: pytest.CaptureFixture, args: list[str], *matches: str, code: int = 2) -> str:
    """``main(args)`` must return ``code`` and print exactly one ``hdiff...error:`` line holding every match."""
    capsys.readouterr()
    assert main(args) == code
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "error:" in err[0], err
    for m in matches:
        assert m in err[0], (m, err[0])
    return err[0]


def _toml(tmp_path: Path, data: dict, name: str = "c.toml") -> Path:
    path = tmp_path / name
    path.write_text(to_toml(data))
    return path


def _with(table: str, **values) -> dict:
    return {**TRAIN, table: {**TRAIN.get(table, {}), **values}}


def test_missing_and_malformed_config_files(tmp_path: Path, capsys) -> None:
    for command in ("train", "compare", "classify", "probe"):
        _error(capsys, [command, "--config", str(tmp_path / "nope.toml"), "--out", str(tmp_path / "o")],
               "nope.toml", "does not exist")
    bad = tmp_path / "bad.toml"
    bad.write_text("[optim\nlr = 1\n")
    _error(capsys, ["train", "--config", str(bad), "--out", str(tmp_path / "o")], "bad.toml: not valid TOML", "line 1")
    _error(capsys, ["sample", "--ghm", str(bad), "--out", str(tmp_path / "o")], "bad.toml: not valid TOML")
    _error(capsys, ["train", "--out", "x"], "hdiff train: error:", "--config")  # argparse, one line too
    _error(capsys, ["sample", "--steps", "many", "--out", "x"], "--steps", "invalid int")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("table, values, match", [
    ("run", {"seed": -1}, "run.seed must be >= 0"),
    ("ghm", {"vocab_size": 1, "num_rules": 1}, "ghm.vocab_size must be >= 2"),
    ("optim", {"grad_clip": float("nan")}, "optim.grad_clip must be a finite number"),
    ("optim", {"lr": float("inf")}, "optim.lr must be a finite number"),
    ("model", {"options": {"width": 3}}, "model.options.width: not an argument of TreeUNet"),
    ("ghm", {"depth": 30}, "ghm.depth / ghm.vocab_size: branching**depth = 2**30 = 1073741824 leaves"),
])
def test_bad_training_configs_write_nothing(tmp_path: Path, capsys, table: str, values: dict, match: str) -> None:
    out = tmp_path / "run"
    _error(capsys, ["train", "--config", str(_toml(tmp_path, _with(table, **values))), "--out", str(out)], match)
    assert not out.exists()  # validated before anything was written: no stub directory


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is honoured on a GPU")
def test_fp16_on_the_cpu_is_refused_not_ignored(tmp_path: Path, capsys) -> None:
    config = _toml(tmp_path, _with("run", mixed_precision="fp16"))
    _error(capsys, ["train", "--config", str(config), "--out", str(tmp_path / "run")], "run.mixed_precision")
    assert not (tmp_path / "run").exists()


def test_bad_classify_and_compare_configs(tmp_path: Path, capsys) -> None:
    classify = {"n_train": [8], "n_test": 8, "ghm": TRAIN["ghm"], "optim": {"eval_every": 0}}
    _error(capsys, ["classify", "--config", str(_toml(tmp_path, classify)), "--out", str(tmp_path / "c")],
           "optim.eval_every must be >= 1")
    classify["optim"] = {"lr": 0.0}
    _error(capsys, ["classify", "--config", str(_toml(tmp_path, classify)), "--out", str(tmp_path / "c")], "optim.lr")
    sampler = {"name": "long", "scheduler": "masked", "steps": 2000}
    compare = {k: v for k, v in TRAIN.items() if k != "data"}
    compare["compare"] = {"n_train": [8], "max_steps": [2], "samplers": [sampler]}
    _error(capsys, ["compare", "--config", str(_toml(tmp_path, compare)), "--out", str(tmp_path / "s")],
           "compare.samplers (long).steps = 2000", "[1, 1000]")
    big = {**compare, "ghm": {**TRAIN["ghm"], "depth": 11}}  # steps = 0: one per leaf, 2048 > 1000
    big["compare"] = {**compare["compare"], "samplers": [{"name": "fixed", "scheduler": "masked", "steps": 0,
                                                         "unmasking": "fixed"}]}
    _error(capsys, ["compare", "--config", str(_toml(tmp_path, big)), "--out", str(tmp_path / "s")], "2048")
    assert not (tmp_path / "c").exists() and not (tmp_path / "s").exists()


def test_scheduler_and_process_must_pair_before_anything_else(tmp_path: Path, capsys) -> None:
    missing = str(tmp_path / "no_such_ghm.toml")  # never read: the pairing is checked first
    for process, scheduler, use in (("uniform", "masked", "uniform"), ("masked", "discrete-ddim", "masked"),
                                    ("masking", "ddim", "masked"), ("gaussian", "uniform", "ddpm")):
        _error(capsys, ["sample", "--ghm", missing, "--process", process, "--scheduler", scheduler,
                        "--out", str(tmp_path / "o")], f"scheduler {scheduler!r} does not sample", use)
    assert not (tmp_path / "o").exists()


def test_output_directories_of_other_commands_are_refused(tmp_path: Path, capsys) -> None:
    sweep = claim(tmp_path / "sweep", "compare")
    (sweep / "metrics.json").write_text("{}")
    (sweep / "config.toml").write_text("")
    run = claim(tmp_path / "run", "train")
    ghm, config = tmp_path / "g.toml", _toml(tmp_path, TRAIN)
    ghm.write_text(GHM_TOML)
    _error(capsys, ["train", "--config", str(config), "--out", str(sweep)], "belongs to hdiff compare")
    _error(capsys, ["sample", "--ghm", str(ghm), "--out", str(sweep)], "belongs to hdiff compare")
    _error(capsys, ["demo", "--out", str(run)], "belongs to hdiff train")
    compare = {k: v for k, v in TRAIN.items() if k != "data"}
    compare["compare"] = {"n_train": [8], "max_steps": [2],
                          "samplers": [{"name": "b", "scheduler": "masked", "steps": 4}]}
    _error(capsys, ["compare", "--config", str(_toml(tmp_path, compare, "cmp.toml")), "--out", str(run)],
           "belongs to hdiff train")
    assert (sweep / "metrics.json").read_text() == "{}" and (sweep / "config.toml").read_text() == ""
    (tmp_path / "file").write_text("")
    _error(capsys, ["sample", "--ghm", str(ghm), "--out", str(tmp_path / "file")], "is a file")
    _error(capsys, ["sample", "--ghm", str(ghm), "--out", "/proc/self/hdiff"], "not writable")


def test_bad_inputs_to_the_library(tmp_path: Path) -> None:
    from hdiff.bp import posterior
    from hdiff.ghm import GHM

    ghm = GHM.random_hierarchy(4, 2, 2, 2)
    with pytest.raises(ValueError, match="n must be a non-negative int, got True"):
        ghm.sample(True)
    with pytest.raises(ValueError, match="meta device"):
        posterior(ghm, torch.empty(2, 4, 4, device="meta"))
    with pytest.raises(ValueError, match=r"2\*\*30 = 1073741824 leaves.*8 GiB"):
        GHM.random_hierarchy(8, 2, 2, 30)  # refused from its size, before anything is allocated
    with pytest.raises(ValueError, match="parameters would need"):
        GHM.random_factorized(50_000, 2, 2)


def test_dpm_solver_at_1000_steps_gives_valid_samples(tmp_path: Path) -> None:
    from hdiff.denoisers import BPDenoiser
    from hdiff.ghm import GHM
    from hdiff.noise import GaussianProcess
    from hdiff.sampling import sample
    from hdiff.schedulers import make_scheduler

    ghm = GHM.random_hierarchy(4, 2, 2, 2, seed=0)
    x = sample(BPDenoiser(ghm, GaussianProcess(4)), make_scheduler("dpmsolver"), batch_size=8,
               num_inference_steps=1000, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(ghm.log_prob(x)).all()  # was: NaN states, then an error


def test_debug_shows_the_traceback(tmp_path: Path, monkeypatch, capsys) -> None:
    args = ["sample", "--ghm", str(tmp_path / "x.toml"), "--process", "uniform", "--scheduler", "masked",
            "--out", str(tmp_path / "o")]
    with pytest.raises(ValueError, match="does not sample uniform noise"):
        main(["--debug", *args])
    monkeypatch.setenv("HDIFF_DEBUG", "1")
    with pytest.raises(ValueError, match="does not sample uniform noise"):
        main(args)


def test_a_real_process_prints_one_line_and_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[ghm]\nvocab_size = 8\nvocab_size = 9\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HDIFF_DEBUG": ""}
    proc = subprocess.run([sys.executable, "-m", "hdiff.cli", "probe", "--config", str(bad), "--out",
                           str(tmp_path / "o")], cwd=REPO, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"hdiff: error: {bad}: not valid TOML: Cannot overwrite a value "
                                                "(at line 3, column 15)"], proc.stderr
    assert not (tmp_path / "o").exists() and json.dumps(proc.stdout) == '""'
