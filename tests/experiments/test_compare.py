"""``hdiff compare`` end to end on a tiny config, its resume, and its config checks."""

import csv
import json

import pytest

from hdiff.cli import main
from hdiff.experiments import compare as compare_module
from hdiff.experiments.compare import run_compare
from hdiff.experiments.compare_config import compare_config_from_dict, load_compare_config
from hdiff.config import to_toml

TINY = {
    "ghm": {"vocab_size": 4, "num_rules": 2, "branching": 2, "depth": 3, "seed": 0},
    "model": {"kind": "tree_unet", "channels": 16},
    "noise": {"process": "masking"},
    "data": {"n_heldout": 64},
    "optim": {"batch_size": 16, "warmup_steps": 2},
    "run": {"log_every": 10, "eval_every": 20, "checkpoint_every": 10},
    "compare": {"n_train": [8, 32], "max_steps": [12, 20], "num_samples": 48, "nelbo_samples": 24, "nelbo_draws": 4,
                "kl_samples": 8, "kl_bins": 4, "panel_size": 4,
                "samplers": [{"name": "fixed", "scheduler": "masked", "unmasking": "fixed", "steps": 0},
                             {"name": "bern", "scheduler": "masked", "steps": 6}]},
}
TIMING = ("train_time_s", "eval_time_s")


def _write(tmp_path, data, name="tiny.toml"):
    path = tmp_path / name
    path.write_text(to_toml(data))
    return path


def _rows(out):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in json.loads((out / "metrics.json").read_text())["rows"]]


def test_compare_end_to_end(tmp_path, capsys):
    path = _write(tmp_path, {**TINY, "compare": {**TINY["compare"], "baseline": True}})
    out = tmp_path / "out"
    assert main(["compare", "--config", str(path), "--out", str(out), "--quiet"]) == 0
    assert "report.html" in capsys.readouterr().out
    for f in ("metrics.json", "metrics.csv", "report.html", "report.md", "config.toml", "validity.png", "nelbo.png",
              "memorisation.png", "kl.png", "samples_fixed.png", "samples_bern.png",
              ):
        assert (out / f).is_file(), f
    assert "<img src=\"data:image/png;base64," in (out / "report.html").read_text()  # self-contained
    metrics = json.loads((out / "metrics.json").read_text())
    rows = metrics["rows"]
    assert {(r["n"], r["denoiser"]) for r in rows} == {(n, d) for n in (8, 32) for d in ("tree_unet", "unet_baseline", "oracle")}
    with open(out / "metrics.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 6 and "fixed.validity" in table[0] and "nelbo_bits_per_leaf" in table[0]
    exact, exact_se = metrics["heldout_nll_bits_per_leaf"], metrics["heldout_nll_se"]
    for r in rows:
        # the bounds hold (3 SE), for the oracle and for the learned models
        assert r["nelbo_bits_per_leaf"] + 3 * r["nelbo_se"] >= exact - 3 * exact_se
        assert r["fixed.level_validity_3"] == r["fixed.validity"]  # the top scale is the whole string
        if r["denoiser"] == "oracle":
            assert r["fixed.validity"] == 1.0  # one token per step is exact for the oracle
            assert abs(r["nelbo_bits_per_leaf"] - exact) < 4 * r["nelbo_se"] + 1e-9
        else:
            assert r["steps"] == {8: 12, 32: 20}[r["n"]] and len(r["kl_per_bin"]) == 4
    # the resolved config reads back as the same config
    assert load_compare_config(out / "config.toml") == load_compare_config(path)


def test_interrupted_sweep_resumes_and_matches(tmp_path, monkeypatch):
    path = _write(tmp_path, TINY)
    cfg = load_compare_config(path)
    run_compare(cfg, tmp_path / "whole", progress=False)

    real = compare_module.Sweep.run_cell
    calls = []

    def crash_on_third(self, denoiser, n):
        calls.append((denoiser, n))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, denoiser, n)

    monkeypatch.setattr(compare_module.Sweep, "run_cell", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        run_compare(cfg, tmp_path / "cut", progress=False)
    monkeypatch.setattr(compare_module.Sweep, "run_cell", real)
    done = sorted(p.name for p in (tmp_path / "cut" / "cells").iterdir())
    assert done == ["oracle_n8.json", "tree_unet_n8.json"]
    metrics = run_compare(cfg, tmp_path / "cut", progress=False)
    assert metrics["cells_skipped"] == 2
    assert _rows(tmp_path / "cut") == _rows(tmp_path / "whole")
    # a third run recomputes nothing
    stamp = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cut" / "cells").iterdir()}
    assert run_compare(cfg, tmp_path / "cut", progress=False)["cells_skipped"] == 4
    assert stamp == {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cut" / "cells").iterdir()}


def test_changed_evaluation_settings_redo_the_cells(tmp_path):
    cfg = compare_config_from_dict({**TINY, "compare": {**TINY["compare"], "n_train": [8], "max_steps": [6]}})
    run_compare(cfg, tmp_path / "out", progress=False)
    more = compare_config_from_dict({**TINY, "compare": {**TINY["compare"], "n_train": [8], "max_steps": [6],
                                                         "num_samples": 32}})
    assert run_compare(more, tmp_path / "out", progress=False)["cells_skipped"] == 0
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["rows"][0]["steps"] == 6


@pytest.mark.parametrize("change, match", [
    ({"compare": {**TINY["compare"], "typo": 1}}, "typo"),
    ({"data": {"n_train": 64}}, "data.n_train"),
    ({"compare": {**TINY["compare"], "max_steps": [1, 2, 3]}}, "compare.max_steps"),
    ({"compare": {**TINY["compare"], "n_train": [8, 8]}}, "compare.n_train"),
    ({"compare": {**TINY["compare"], "samplers": []}}, "compare.samplers"),
    ({"compare": {**TINY["compare"], "samplers": [{"name": "x", "scheduler": "ddim", "steps": 4}]}}, "scheduler"),
    ({"compare": {**TINY["compare"], "nelbo_draws": 1}}, "compare.nelbo_draws"),
    ({"compare": {**TINY["compare"], "samplers": [{"name": "x", "scheduler": "masked", "steps": 1001}]}},
     r"compare.samplers \(x\).steps = 1001"),
    ({"compare": {**TINY["compare"], "seed": -1}}, "compare.seed"),
    ({"model": {"kind": "nope"}}, "model.kind"),
])
def test_bad_configs_name_the_field(change, match):
    with pytest.raises((ValueError, TypeError), match=match):
        compare_config_from_dict({**TINY, **change})
    with pytest.raises(ValueError, match=r"\[compare\]"):
        compare_config_from_dict({k: v for k, v in TINY.items() if k != "compare"})


def test_shipped_configs_load():
    for name in ("configs/demo.toml", "configs/demo_gaussian.toml", "configs/demo_image.toml"):
        cfg = load_compare_config(name)
        assert cfg.compare.samplers and cfg.compare.n_train


def test_compare_on_image_ghms(tmp_path):
    data = {**TINY, "ghm": {"vocab_size": 3, "num_rules": 2, "branching": 4, "depth": 2, "layout": "image"},
            "compare": {**TINY["compare"], "n_train": [16], "max_steps": [6], "baseline": True}}
    metrics = run_compare(compare_config_from_dict(data), tmp_path / "img", progress=False)
    assert metrics["layout"] == "image" and len(metrics["rows"]) == 3
    oracle = next(r for r in metrics["rows"] if r["denoiser"] == "oracle")
    assert oracle["fixed.validity"] == 1.0
    assert (tmp_path / "img" / "samples_fixed.png").is_file()


@pytest.mark.parametrize("process, sampler", [("gaussian", {"name": "ddim", "scheduler": "ddim", "steps": 10}),
                                              ("uniform", {"name": "unif", "scheduler": "uniform", "steps": 10})])
def test_compare_with_other_noise(tmp_path, process, sampler):
    data = {**TINY, "noise": {"process": process},
            "compare": {**TINY["compare"], "n_train": [16], "max_steps": [6], "nelbo_draws": 16, "samplers": [sampler]}}
    metrics = run_compare(compare_config_from_dict(data), tmp_path / process, progress=False)
    assert metrics["process"] == process
    exact, exact_se = metrics["heldout_nll_bits_per_leaf"], metrics["heldout_nll_se"]
    for r in metrics["rows"]:
        assert r["nelbo_bits_per_leaf"] + 3 * r["nelbo_se"] >= exact - 3 * exact_se
    oracle = next(r for r in metrics["rows"] if r["denoiser"] == "oracle")
    assert abs(oracle["nelbo_bits_per_leaf"] - exact) < 4 * oracle["nelbo_se"] + 0.05


# ---------------------------------------------------------------- run directories, locks, faults (issue #12)
ONE = {**TINY, "compare": {**TINY["compare"], "n_train": [8], "max_steps": [6]}}


def _one(**changes):
    """:data:`ONE` with ``[compare]`` keys (``max_steps``) or ``[optim]`` keys (``lr``) changed."""
    data = {**ONE, "compare": dict(ONE["compare"]), "optim": dict(ONE["optim"])}
    for k, v in changes.items():
        data["compare" if k in data["compare"] else "optim"][k] = v
    return compare_config_from_dict(data)


def _run_dirs(out):
    return {p.name: p for p in (out / "runs").iterdir()}


def _model_bytes(run_dir):
    return (run_dir / "model" / "diffusion_pytorch_model.safetensors").read_bytes()


def test_a_changed_cell_trains_from_scratch_in_its_own_place(tmp_path):
    from hdiff.experiments.compare import Sweep, train_cell
    from hdiff.training import train

    out = tmp_path / "out"
    run_compare(_one(), out, progress=False)
    (six,) = _run_dirs(out).values()
    assert six.name.startswith("tree_unet_n8-")
    before = _model_bytes(six)
    metrics = run_compare(_one(max_steps=[4]), out, progress=False)  # fewer steps: not the old, longer model
    assert metrics["rows"][0]["steps"] == 4 and metrics["cells_skipped"] == 1  # the oracle's cell is reused
    four = next(p for p in _run_dirs(out).values() if p != six)
    assert _model_bytes(four) != before and _model_bytes(six) == before  # the old run is left as it was

    def cell(cfg):  # what run_compare does for the learned cell, without the evaluation
        run_dir = Sweep(cfg, out).run_dir("tree_unet", 8)
        train_cell(cfg.train_config(8, "tree_unet"), run_dir)
        return run_dir

    longer = _one(max_steps=[9])  # more steps: a fresh run of that config, not the old one extended
    train(longer.train_config(8, "tree_unet"), tmp_path / "fresh", progress=False)
    assert _model_bytes(cell(longer)) == _model_bytes(tmp_path / "fresh")
    cell(_one(lr=1e-3))  # another lr: every earlier run is still there
    assert len(_run_dirs(out)) == 4 and _model_bytes(six) == before and _model_bytes(four) != before


def test_a_run_directory_holding_another_config_is_kept_unless_overwrite(tmp_path):
    from hdiff.experiments.compare import Sweep, train_cell
    from hdiff.training import load_train_config

    out, cfg = tmp_path / "out", _one()
    run = Sweep(cfg, out).run_dir("tree_unet", 8)
    train_cell(cfg.train_config(8, "tree_unet").replace(**{"run.seed": 5}), run)  # someone else's run in its place
    with pytest.raises(ValueError, match=r"holds a run of another config \(it differs in \['run.seed'\]\).*--overwrite"):
        run_compare(cfg, out, progress=False)
    assert (run / "model").is_dir()  # nothing was deleted
    assert run_compare(cfg, out, progress=False, overwrite=True)["rows"][0]["steps"] == 6
    assert load_train_config(run / "config.toml").run.seed == 0  # retrained as this cell's own run


def test_damaged_cells_and_sample_panels_are_recomputed(tmp_path):
    out = tmp_path / "out"
    run_compare(_one(), out, progress=False)
    cell = out / "cells" / "tree_unet_n8.json"
    cell.write_text(cell.read_text()[:40])
    panel = out / "samples" / "oracle_n8.fixed.pt"
    panel.write_bytes(panel.read_bytes()[:30])
    (meta,) = (out / "runs").glob("*/train_meta.json")
    meta.write_text(meta.read_text()[:10])
    with pytest.warns(RuntimeWarning) as caught:
        metrics = run_compare(_one(), out, progress=False)
    text = " ".join(str(w.message) for w in caught)
    assert "tree_unet_n8.json: corrupt or truncated JSON" in text and "oracle_n8.fixed.pt: not a readable" in text
    assert "train_meta.json: corrupt or truncated JSON" in text  # the finished run is resumed at its end ...
    assert metrics["cells_skipped"] == 0 and json.loads(cell.read_text())["steps"] == 6
    assert json.loads(meta.read_text())["steps"] == 6  # ... which writes it again


def test_a_second_sweep_on_one_out_exits_at_once(tmp_path):
    import subprocess
    import sys

    from hdiff.runs import DirectoryLocked

    out = tmp_path / "out"
    out.mkdir()
    holder = ("import fcntl, json, os, sys, time\n"  # another process holding the directory's lock
              "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
              "fcntl.flock(fd, fcntl.LOCK_EX)\n"
              "os.write(fd, json.dumps({'pid': os.getpid(), 'host': 'h', 'command': 'compare'}).encode())\n"
              "print('locked', flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", holder, str(out / ".hdiff.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(DirectoryLocked, match=rf"in use by hdiff compare \(pid {proc.pid} on h"):
            run_compare(_one(), out, progress=False)
        assert sorted(p.name for p in out.iterdir()) == [".hdiff.lock"]  # nothing trained, nothing written
    finally:
        proc.kill()
        proc.wait()


def test_a_diverging_cell_is_named(tmp_path):
    from hdiff.training import TrainingDiverged

    with pytest.raises(TrainingDiverged, match=r"compare cell tree_unet_n8: training diverged"):
        run_compare(_one(lr=1e30), tmp_path / "out", progress=False)
