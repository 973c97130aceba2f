"""``hdiff classify``: end to end on a tiny RHM, the n90 interpolation, the MLP sizing, strict configs."""

import json
import math

import pytest
import torch

from hdiff.cli import main
from hdiff.config import from_dict
from hdiff.experiments.classify import (ClassifyConfig, MLPClassifier, bayes_accuracy, build_model, n_at_fraction,
                                       num_params)

TINY = """
n_train = [16, 64]
n_test = 64
[ghm]
vocab_size = 4
num_rules = 2
branching = 2
depth = 2
[model]
channels = 8
[optim]
max_steps = 20
eval_every = 10
batch_size = 32
"""


def test_cli_end_to_end(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(TINY)
    out = tmp_path / "out"
    assert main(["classify", "--config", str(cfg), "--out", str(out)]) == 0
    for name in ("metrics.json", "metrics.csv", "accuracy.png", "config.toml"):
        assert (out / name).is_file()
    assert not list(out.glob(".*.tmp*"))  # no half-written leftovers
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["bayes_accuracy"] == 1.0  # an unambiguous RHM: the leaves fix the root
    assert set(metrics["models"]) == {"convnet", "mlp"}
    for res in metrics["models"].values():
        assert res["n"] == [16, 64] and len(res["test_accuracy"]) == 2 and "n90" in res
        assert all(0 <= a <= 1 for a in res["test_accuracy"])
    assert len((out / "metrics.csv").read_text().strip().splitlines()) == 1 + 2 * 2
    # the saved config reloads to the same experiment
    assert main(["classify", "--config", str(out / "config.toml"), "--out", str(out)]) == 0


def test_n_at_fraction_interpolates_in_log_n():
    assert n_at_fraction([100, 400], [0.5, 1.0], 0.75) == pytest.approx(200.0)
    assert n_at_fraction([100, 400], [0.95, 1.0], 0.9) == 100.0
    assert n_at_fraction([100, 400], [0.1, 0.2], 0.9) is None


def test_mlp_matches_convnet_size():
    ghm = from_dict(ClassifyConfig, {"ghm": {"vocab_size": 8, "num_rules": 3, "depth": 4}}).ghm.build()
    cfg = ClassifyConfig().model
    conv, mlp = build_model("convnet", ghm, cfg), build_model("mlp", ghm, cfg)
    assert isinstance(mlp, MLPClassifier)
    assert abs(num_params(mlp) - num_params(conv)) / num_params(conv) < 0.02
    x = ghm.sample(5, generator=torch.Generator().manual_seed(0))
    assert mlp(x).shape == conv(x).shape == (5, ghm.num_classes)


def test_bayes_accuracy_of_true_labels_is_one():
    ghm = ClassifyConfig().ghm.build()
    x, tree = ghm.sample(64, generator=torch.Generator().manual_seed(1), return_tree=True)
    assert bayes_accuracy(ghm, x, tree[0].flatten()) == 1.0
    assert math.isclose(bayes_accuracy(ghm, x, (tree[0].flatten() + 1) % ghm.num_classes), 0.0)


@pytest.mark.parametrize("data, field", [({"n_trian": [8]}, "n_trian"), ({"optim": {"lrr": 1.0}}, "lrr"),
                                         ({"models": ["cnn"]}, "models"), ({"n_test": "big"}, "n_test")])
def test_bad_config_names_the_field(data, field):
    with pytest.raises((ValueError, TypeError), match=field):
        from_dict(ClassifyConfig, data)
