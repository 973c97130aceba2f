"""The masked-diffusion NELBO: an unbiased estimate of -log p(x) with the exact oracle, a bound otherwise."""

import math

import pytest
import torch

from hdiff.denoisers import BPDenoiser
from hdiff.metrics.likelihood import gaussian_nelbo, masked_nelbo, nelbo, uniform_nelbo
from hdiff.ghm import GHM
from hdiff.noise import GaussianProcess, MaskingProcess, UniformProcess


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("ghm", [GHM.random_hierarchy(8, 2, 2, 4, rule_probs="zipf", seed=0),
                                 GHM.random_factorized(4, 2, 3, concentration=0.5, seed=1)], ids=["rhm-zipf", "factorized"])
def test_oracle_nelbo_equals_exact_nll(ghm, schedule):
    x0 = ghm.sample(6, generator=torch.Generator().manual_seed(0))
    est = masked_nelbo(BPDenoiser(ghm, MaskingProcess(ghm.vocab_size)), x0, num_draws=1500, schedule=schedule,
                       generator=torch.Generator().manual_seed(1))
    nll = -ghm.log_prob(x0)
    z = (est.nats - nll) / est.stderr
    assert z.abs().max() < 4  # each sample
    assert abs(float((est.nats - nll).mean())) < 3 * float(est.stderr.pow(2).sum().sqrt() / len(z))  # the mean


def test_blind_denoiser_gives_a_looser_bound():
    ghm = GHM.random_hierarchy(8, 2, 2, 4, seed=0)
    process = MaskingProcess(8)

    class Blind:  # ignores the grammar: log p(x0_i = b | x_t) = -log v at masked leaves
        def __init__(self):
            self.process = process

        def __call__(self, x_t, alpha):
            return torch.full((x_t.shape[0], 8, *x_t.shape[1:]), -math.log(8))

    x0 = ghm.sample(4, generator=torch.Generator().manual_seed(0))
    est = masked_nelbo(Blind(), x0, num_draws=400, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(est.nats, torch.full((4,), 16 * math.log(8), dtype=torch.float64), rtol=0.1)
    assert (est.nats - 3 * est.stderr > -ghm.log_prob(x0)).all()
    mean, se = est.bits_per_leaf(ghm.num_leaves)
    assert abs(mean - 3.0) < 4 * se + 0.05


def test_bad_arguments():
    ghm = GHM.random_hierarchy(4, 2, 2, 2)
    x0 = ghm.sample(2)
    with pytest.raises(ValueError, match="masking"):
        masked_nelbo(BPDenoiser(ghm, UniformProcess(4)), x0)
    with pytest.raises(ValueError, match="schedule"):
        masked_nelbo(BPDenoiser(ghm, MaskingProcess(4)), x0, schedule="sqrt")
    with pytest.raises(ValueError, match="num_draws"):
        masked_nelbo(BPDenoiser(ghm, MaskingProcess(4)), x0, num_draws=1)


BOUNDS = {"masking": (masked_nelbo, MaskingProcess), "uniform": (uniform_nelbo, UniformProcess),
          "gaussian": (gaussian_nelbo, GaussianProcess)}


@pytest.mark.parametrize("kind", ["uniform", "gaussian"])
@pytest.mark.parametrize("ghm", [GHM.random_hierarchy(8, 2, 2, 4, rule_probs="zipf", seed=0),
                                 GHM.random_factorized(4, 2, 3, concentration=0.5, seed=1)], ids=["rhm-zipf", "factorized"])
def test_oracle_bound_is_tight(ghm, kind):
    """With the exact conditionals the uniform and VDM bounds equal -log p(x0) (within 4 SE per sample, 3 SE on the mean)."""
    bound, process = BOUNDS[kind]
    x0 = ghm.sample(6, generator=torch.Generator().manual_seed(0))
    est = bound(BPDenoiser(ghm, process(ghm.vocab_size)), x0, num_draws=1500, generator=torch.Generator().manual_seed(1))
    nll = -ghm.log_prob(x0)
    z = (est.nats - nll) / est.stderr
    assert z.abs().max() < 4
    assert abs(float((est.nats - nll).mean())) < 3 * float(est.stderr.pow(2).sum().sqrt() / len(z))


@pytest.mark.parametrize("kind", list(BOUNDS))
def test_bounds_hold_for_untrained_and_blind_denoisers(kind):
    """Any denoiser's NELBO >= exact NLL - 3 SE: an untrained tree U-Net, and one ignoring its input."""
    from hdiff.models import TreeUNet

    bound, process_cls = BOUNDS[kind]
    ghm = GHM.random_hierarchy(4, 2, 2, 3, seed=0)
    process = process_cls(4)
    torch.manual_seed(0)
    net = TreeUNet(4, kind, 2, 3, channels=16).eval()

    class Blind:
        def __init__(self):
            self.process = process

        def __call__(self, x_t, alpha):
            shape = (x_t.shape[0], 4, *ghm.leaf_shape)
            return torch.full(shape, -math.log(4))

    x0 = ghm.sample(8, generator=torch.Generator().manual_seed(2))
    nll = -ghm.log_prob(x0)
    oracle = bound(BPDenoiser(ghm, process), x0, num_draws=64, generator=torch.Generator().manual_seed(3))
    for denoiser in (net, Blind()):
        est = bound(denoiser, x0, num_draws=64, generator=torch.Generator().manual_seed(3))
        assert (est.nats + 3 * est.stderr >= nll).all()
        assert est.nats.mean() > oracle.nats.mean() + 0.5  # clearly looser than the exact denoiser's


def test_nelbo_dispatches_on_the_process():
    ghm = GHM.random_hierarchy(4, 2, 2, 2, seed=0)
    x0 = ghm.sample(3)
    for kind, (bound, process) in BOUNDS.items():
        d = BPDenoiser(ghm, process(4))
        a = nelbo(d, x0, num_draws=4, generator=torch.Generator().manual_seed(0))
        b = bound(d, x0, num_draws=4, generator=torch.Generator().manual_seed(0))
        assert torch.equal(a.nats, b.nats), kind
    with pytest.raises(ValueError, match="uniform"):
        uniform_nelbo(BPDenoiser(ghm, MaskingProcess(4)), x0)
    with pytest.raises(ValueError, match="log_snr_range"):
        GaussianProcess(4, log_snr_range=(3.0, -3.0))
