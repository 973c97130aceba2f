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
