"""Sample and denoiser metrics against enumeration and hand-computed values."""

import math

import pytest
import torch

from hdiff.denoisers import BPDenoiser
from hdiff.metrics import (PosteriorKL, SampleQuality, derivable_symbols, exact_leaf_marginals,
                                      level_validity, posterior_kl, sample_quality)
from hdiff.ghm import GHM, enumerate_strings
from hdiff.ghm.layout import to_tree_order
from hdiff.noise import MaskingProcess, UniformProcess
from hdiff.tokens import row_keys


def _mixed_tokens(ghm: GHM, n: int, seed: int) -> torch.Tensor:
    """Half exact samples, half uniformly random strings (mostly invalid), some with one token changed."""
    gen = torch.Generator().manual_seed(seed)
    good = ghm.sample(n, generator=gen)
    bad = torch.randint(0, ghm.vocab_size, (n, *ghm.leaf_shape), generator=gen)
    nudged = good.clone().flatten(1)
    nudged[:, 0] = (nudged[:, 0] + 1) % ghm.vocab_size
    return torch.cat([good, bad, nudged.view_as(good)])


def test_level_validity_matches_enumeration(tiny_ghm):
    """Scale l: every block of s**l leaves (tree order) is a string of the subtree GHM rooted at level L - l."""
    ghm = tiny_ghm
    x = _mixed_tokens(ghm, 40, seed=0)
    got = level_validity(ghm, x)
    leaves = to_tree_order(x, ghm.layout, ghm.depth).reshape(x.shape[0], -1)
    L, s = ghm.depth, ghm.branching
    for l in range(1, L + 1):
        symbols = ghm.symbols(L - l)
        prior = ghm.root_prior if l == L else torch.full((symbols,), 1.0 / symbols, dtype=torch.float64)
        sub = GHM(prior, ghm.kernels[L - l:])  # sequence layout: leaves in tree order
        strings, probs = enumerate_strings(sub)
        allowed = {tuple(r) for r, p in zip(strings.tolist(), probs.tolist()) if p > 0}
        blocks = leaves.view(x.shape[0], -1, s**l)
        want = torch.tensor([all(tuple(b) in allowed for b in row) for row in blocks.tolist()])
        assert torch.equal(got[:, l - 1], want), f"level {l}"
    assert torch.equal(got[:, -1], torch.isfinite(ghm.log_prob(x)))  # the whole string: validity
    assert got[:x.shape[0] // 3].all()  # exact samples are coherent at every scale


def test_derivable_symbols_shapes():
    ghm = GHM.random_hierarchy(4, 2, 2, 3, num_classes=2, seed=0)
    levels = derivable_symbols(ghm, ghm.sample(5))
    assert [tuple(t.shape) for t in levels] == [(5, 1, 2), (5, 2, 4), (5, 4, 4), (5, 8, 4)]
    assert all(t.dtype == torch.bool for t in levels)


def test_sample_quality_hand_computed():
    ghm = GHM.random_hierarchy(4, 2, 2, 2, seed=0)  # unambiguous, uniform rules: every valid string equally likely
    gen = torch.Generator().manual_seed(0)
    valid = ghm.sample(200, generator=gen).unique(dim=0)[:3]
    invalid = valid[:1].clone()
    invalid[0, 0] = next(b for b in range(4) if not torch.isfinite(ghm.log_prob(
        torch.cat([torch.tensor([b]), invalid[0, 1:]]).unsqueeze(0)))[0])
    tokens = torch.cat([valid[0:1], valid[0:1], valid[1:2], valid[2:3], invalid])  # 5 samples, 4 distinct
    train = valid[1:2]  # one of them is a training sample
    q = sample_quality(ghm, tokens, set(row_keys(train)))
    num_valid_strings = 4 * 2**3  # n_c * m^(number of internal nodes)
    assert q["num_samples"] == 5
    assert q["validity"] == pytest.approx(4 / 5)
    assert q["level_validity"][-1] == pytest.approx(4 / 5)
    assert q["memorisation"] == pytest.approx(1 / 5)
    assert q["novelty"] == pytest.approx(3 / 5)
    assert q["diversity"] == pytest.approx(4 / 5)
    assert q["nll_bits_per_leaf"] == pytest.approx(math.log2(num_valid_strings) / 4)
    assert q["nll_bits_per_leaf_std"] == pytest.approx(0.0, abs=1e-9)
    # the RHM is unambiguous: each valid string has one root; the histogram of the 4 valid samples is theirs
    hist = torch.zeros(4, dtype=torch.float64)
    for row in tokens[:4]:
        from hdiff.bp import posterior

        hist += posterior(ghm, ghm.hard_evidence(row.unsqueeze(0))).root_marginals[0].double()
    hist /= 4
    assert q["root_tv"] == pytest.approx(0.5 * float((hist - ghm.root_prior).abs().sum()), abs=1e-6)
    # leaf KL of the empirical marginals, by hand
    exact = exact_leaf_marginals(ghm)
    want = 0.0
    for i in range(4):
        counts = torch.bincount(tokens[:, i], minlength=4).double() / 5
        want += sum(float(c * math.log(c / exact[i, b])) for b, c in enumerate(counts) if c > 0) / 4
    assert q["leaf_kl"] == pytest.approx(want, rel=1e-9)


def test_sample_quality_of_exact_samples():
    ghm = GHM.random_hierarchy(8, 2, 2, 4, seed=0)
    x = ghm.sample(20000, generator=torch.Generator().manual_seed(1))
    q = sample_quality(ghm, x)
    assert q["validity"] == 1.0 and q["level_validity"] == [1.0] * 4
    assert q["memorisation"] is None and q["novelty"] == 1.0
    assert q["nll_bits_per_leaf"] == pytest.approx(ghm.entropy().bits_per_leaf, abs=1e-9)
    # sampling error only: TV of 8 classes from 20000 draws ~ 0.01; leaf KL ~ (v - 1) / (2 n) = 2e-4
    assert q["root_tv"] < 0.03
    assert q["leaf_kl"] < 1e-3


def test_sample_quality_metric_merges_like_one_pass():
    ghm = GHM.random_hierarchy(4, 2, 2, 3, seed=2)
    x = _mixed_tokens(ghm, 30, seed=3)
    train = x[:10]
    whole = SampleQuality(ghm, train)
    whole.update(x)
    a, b = SampleQuality(ghm, train), SampleQuality(ghm, train)
    a.update(x[:40])
    b.update(x[40:])
    a.merge_state(b)
    assert a.compute() == whole.compute() == sample_quality(ghm, x, set(row_keys(train)))


def test_sample_quality_rejects_bad_tokens():
    ghm = GHM.random_hierarchy(4, 2, 2, 2, seed=0)
    with pytest.raises(ValueError, match="tokens"):
        SampleQuality(ghm).update(torch.full((2, 4), 7))
    with pytest.raises(ValueError, match="tokens"):
        sample_quality(ghm, torch.zeros(0, 4, dtype=torch.long))


def test_posterior_kl_hand_computed():
    metric = PosteriorKL(num_bins=2)
    p = torch.tensor([[0.5, 0.5], [1.0, 0.0]]).T.unsqueeze(0)  # (1, v=2, 2 leaves)
    q = torch.tensor([[0.25, 0.75], [0.5, 0.5]]).T.unsqueeze(0)
    metric.update(p.log(), q.log(), torch.tensor([0.7]))
    kl0 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    kl1 = math.log(1.0 / 0.5)
    out = metric.compute()
    assert math.isnan(out[0]) and out[1] == pytest.approx((kl0 + kl1) / 2)
    metric.update(p.log(), q.log(), torch.tensor([0.2]), torch.tensor([[0.0, 1.0]]))  # weight: leaf 1 only
    assert metric.compute()[0] == pytest.approx(kl1)
    assert metric.bin_centres() == [0.25, 0.75]
    with pytest.raises(ValueError, match="num_bins"):
        PosteriorKL(0)


@pytest.mark.parametrize("process", [MaskingProcess, UniformProcess])
def test_posterior_kl_of_the_oracle_with_itself_is_zero(process):
    ghm = GHM.random_hierarchy(4, 2, 2, 3, seed=0)
    oracle = BPDenoiser(ghm, process(4))
    kl = posterior_kl(oracle, oracle, ghm.sample(32), num_bins=4, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(kl.compute(), torch.zeros(4, dtype=torch.float64), atol=1e-6)
    assert (kl.count > 0).all()


def test_posterior_kl_is_positive_for_a_wrong_denoiser():
    ghm = GHM.random_hierarchy(4, 2, 2, 3, seed=0)
    process = MaskingProcess(4)
    oracle = BPDenoiser(ghm, process)

    class Blind:
        def __init__(self):
            self.process = process

        def __call__(self, x_t, alpha):
            return torch.full((x_t.shape[0], 4, *x_t.shape[1:]), -math.log(4))

    kl = posterior_kl(oracle, Blind(), ghm.sample(32), num_bins=4, generator=torch.Generator().manual_seed(0)).compute()
    assert (kl > 0.05).all()
    # KL(p(x0_i | x_t) || uniform) averages to at least KL(leaf marginal || uniform) (convexity), the
    # value at alpha = 0; the first bin (alpha < 1/4) lies above it and below log 4
    marg = exact_leaf_marginals(ghm)
    floor = float(torch.special.xlogy(marg, marg * 4).sum(-1).mean())
    assert floor - 0.02 < kl[0] < math.log(4)
    assert kl[0] < kl[-1]  # the more is visible, the more the blind denoiser misses
