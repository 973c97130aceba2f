"""Message probes: a model that carries BP's messages scores R^2 ~ 1 and KL ~ 0; noise scores ~ 0."""

from __future__ import annotations

import pytest
import torch

from hdiff.bp import posterior, upward_messages
from hdiff.ghm import GHM
from hdiff.ghm.layout import to_tree_order
from hdiff.metrics.message_probes import message_probes, ridge_fit, summarise_probes
from hdiff.models import TreeUNet
from hdiff.noise import get_process


class _BPFeatures:
    """A fake model whose activations *are* BP's messages (plus a fixed random rotation)."""

    def __init__(self, ghm: GHM, process) -> None:
        self.ghm, self.process = ghm, process
        g = torch.Generator().manual_seed(0)
        self.mix = [torch.randn(ghm.symbols(l), 12, generator=g, dtype=torch.float64) for l in range(ghm.depth + 1)]

    def _tree(self, x: torch.Tensor, level: int) -> torch.Tensor:
        if self.ghm.layout == "image" and level > 0:
            x = to_tree_order(x, self.ghm.layout, level)
        return x.reshape(x.shape[0], -1, x.shape[-1])

    def tree_features(self, x_t, alpha):
        ev = self.process.leaf_log_likelihood(x_t, alpha).double()
        up = upward_messages(self.ghm, ev)
        marg = posterior(self.ghm, ev, levels=True).level_marginals
        # + 500: the probe floors features at -30 (a "log 0"); these linear mixtures stay above it
        enc = [self._tree(u.clamp_min(-30), l) @ self.mix[l] + 500 for l, u in enumerate(up[:-1])]
        dec = [self._tree(m.log().clamp_min(-30), l) @ self.mix[l] + 500 for l, m in enumerate(marg)]
        return {"encoder": enc, "decoder": dec}


@pytest.mark.parametrize("layout", ["sequence", "image"])
def test_bp_messages_are_recovered_exactly(layout: str) -> None:
    ghm = (GHM.random_hierarchy(4, 2, 2, 3, seed=0) if layout == "sequence"
           else GHM.random_hierarchy(3, 2, 4, 2, layout="image", seed=0))
    process = get_process("uniform", ghm.vocab_size)
    x0 = ghm.sample(400, generator=torch.Generator().manual_seed(1))
    rows = message_probes(_BPFeatures(ghm, process), ghm, x0, num_bins=2, generator=torch.Generator().manual_seed(2))
    assert len(rows) == 2 * (ghm.depth + ghm.depth + 1)
    for r in rows:
        assert r["r2"] > 0.999, r
        if r["side"] == "decoder":
            assert r["kl"] < 1e-3, r
    summary = summarise_probes(rows)
    assert len(summary["encoder_r2"]) == ghm.depth and len(summary["decoder_r2"]) == ghm.depth + 1


def test_an_untrained_network_explains_little() -> None:
    ghm = GHM.random_hierarchy(4, 2, 2, 3, seed=0)
    model = TreeUNet(vocab_size=4, process="masking", branching=2, depth=3, channels=8).eval()
    x0 = ghm.sample(200, generator=torch.Generator().manual_seed(1))
    rows = message_probes(model, ghm, x0, num_bins=2, generator=torch.Generator().manual_seed(2))
    internal = [r["r2"] for r in rows if r["side"] == "encoder" and r["level"] < 2]
    assert max(internal) < 0.9


def test_ridge_recovers_a_linear_map() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 5, generator=g, dtype=torch.float64) * torch.tensor([1.0, 10, 0.1, 3, 1], dtype=torch.float64)
    w = torch.randn(5, 3, generator=g, dtype=torch.float64)
    y = x @ w + 2.0
    fit = ridge_fit(x, y, 1e-9)
    assert torch.allclose(x @ fit[:-1] + fit[-1], y, atol=1e-5)


def test_refuses_models_without_features() -> None:
    ghm = GHM.random_hierarchy(4, 2, 2, 2, seed=0)
    with pytest.raises(ValueError, match="tree_features"):
        message_probes(object(), ghm, ghm.sample(8))
