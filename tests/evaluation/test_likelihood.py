"""The masked-diffusion NELBO: an unbiased estimate of -log p(x) with the exact oracle, a bound otherwise."""

import math

import pytest
import torch

from hdiff.denoisers import BPDenoiser
from hdiff.evaluation.likelihood import masked_nelbo
from hdiff.ghm import GHM
from hdiff.noise import MaskingProcess, UniformProcess


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
