"""The training set's exact denoiser against Bayes' rule by hand, and as an unbiased training target."""

import math

import pytest
import torch

from hdiff.denoisers import Denoiser, EmpiricalDenoiser
from hdiff.ghm import GHM
from hdiff.noise import GaussianProcess, MaskingProcess, UniformProcess

PROCESSES = {"gaussian": GaussianProcess, "masking": MaskingProcess, "uniform": UniformProcess}


def bayes_by_hand(tokens, process, x_t, alpha):
    """p(x0_i = b | x_t) under the uniform distribution on ``tokens``, one sample at a time in float64."""
    out = torch.zeros(x_t.shape[0], process.vocab_size, *tokens.shape[1:], dtype=torch.float64)
    ll = process.leaf_log_likelihood(x_t, alpha).double()  # (B, *leaf, v)
    for b in range(x_t.shape[0]):
        logw = torch.tensor([sum(float(ll[b].flatten(0, -2)[i, int(tok)]) for i, tok in enumerate(sample.flatten()))
                             for sample in tokens], dtype=torch.float64)
        w = torch.softmax(logw, 0) if torch.isfinite(logw).any() else torch.zeros_like(logw)
        for k, sample in enumerate(tokens):
            out[b] += w[k] * torch.nn.functional.one_hot(sample.long(), process.vocab_size).double().movedim(-1, 0)
    return out


@pytest.mark.parametrize("kind", list(PROCESSES))
@pytest.mark.parametrize("layout", ["sequence", "image"])
def test_posterior_matches_bayes_rule(kind, layout):
    ghm = (GHM.random_hierarchy(3, 2, 2, 2, seed=1) if layout == "sequence"
           else GHM.random_hierarchy(3, 2, 4, 1, layout="image", seed=3))
    process = PROCESSES[kind](ghm.vocab_size)
    tokens = ghm.sample(9, generator=torch.Generator().manual_seed(0))
    x0 = tokens[torch.tensor([0, 3, 3, 5, 8, 1])]  # noised training samples, as in the loss
    alpha = torch.tensor([0.0, 0.2, 0.5, 0.7, 0.9, 1.0])
    x_t = process.add_noise(x0, alpha, generator=torch.Generator().manual_seed(1))
    denoiser = EmpiricalDenoiser(tokens, process, chunk=4)  # chunks of the set: the same result
    assert isinstance(denoiser, Denoiser)
    log_p = denoiser(x_t, alpha)
    assert log_p.shape == (6, ghm.vocab_size, *ghm.leaf_shape)
    assert torch.allclose(log_p.exp().double(), bayes_by_hand(tokens, process, x_t, alpha), atol=1e-5)
    assert torch.allclose(denoiser.sample_weights(x_t, alpha).sum(1), torch.ones(6))


def test_masking_weights_are_uniform_over_the_consistent_samples():
    process = MaskingProcess(3)
    tokens = torch.tensor([[0, 1, 2, 0], [0, 1, 1, 1], [2, 2, 2, 2], [0, 1, 2, 0]])
    x_t = torch.tensor([[0, 3, 3, 3], [3, 3, 3, 2], [3, 3, 3, 3]])  # 3 = MASK
    w = EmpiricalDenoiser(tokens, process).sample_weights(x_t, 0.5)
    assert torch.allclose(w, torch.tensor([[1 / 3, 1 / 3, 0, 1 / 3], [0, 0, 1, 0], [0.25] * 4]))
    log_p = EmpiricalDenoiser(tokens, process)(x_t, 0.5)
    assert float(log_p[0, 0, 0]) == 0.0 and math.isinf(float(log_p[0, 1, 0]))  # the visible leaf is certain


def test_soft_target_is_the_expected_one_hot_target():
    """In the loss x0 is a uniform training sample and x_t its noised copy; given x_t, E[onehot(x0)] is the
    empirical posterior. Monte Carlo over 20000 draws of (x0, x_t) at one masked pattern: every
    frequency within 5 standard errors of the posterior."""
    process = MaskingProcess(3)
    tokens = torch.tensor([[0, 1, 2, 0], [0, 1, 1, 1], [2, 2, 2, 2], [0, 2, 2, 0], [1, 1, 1, 1]])
    gen = torch.Generator().manual_seed(0)
    x0 = tokens[torch.randint(0, 5, (20000,), generator=gen)]
    x_t = process.add_noise(x0, 0.5, generator=gen)
    pattern = torch.tensor([0, 3, 3, 0])  # leaves 0 and 3 visible as 0
    hit = (x_t == pattern).all(1)
    freq = torch.nn.functional.one_hot(x0[hit], 3).double().mean(0)  # (4, 3)
    post = EmpiricalDenoiser(tokens, process)(pattern[None], 0.5)[0].exp().T.double()  # (4, 3)
    se = (post * (1 - post) / int(hit.sum())).sqrt().clamp_min(1e-9)
    assert int(hit.sum()) > 400 and bool(((freq - post).abs() <= 5 * se + 1e-12).all())


def test_bad_input():
    process = MaskingProcess(3)
    with pytest.raises(ValueError, match="tokens"):
        EmpiricalDenoiser(torch.tensor([[0, 3]]), process)  # out of range
    with pytest.raises(ValueError, match="tokens"):
        EmpiricalDenoiser(torch.zeros(2, 4), process)  # floats
    with pytest.raises(TypeError, match="process"):
        EmpiricalDenoiser(torch.zeros(2, 4, dtype=torch.long), "masking")
    with pytest.raises(ValueError, match="leaf shape"):
        EmpiricalDenoiser(torch.zeros(2, 4, dtype=torch.long), process)(torch.zeros(1, 8, dtype=torch.long), 0.5)
