"""The width experiment: KL(oracle || BPUNet_W) per noise level vs W and the parameters, end to end on a tiny RHM."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from hdiff.config import from_dict
from hdiff.experiments.width import WidthConfig, format_width, load_width_config, run_width, summarise

ROOT = Path(__file__).resolve().parents[2]

TINY = """
[ghm]
vocab_size = 4
num_rules = 2
depth = 3
[width]
widths = [16, 1, 4]
alphas = [0.3, 0.7]
num_samples = 48
epsilon = 1e-3
"""


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny networks on a shared 2-core machine: one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, WidthConfig, dict]:
    out = tmp_path_factory.mktemp("width")
    path = out / "w.toml"
    path.write_text(TINY)
    cfg = load_width_config(path)
    torch.set_num_threads(1)
    return out / "run", cfg, run_width(cfg, out / "run")


def test_run_writes_every_file(tiny_run):
    out, cfg, metrics = tiny_run
    for name in ("metrics.json", "metrics.csv", "width.png", "config.toml"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert not list(out.glob(".*"))  # no temporary left behind
    assert load_width_config(out / "config.toml") == cfg  # the resolved config reads back as the same
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["min_width_for_epsilon"] == metrics["min_width_for_epsilon"]
    assert [c["width"] for c in saved["curves"]] == [1, 4, 16]  # ascending, whatever the config's order
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == (3 + 1) * 2  # one row per (W, alpha), the exact network's included
    assert {r["width"] for r in rows} == {"exact", "1", "4", "16"}
    assert {"alpha", "kl", "num_parameters", "hidden_units", "fit_error", "num_leaves"} <= set(rows[0])


def test_kl_falls_with_width_and_the_exact_network_is_bp(tiny_run):
    _, _, metrics = tiny_run
    mean_kl = [sum(c["kl"]) / len(c["kl"]) for c in metrics["curves"]]
    assert mean_kl[0] > mean_kl[1] > mean_kl[2] > 0
    assert max(abs(k) for k in metrics["exact"]["kl"]) < 1e-6  # float32 round-off only
    params = [c["num_parameters"] for c in metrics["curves"]]
    assert metrics["exact"]["num_parameters"] < params[0] < params[1] < params[2]
    units = [c["hidden_units"] for c in metrics["curves"]]
    assert units[1] == 4 * units[0] and units[2] == 16 * units[0]
    best = metrics["min_width_for_epsilon"]
    assert best is None or max(next(c for c in metrics["curves"] if c["width"] == best)["kl"]) < 1e-3


def test_format_width(tiny_run):
    _, _, metrics = tiny_run
    text = format_width(metrics)
    lines = text.splitlines()
    assert lines[0].split()[:2] == ["W", "params"] and "KL a=0.3" in lines[0] and "KL a=0.7" in lines[0]
    assert lines[1].split()[0] == "exact" and [ln.split()[0] for ln in lines[2:5]] == ["1", "4", "16"]
    assert "min width for epsilon = 0.001" in text


def test_summarise_min_width():
    def rows(kls: dict) -> list[dict]:
        return [{"width": w, "alpha": a, "kl": k[i], "num_parameters": 10 + (w or 0), "hidden_units": 5 * (w or 0),
                 "fit_error": 0.0} for i, a in enumerate([0.2, 0.8]) for w, k in kls.items()]

    kls = {None: [0.0, 0.0], 1: [1e-1, 1e-2], 2: [5e-3, 2e-4], 4: [1e-4, math.nan]}
    assert summarise(rows(kls), [0.2, 0.8], 1e-2)["min_width_for_epsilon"] == 2
    s = summarise(rows(kls), [0.2, 0.8], 1e-3)  # the nan alpha (nothing noised) is ignored, not "within"
    assert s["min_width_for_epsilon"] == 4 and s["min_width_parameters"] == 14 and s["min_width_hidden_units"] == 20
    assert summarise(rows(kls), [0.2, 0.8], 1e-5)["min_width_for_epsilon"] is None
    with pytest.raises(ValueError, match="exact"):
        summarise([r for r in rows(kls) if r["width"] is not None], [0.2, 0.8], 1e-3)


@pytest.mark.parametrize("data,field", [
    ({"width": {"widht": [1]}}, "widht"),
    ({"widths": [1]}, "widths"),  # a [width] key at the top level
    ({"ghm": {"vocab": 4}}, "vocab"),
    ({"width": {"widths": [0, 2]}}, "width.widths"),
    ({"width": {"widths": []}}, "width.widths"),
    ({"width": {"widths": [2, 2]}}, "width.widths"),
    ({"width": {"alphas": [0.5, 1.5]}}, "width.alphas"),
    ({"width": {"num_samples": 0}}, "width.num_samples"),
    ({"width": {"seed": -1}}, "width.seed"),
    ({"width": {"epsilon": 0.0}}, "width.epsilon"),
    ({"width": {"process": "blur"}}, "width.process"),
    ({"width": {"activation": "tanh"}}, "width.activation"),
    ({"threads": -1}, "threads"),
])
def test_bad_config_names_the_field(data, field):
    with pytest.raises(ValueError, match=field):
        from_dict(WidthConfig, data, "width.toml")


def test_default_config_is_the_demo_ghm():
    cfg = load_width_config(ROOT / "configs" / "width.toml")
    g = cfg.ghm
    assert (g.family, g.vocab_size, g.num_rules, g.branching, g.depth) == ("hierarchy", 8, 2, 2, 4)
    assert cfg.width.process == "masking" and cfg.width.widths == [1, 2, 4, 8, 16, 32]
