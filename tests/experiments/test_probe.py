"""``hdiff probe``: end to end on a tiny RHM, the alpha = 1 / alpha = 0 limits, the change statistics."""

import json
import math

import pytest
import torch

from hdiff.cli import main
from hdiff.config import GHMConfig, from_dict
from hdiff.experiments.probe import (ProbeConfig, change_statistics, crossing, forward_backward, transition,
                                    tree_distance)
from hdiff.noise import GaussianProcess, MaskingProcess, UniformProcess

TINY = """
depths = [2, 3]
processes = ["masking", "gaussian", "uniform"]
num_samples = 64
batch_size = 32
[ghm]
vocab_size = 4
num_rules = 2
[alphas]
masking = [0.0, 0.5, 1.0]
gaussian = [0.0, 0.5, 1.0]
uniform = [0.0, 1.0]
"""


def test_cli_end_to_end(tmp_path):
    cfg = tmp_path / "p.toml"
    cfg.write_text(TINY)
    out = tmp_path / "out"
    assert main(["probe", "--config", str(cfg), "--out", str(out)]) == 0
    for name in ("metrics.json", "metrics.csv", "probe.png", "config.toml"):
        assert (out / name).is_file()
    assert not list(out.glob(".*.tmp*"))
    curves = json.loads((out / "metrics.json").read_text())["curves"]
    assert sorted((c["process"], c["depth"]) for c in curves) == sorted(
        (p, d) for p in ("masking", "gaussian", "uniform") for d in (2, 3))
    for c in curves:
        assert len(c["level_kept"]) == len(c["alpha"]) and len(c["level_kept"][0]) == c["depth"] + 1
        assert len(c["covariance_by_distance"][0]) == c["depth"]
        assert c["class_kept"][-1] == 1.0 and c["changed_leaves"][-1] == 0.0
    assert len((out / "metrics.csv").read_text().strip().splitlines()) == 1 + 2 * (3 + 3 + 2)
    assert main(["probe", "--config", str(out / "config.toml"), "--out", str(out)]) == 0


@pytest.mark.parametrize("process_cls", [MaskingProcess, GaussianProcess, UniformProcess])
def test_limits(process_cls):
    """alpha = 1: everything is kept (unambiguous RHM). alpha = 0: x0_hat is an independent draw, so the class
    is kept with the prior's collision probability; with n = 4000 its standard error is <= 0.008 and we allow
    5 standard errors."""
    ghm = GHMConfig(vocab_size=4, num_rules=2, depth=3).build()
    gen = torch.Generator().manual_seed(0)
    x0, tree = ghm.sample(4000, generator=gen, return_tree=True)
    process = process_cls(ghm.vocab_size)
    full = forward_backward(ghm, process, x0, tree, 1.0, generator=gen)
    assert full["class_kept"] == 1.0 and full["changed_leaves"] == 0.0 and full["level_kept"] == [1.0] * 4
    none = forward_backward(ghm, process, x0, tree, 0.0, generator=gen)
    q = float((ghm.root_prior.double() ** 2).sum())
    stderr = math.sqrt(q * (1 - q) / len(x0))
    assert abs(none["class_kept"] - q) < 5 * stderr
    assert none["class_kept_stderr"] == pytest.approx(stderr, rel=0.2)


def test_tree_distance():
    d = tree_distance(8, 2)
    assert d[0].tolist() == [0, 1, 2, 2, 3, 3, 3, 3]
    assert torch.equal(d, d.T)


def test_change_statistics():
    dist = tree_distance(4, 2)
    gen = torch.Generator().manual_seed(0)
    indep = (torch.rand(20000, 4, generator=gen) < 0.5).double()
    s = change_statistics(indep, dist, 2)
    assert s["chunk_size"] == pytest.approx(1.0, abs=0.05)
    assert max(abs(c) for c in s["correlation_by_distance"]) < 0.05
    pairs = (torch.rand(20000, 2, generator=gen) < 0.5).double().repeat_interleave(2, dim=1)  # siblings change together
    s = change_statistics(pairs, dist, 2)
    assert s["chunk_size"] == pytest.approx(2.0, abs=0.05)
    assert s["correlation_by_distance"][0] == pytest.approx(1.0) and abs(s["correlation_by_distance"][1]) < 0.05
    assert change_statistics(torch.zeros(10, 4), dist, 2)["chunk_size"] is None


def test_transition():
    assert crossing([0.0, 0.5, 1.0], [0.0, 0.2, 1.0], 0.6) == pytest.approx(0.75)
    t = transition([0.0, 0.5, 1.0], [0.25, 0.25, 1.0], 0.25)
    assert t["transition_alpha"] == pytest.approx(0.75) and t["transition_width"] == pytest.approx(0.25)


@pytest.mark.parametrize("data, field", [({"depth": [3]}, "depth"), ({"alphas": {"masked": [0.5]}}, "masked"),
                                         ({"processes": ["blur"]}, "processes"), ({"alphas": {"masking": [2.0]}}, "alphas.masking"),
                                         ({"ghm": {"vocab": 3}}, "vocab")])
def test_bad_config_names_the_field(data, field):
    with pytest.raises((ValueError, TypeError), match=field):
        from_dict(ProbeConfig, data)
