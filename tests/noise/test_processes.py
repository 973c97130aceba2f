"""Noise processes: add_noise statistics, leaf likelihoods against the definitions, bad input."""

import math

import pytest
import torch

from hdiff.noise import GaussianProcess, MaskingProcess, UniformProcess

V = 5


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def x0():
    return torch.randint(0, V, (4000, 6), generator=gen(1))


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.9, 1.0])
def test_masking_keep_fraction_and_likelihood(x0, alpha):
    p = MaskingProcess(V)
    x_t = p.add_noise(x0, alpha, generator=gen())
    kept = x_t != p.mask_token
    n = kept.numel()
    assert abs(kept.float().mean().item() - alpha) <= 4 * math.sqrt(alpha * (1 - alpha) / n) + 1e-12
    assert torch.equal(x_t[kept], x0[kept])
    ll = p.leaf_log_likelihood(x_t, alpha)
    assert ll.shape == (*x0.shape, V) and ll.dtype == torch.float32
    assert (ll[~kept] == 0).all()
    onehot = torch.nn.functional.one_hot(x0, V).bool()
    assert (ll[kept][onehot[kept]] == 0).all() and (ll[kept][~onehot[kept]] == -math.inf).all()


@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
def test_uniform_transition_matrix(alpha):
    p = UniformProcess(V)
    x0 = torch.full((60000, 1), 2)
    x_t = p.add_noise(x0, alpha, generator=gen())
    freq = torch.bincount(x_t.flatten(), minlength=V).double() / x_t.numel()
    expected = torch.full((V,), (1 - alpha) / V, dtype=torch.float64)
    expected[2] += alpha
    assert torch.allclose(freq, expected, atol=4 * math.sqrt(0.25 / x_t.numel()))
    ll = p.leaf_log_likelihood(torch.tensor([[3]]), alpha)[0, 0]
    lik = torch.full((V,), (1 - alpha) / V)
    lik[3] += alpha
    assert torch.allclose(ll.exp(), lik, atol=1e-6)


def test_gaussian_noise_statistics_and_likelihood(x0):
    p = GaussianProcess(V)
    alpha = 0.64
    z = p.add_noise(x0, alpha, generator=gen())
    assert z.shape == (x0.shape[0], V, x0.shape[1])
    eps = (z - 0.8 * p.embed(x0)) / 0.6
    assert abs(eps.mean().item()) < 0.01 and abs(eps.std().item() - 1) < 0.01
    # against the definition -||z - sqrt(a) E_b||^2 / (2 (1 - a)), up to a per-leaf constant
    ll = p.leaf_log_likelihood(z[:10], alpha)
    zz = z[:10].movedim(1, -1).unsqueeze(-2)  # (10, 6, 1, k)
    ref = -((zz - 0.8 * p.embedding) ** 2).sum(-1) / (2 * (1 - alpha))
    diff = ll - ref
    assert torch.allclose(diff, diff[..., :1].expand_as(diff), atol=1e-3)


def test_gaussian_alpha_one_is_hard_evidence_and_decode(x0):
    p = GaussianProcess(V)
    z = p.add_noise(x0[:50], 1.0)
    ll = p.leaf_log_likelihood(z, 1.0)
    assert torch.equal(ll.argmax(-1), x0[:50]) and torch.isinf(ll).sum() == 50 * 6 * (V - 1)
    assert torch.equal(p.decode(z), x0[:50])
    # per-sample alpha mixing 1 and < 1 keeps both behaviours
    a = torch.tensor([1.0, 0.5])
    ll2 = p.leaf_log_likelihood(p.add_noise(x0[:2], a, generator=gen()), a)
    assert torch.isinf(ll2[0]).any() and torch.isfinite(ll2[1]).all()


def test_per_sample_alpha(x0):
    p = MaskingProcess(V)
    alpha = torch.tensor([0.0, 1.0]).repeat(x0.shape[0] // 2)
    x_t = p.add_noise(x0, alpha, generator=gen())
    assert (x_t[0::2] == p.mask_token).all() and torch.equal(x_t[1::2], x0[1::2])


def test_prior_samples():
    assert (MaskingProcess(V).prior_sample(3, (4,)) == V).all()
    u = UniformProcess(V).prior_sample(2000, (4,), generator=gen())
    assert u.min() == 0 and u.max() == V - 1
    assert GaussianProcess(V).prior_sample(2, (2, 2)).shape == (2, V, 2, 2)


@pytest.mark.parametrize("process", [MaskingProcess(V), UniformProcess(V), GaussianProcess(V)], ids=repr)
def test_bad_alpha(process):
    x0 = torch.zeros(2, 3, dtype=torch.long)
    for bad in (-0.1, 1.5, float("nan"), torch.tensor([0.5, 0.5, 0.5])):
        with pytest.raises(ValueError, match="alpha"):
            process.add_noise(x0, bad)


def test_bad_tokens():
    with pytest.raises(ValueError, match="x0"):
        UniformProcess(V).add_noise(torch.tensor([[0, V]]), 0.5)
    with pytest.raises(ValueError, match="x_t"):  # MASK given to a non-masking process
        UniformProcess(V).leaf_log_likelihood(torch.tensor([[0, V]]), 0.5)
    with pytest.raises(ValueError, match="x_t"):
        MaskingProcess(V).leaf_log_likelihood(torch.tensor([[0, V + 1]]), 0.5)
    with pytest.raises(ValueError, match="x0"):
        MaskingProcess(V).add_noise(torch.zeros(2, 3), 0.5)
    with pytest.raises(ValueError, match="x_t"):
        GaussianProcess(V).leaf_log_likelihood(torch.full((1, V, 3), float("nan")), 0.5)
    with pytest.raises(ValueError, match="x_t"):
        GaussianProcess(V).leaf_log_likelihood(torch.zeros(1, V + 1, 3), 0.5)
    with pytest.raises(ValueError, match="vocab_size"):
        MaskingProcess(1)
    with pytest.raises(ValueError, match="embedding"):
        GaussianProcess(3, torch.zeros(3, 2))
