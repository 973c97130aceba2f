"""The BP oracle denoiser against brute force: p(x0_i | x_t) by enumerating every clean string."""

import pytest
import torch
from scipy.stats import chisquare

from hdiff.denoisers import BPDenoiser, Denoiser
from hdiff.ghm import GHM, enumerate_strings
from hdiff.noise import GaussianProcess, MaskingProcess, UniformProcess

PROCESSES = {"gaussian": GaussianProcess, "masking": MaskingProcess, "uniform": UniformProcess}


def brute_force_posterior(ghm, process, x_t, alpha):
    """log p(x0 = s | x_t) for every enumerated string s: (B, K), and the strings."""
    strings, prob = enumerate_strings(ghm)
    ll = process.leaf_log_likelihood(x_t, alpha).double().flatten(1, -2)  # (B, N, v)
    flat = strings.flatten(1)  # (K, N)
    lik = ll[:, torch.arange(flat.shape[1]), flat].sum(-1)  # (B, K)
    w = prob.log() + lik
    return w - torch.logsumexp(w, -1, keepdim=True), strings


@pytest.mark.parametrize("kind", list(PROCESSES))
@pytest.mark.parametrize("ghm", [GHM.random_hierarchy(3, 2, 2, 2, seed=1), GHM.random_factorized(3, 2, 2, seed=2),
                                 GHM.random_hierarchy(3, 2, 4, 1, layout="image", seed=3)], ids=["rhm", "fac", "img"])
def test_oracle_marginals_match_enumeration(ghm, kind):
    process = PROCESSES[kind](ghm.vocab_size)
    x0 = ghm.sample(6, generator=torch.Generator().manual_seed(0))
    alpha = torch.tensor([0.0, 0.2, 0.5, 0.7, 0.9, 1.0])
    x_t = process.add_noise(x0, alpha, generator=torch.Generator().manual_seed(1))
    denoiser = BPDenoiser(ghm, process)
    assert isinstance(denoiser, Denoiser)
    log_p = denoiser(x_t, alpha)
    assert log_p.shape == (6, ghm.vocab_size, *ghm.leaf_shape)
    log_post, strings = brute_force_posterior(ghm, process, x_t, alpha)
    onehot = torch.nn.functional.one_hot(strings, ghm.vocab_size).double().movedim(-1, 1)  # (K, v, *leaf)
    exact = torch.einsum("bk,kv...->bv...", log_post.exp(), onehot)
    assert torch.allclose(log_p.exp().double(), exact, atol=1e-5)
    assert torch.allclose(log_p.exp().sum(1), torch.ones(6, *ghm.leaf_shape), atol=1e-5)


@pytest.mark.parametrize("kind", ["masking", "uniform"])
def test_sample_x0_draws_the_joint_posterior(kind):
    ghm = GHM.random_hierarchy(3, 2, 2, 2, rule_probs="zipf", seed=4)
    process = PROCESSES[kind](3)
    x0 = ghm.sample(1, generator=torch.Generator().manual_seed(3))
    x_t = process.add_noise(x0, 0.4, generator=torch.Generator().manual_seed(5)).expand(20000, -1).contiguous()
    draws = BPDenoiser(ghm, process).sample_x0(x_t, 0.4, generator=torch.Generator().manual_seed(6))
    log_post, strings = brute_force_posterior(ghm, process, x_t[:1], 0.4)
    codes = {tuple(s.tolist()): i for i, s in enumerate(strings)}
    counts = torch.zeros(len(strings))
    for row in draws.tolist():
        counts[codes[tuple(row)]] += 1  # a KeyError would mean an impossible string was drawn
    expected = log_post[0].exp() * len(draws)
    keep = expected > 5
    assert counts[~keep].sum() <= max(5.0, 3 * float(expected[~keep].sum()) + 3)
    obs, exp = counts[keep].numpy(), expected[keep].numpy()
    assert chisquare(obs, exp * obs.sum() / exp.sum()).pvalue > 1e-3


def test_batch_independence_and_determinism():
    ghm = GHM.random_hierarchy(8, 2, 2, 4)
    d = BPDenoiser(ghm, MaskingProcess(8))
    x_t = d.process.add_noise(ghm.sample(8, generator=torch.Generator().manual_seed(0)), 0.5,
                              generator=torch.Generator().manual_seed(1))
    full = d(x_t, 0.5)
    assert torch.allclose(full[3:5], d(x_t[3:5], 0.5), atol=1e-6)
    assert torch.equal(full, d(x_t, 0.5))
    a = d.sample_x0(x_t, 0.5, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, d.sample_x0(x_t, 0.5, generator=torch.Generator().manual_seed(2)))


def test_bad_construction_and_input():
    ghm = GHM.random_hierarchy(4, 2, 2, 2)
    with pytest.raises(ValueError, match="vocab_size"):
        BPDenoiser(ghm, MaskingProcess(5))
    with pytest.raises(TypeError, match="ghm"):
        BPDenoiser("ghm", MaskingProcess(4))
    with pytest.raises(ValueError, match="leaf shape"):
        BPDenoiser(ghm, MaskingProcess(4))(torch.zeros(2, 5, dtype=torch.long), 0.5)
