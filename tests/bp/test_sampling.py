"""Exact joint posterior sampling: frequencies against the enumerated posterior (chi-square, fixed seeds)."""

from __future__ import annotations

import math

import pytest
import torch

from hdiff.bp import posterior, sample_posterior
from hdiff.ghm import GHM, enumerate_trees

from ._reference import exact_string_posterior, hard_mask, invalid_string, leaf_score, onehot_evidence

N = 20_000
P_MIN = 1e-3  # fixed seeds: the p-values are deterministic; 1e-3 leaves room for a seed change
SAMPLING_GHMS = ["rhm-v3m2s2L2", "rhm-zipf-v4m3s2L2", "fac-v2s2L2", "fac-sparse", "mixed-ambiguous",
                 "img-rhm-v3m2L2", "img-fac-v3L1"]


def spread_evidence(ghm: GHM, seed: int) -> torch.Tensor:
    """One row ``(1, *leaf_shape, v)``: mild soft evidence (randn) plus hard exclusions consistent with a
    sampled string, so that the posterior is spread over many strings but not the prior."""
    gen = torch.Generator().manual_seed(seed)
    x = ghm.sample(1, generator=gen)
    ev = torch.randn(1, *ghm.leaf_shape, ghm.vocab_size, generator=gen, dtype=torch.float64)
    return ev.masked_fill(hard_mask(ghm, x, 0.25, gen), -math.inf)


def tree_posterior(ghm: GHM, ev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every complete tree, flattened and concatenated ``(K, nodes)``, with its posterior ``(K,)``."""
    trees = enumerate_trees(ghm)
    logw = leaf_score(trees.leaves, ev[:1])[0] + trees.prob.log()
    flat = torch.cat([lvl.reshape(lvl.shape[0], -1) for lvl in trees.levels], dim=1)
    return flat, torch.softmax(logw, 0)


@pytest.mark.parametrize("name", SAMPLING_GHMS)
def test_posterior_strings_and_trees_match_enumeration(tiny_ghms, chi2_pvalue, tree_consistent, name):
    ghm = tiny_ghms[name]()
    ev = spread_evidence(ghm, seed=1)
    leaves, tree = sample_posterior(ghm, ev.expand(N, *ev.shape[1:]).float(),
                                    generator=torch.Generator().manual_seed(1), return_tree=True)
    assert leaves.shape == (N, *ghm.leaf_shape) and leaves.dtype == torch.int64
    assert torch.equal(tree[-1], leaves)
    tree_consistent(ghm, tree)
    strings, probs = exact_string_posterior(ghm, ev)
    assert (probs > 1e-3).sum() >= 4, "the evidence should leave several likely strings"
    assert chi2_pvalue(leaves, strings, probs) > P_MIN
    support, tprobs = tree_posterior(ghm, ev)  # latents too (they are not determined by the leaves
    flat = torch.cat([t.reshape(N, -1) for t in tree], dim=1)  # in the ambiguous / factorized GHMs)
    assert chi2_pvalue(flat, support, tprobs) > P_MIN


def test_chi_square_has_power(tiny_ghms, chi2_pvalue):
    """The test above can fail: prior samples, or posterior samples for other evidence, are rejected."""
    ghm = tiny_ghms["rhm-v3m2s2L2"]()
    gen = torch.Generator().manual_seed(3)
    ev, other = (torch.randn(1, *ghm.leaf_shape, ghm.vocab_size, generator=gen, dtype=torch.float64)
                 for _ in range(2))  # soft only: every valid string stays in the support
    strings, probs = exact_string_posterior(ghm, ev)
    prior = ghm.sample(N, generator=torch.Generator().manual_seed(2))
    assert chi2_pvalue(prior, strings, probs) < 1e-6
    wrong = sample_posterior(ghm, other.expand(N, *other.shape[1:]), generator=torch.Generator().manual_seed(4))
    assert chi2_pvalue(wrong, strings, probs) < 1e-6
    right = sample_posterior(ghm, ev.expand(N, *ev.shape[1:]), generator=torch.Generator().manual_seed(4))
    assert chi2_pvalue(right, strings, probs) > P_MIN


def test_each_batch_row_samples_its_own_posterior(tiny_ghms, chi2_pvalue):
    ghm = tiny_ghms["img-rhm-v3m2L2"]()
    a, b = spread_evidence(ghm, seed=5), spread_evidence(ghm, seed=6)
    ev = torch.cat([a, b]).repeat(N // 2, *[1] * (a.ndim - 1))  # rows alternate a, b, a, b, ...
    x = sample_posterior(ghm, ev, generator=torch.Generator().manual_seed(7))
    for rows, e in [(x[0::2], a), (x[1::2], b)]:
        assert chi2_pvalue(rows, *exact_string_posterior(ghm, e)) > P_MIN


@pytest.mark.parametrize("ghm", [
    GHM.random_hierarchy(4, 3, 2, 5, rule_probs="zipf", seed=0),
    GHM.random_hierarchy(5, 4, 4, 3, num_classes=2, layout="image", seed=1),
    GHM.random_factorized(4, 3, 3, concentration=0.2, seed=2),
], ids=["rhm-L5", "img-rhm-L3", "fac-s3-L3"])
def test_samples_are_valid_trees_respecting_hard_evidence(ghm, tree_consistent):
    gen = torch.Generator().manual_seed(0)
    x = ghm.sample(64, generator=gen)
    excluded = hard_mask(ghm, x, 0.5, gen)
    ev = torch.randn(*excluded.shape, generator=gen).masked_fill(excluded, -math.inf)
    leaves, tree = sample_posterior(ghm, ev, generator=gen, return_tree=True)
    tree_consistent(ghm, tree)
    assert torch.isfinite(ghm.log_prob(leaves)).all()
    assert not excluded.gather(-1, leaves.unsqueeze(-1)).any(), "sampled an excluded symbol"


def test_sampled_root_frequencies_match_root_posterior():
    ghm = GHM.random_hierarchy(4, 3, 2, 4, num_classes=3, rule_probs="zipf", seed=3)  # too big to enumerate
    gen = torch.Generator().manual_seed(0)
    ev = 0.3 * torch.randn(1, *ghm.leaf_shape, ghm.vocab_size, generator=gen, dtype=torch.float64)
    root_post = posterior(ghm, ev).root_marginals[0]
    _, tree = sample_posterior(ghm, ev.expand(N, *ev.shape[1:]), generator=gen, return_tree=True)
    from scipy.stats import chisquare

    counts = torch.bincount(tree[0].flatten(), minlength=3).double()
    assert chisquare(counts.numpy(), (root_post * N).numpy()).pvalue > P_MIN


def test_impossible_evidence_raises(tiny_ghms):
    ghm = tiny_ghms["rhm-v3m2s2L2"]()
    ok = spread_evidence(ghm, seed=0)
    bad = onehot_evidence(invalid_string(ghm), ghm.vocab_size)
    with pytest.raises(ValueError, match="leaf_log_lik"):
        sample_posterior(ghm, torch.cat([ok, bad]))
    dead = ok.clone()
    dead.view(-1, ghm.vocab_size)[0] = -math.inf
    with pytest.raises(ValueError, match="impossible"):
        sample_posterior(ghm, dead.float())


@pytest.mark.parametrize("name", ["rhm-v3m2s2L2", "fac-v2s2L2", "img-rhm-v3m2L2"])
def test_generator_determinism(tiny_ghms, name):
    ghm = tiny_ghms[name]()
    ev = spread_evidence(ghm, seed=0).expand(500, -1, *[-1] * len(ghm.leaf_shape)).float()
    draw = lambda seed: sample_posterior(ghm, ev, generator=torch.Generator().manual_seed(seed),  # noqa: E731
                                         return_tree=True)
    (a, ta), (b, tb), (c, _) = draw(0), draw(0), draw(1)
    assert torch.equal(a, b) and all(torch.equal(x, y) for x, y in zip(ta, tb))
    assert not torch.equal(a, c)
