"""The GHM: sizes, random families, exact log_prob, sampling frequencies, entropy, persistence."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from hdiff.ghm import GHM, Entropy, FactorizedKernel, ProductionKernel, enumerate_strings

MAX_ALL_STRINGS = 5000  # brute force over every v**N string below this


# ------------------------------------------------------------------------------------ sizes
@pytest.mark.parametrize("layout,s", [("sequence", 2), ("sequence", 3), ("image", 4)])
@pytest.mark.parametrize("family", ["rhm", "fac"])
def test_attributes(family, layout, s):
    if family == "rhm":
        ghm = GHM.random_hierarchy(5, 3, s, 3, num_classes=2, layout=layout, seed=0)
    else:
        ghm = GHM.random_factorized(5, s, 3, num_classes=2, layout=layout, seed=0)
    assert (ghm.depth, ghm.branching, ghm.vocab_size, ghm.num_classes) == (3, s, 5, 2)
    assert ghm.num_leaves == s**3 and ghm.layout == layout
    assert ghm.leaf_shape == ((8, 8) if layout == "image" else (s**3,))
    assert [ghm.level_shape(l) for l in range(4)] == (
        [(2**l, 2**l) for l in range(4)] if layout == "image" else [(s**l,) for l in range(4)])
    assert [ghm.symbols(l) for l in range(4)] == [2, 5, 5, 5]
    assert ghm.device == torch.device("cpu")
    assert len(ghm.kernels) == 3 and all(k.branching == s for k in ghm.kernels)
    assert ghm.kernels[0].num_parents == 2 and all(k.num_children == 5 for k in ghm.kernels)
    torch.testing.assert_close(ghm.root_prior, torch.full((2,), 0.5, dtype=torch.float64))
    assert "depth=3" in repr(ghm) and f"layout={layout!r}" in repr(ghm)
    x = ghm.sample(7, generator=torch.Generator().manual_seed(0))
    assert x.shape == (7, *ghm.leaf_shape) and x.dtype == torch.int64
    assert ghm.sample(0).shape == (0, *ghm.leaf_shape)


def test_mixed_kernel_sizes(tiny_ghms):
    ghm = tiny_ghms["mixed-ambiguous"]()
    assert (ghm.depth, ghm.branching, ghm.vocab_size, ghm.num_classes) == (2, 2, 3, 2)
    assert [ghm.symbols(l) for l in range(3)] == [2, 4, 3]  # the production level's declared alphabet


# ------------------------------------------------------------------------------ random families
@pytest.mark.parametrize("v,m,s,L,nc", [(3, 2, 2, 3, 3), (4, 4, 2, 2, 2), (2, 4, 3, 2, 2), (3, 27, 4, 2, 3),
                                        (8, 8, 2, 3, 8), (12, 5, 2, 2, 4)])
@pytest.mark.parametrize("rule_probs", ["uniform", "zipf"])
def test_random_hierarchy_rules_are_distinct_per_level(v, m, s, L, nc, rule_probs):
    ghm = GHM.random_hierarchy(v, m, s, L, num_classes=nc, rule_probs=rule_probs,
                               layout="image" if s == 4 else "sequence", seed=1)
    w = 1.0 / torch.arange(1, m + 1, dtype=torch.float64) if rule_probs == "zipf" else torch.ones(m, dtype=torch.float64)
    for level, k in enumerate(ghm.kernels):
        assert isinstance(k, ProductionKernel) and k.rules.shape == ((nc if level == 0 else v), m, s)
        assert k.num_children == v and int(k.rules.min()) >= 0 and int(k.rules.max()) < v
        flat = k.rules.reshape(-1, s)
        assert torch.unique(flat, dim=0).shape[0] == flat.shape[0], "rules repeat within a level"
        assert k.unambiguous
        torch.testing.assert_close(k.weights, (w / w.sum()).expand(k.num_parents, m), rtol=1e-15, atol=0)


def test_unambiguous_flag():
    rules = torch.tensor([[[0, 1], [1, 1]], [[0, 1], [1, 0]]])
    w = torch.full((2, 2), 0.5, dtype=torch.float64)
    assert not ProductionKernel(rules, w).unambiguous  # (0, 1) comes from both parents
    w0 = torch.tensor([[0.0, 1.0], [0.5, 0.5]], dtype=torch.float64)
    assert ProductionKernel(rules, w0).unambiguous  # ... unless one of them has weight 0
    assert not ProductionKernel(torch.tensor([[[0, 1], [0, 1]]]), torch.full((1, 2), 0.5, dtype=torch.float64)).unambiguous


def test_random_factorized_transitions():
    ghm = GHM.random_factorized(4, 3, 2, num_classes=2, concentration=0.5, seed=0)
    for level, k in enumerate(ghm.kernels):
        assert isinstance(k, FactorizedKernel) and k.transitions.shape == (3, 2 if level == 0 else 4, 4)
        assert (k.transitions >= 0).all()
        torch.testing.assert_close(k.transitions.sum(-1), torch.ones(k.transitions.shape[:2], dtype=torch.float64))
    a = GHM.random_factorized(4, 3, 2, concentration=0.1, seed=0).kernels[1].transitions
    b = GHM.random_factorized(4, 3, 2, concentration=100.0, seed=0).kernels[1].transitions
    assert a.max(-1).values.mean() > b.max(-1).values.mean() + 0.3  # concentration controls peakedness


# ---------------------------------------------------------------------------- exact log_prob
def test_log_prob_sums_to_one_over_all_strings(tiny_ghm):
    strings, prob = enumerate_strings(tiny_ghm)
    lp = tiny_ghm.log_prob(strings)
    assert lp.dtype == torch.float64
    torch.testing.assert_close(lp, prob.log(), rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.logsumexp(lp, 0), torch.zeros((), dtype=torch.float64), rtol=0, atol=1e-12)
    v, n = tiny_ghm.vocab_size, tiny_ghm.num_leaves
    if v**n > MAX_ALL_STRINGS:
        return
    every = torch.tensor(list(itertools.product(range(v), repeat=n))).view(-1, *tiny_ghm.leaf_shape)
    lp_all = tiny_ghm.log_prob(every)
    torch.testing.assert_close(lp_all.exp().sum(), torch.ones((), dtype=torch.float64), rtol=0, atol=1e-12)
    in_language = (every.flatten(1)[:, None] == strings.flatten(1)[None]).all(-1).any(-1)
    assert (lp_all[~in_language] == -math.inf).all() and torch.isfinite(lp_all[in_language]).all()
    assert int(in_language.sum()) == strings.shape[0]


def test_log_prob_minus_inf_outside_the_language():
    ghm = GHM.random_hierarchy(4, 2, 2, 3, seed=0)
    x = ghm.sample(4, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(ghm.log_prob(x)).all()
    bad = x.clone()
    bad[:, 0] = (bad[:, 0] + 1) % 4  # the first pair is no longer a rule of its parent
    rules = {tuple(r.tolist()) for r in ghm.kernels[-1].rules.reshape(-1, 2)}
    assert all(tuple(b[:2].tolist()) not in rules for b in bad)
    assert (ghm.log_prob(bad) == -math.inf).all()


def test_log_prob_accepts_other_integer_dtypes(tiny_ghm):
    x = tiny_ghm.sample(5, generator=torch.Generator().manual_seed(0))
    lp = tiny_ghm.log_prob(x)
    for dtype in (torch.int32, torch.int16, torch.uint8):
        assert torch.equal(tiny_ghm.log_prob(x.to(dtype)), lp)


# ------------------------------------------------------------------------- sample frequencies
@pytest.mark.parametrize("name", ["rhm-v3m2s2L2", "rhm-zipf-v4m3s2L2", "rhm-nc2-v4m2s2L2", "fac-v2s2L2",
                                  "fac-nc2-v3s2L2", "fac-sparse", "mixed-ambiguous", "img-rhm-v3m2L2",
                                  "img-fac-v3L1"])
def test_sample_frequencies_match_enumeration(tiny_ghms, chi2_pvalue, name):
    ghm = tiny_ghms[name]()
    strings, prob = enumerate_strings(ghm)
    x = ghm.sample(20_000, generator=torch.Generator().manual_seed(0))
    assert chi2_pvalue(x, strings, prob) > 1e-3


def test_sample_frequency_test_has_power(chi2_pvalue):
    zipf = GHM.random_hierarchy(3, 3, 2, 2, rule_probs="zipf", seed=0)
    uniform = GHM.random_hierarchy(3, 3, 2, 2, rule_probs="uniform", seed=0)
    assert all(torch.equal(a.rules, b.rules) for a, b in zip(zipf.kernels, uniform.kernels))
    strings, prob = enumerate_strings(uniform)
    x = zipf.sample(20_000, generator=torch.Generator().manual_seed(0))
    assert chi2_pvalue(x, strings, prob) < 1e-6


# ---------------------------------------------------------------------------------- entropy
def _enumerated_entropy(ghm: GHM) -> float:
    _, prob = enumerate_strings(ghm)
    return float(-(prob * prob.log()).sum())


@pytest.mark.parametrize("v,m,s,L,nc", [(3, 2, 2, 2, 3), (4, 3, 2, 2, 2), (2, 2, 3, 2, 2), (8, 4, 2, 6, 8),
                                        (16, 4, 4, 3, 5), (4, 3, 2, 12, 4)])
def test_rhm_entropy_is_exact(v, m, s, L, nc):
    ghm = GHM.random_hierarchy(v, m, s, L, num_classes=nc, layout="image" if s == 4 else "sequence", seed=0)
    h = ghm.entropy()
    assert isinstance(h, Entropy) and h.exact and h.stderr == 0.0 and h.num_leaves == s**L
    expected = math.log(nc) + (s**L - 1) // (s - 1) * math.log(m)
    assert h.nats == pytest.approx(expected, rel=1e-12)
    assert h.bits_per_leaf == pytest.approx(expected / (s**L * math.log(2)), rel=1e-12)
    if nc * m ** ((s**L - 1) // (s - 1)) <= 5000:
        assert h.nats == pytest.approx(_enumerated_entropy(ghm), rel=1e-12)


@pytest.mark.parametrize("name", ["rhm-zipf-v4m3s2L2", "img-rhm-zipf-v2m3L1", "skewed-prior"])
def test_exact_entropy_with_nonuniform_weights_matches_enumeration(tiny_ghms, name):
    if name == "skewed-prior":
        base = GHM.random_hierarchy(3, 3, 2, 2, num_classes=2, rule_probs="zipf", seed=5)
        w = torch.tensor([[0.7, 0.2, 0.1], [0.05, 0.05, 0.9]], dtype=torch.float64)
        k0 = ProductionKernel(base.kernels[0].rules, w, num_children=3)
        ghm = GHM(torch.tensor([0.9, 0.1], dtype=torch.float64), [k0, base.kernels[1]])
    else:
        ghm = tiny_ghms[name]()
    h = ghm.entropy()
    assert h.exact
    assert h.nats == pytest.approx(_enumerated_entropy(ghm), rel=1e-12)


@pytest.mark.parametrize("name", ["fac-v2s2L2", "fac-nc2-v3s2L2", "fac-sparse", "mixed-ambiguous", "img-fac-v3L1"])
def test_monte_carlo_entropy_within_4_stderr(tiny_ghms, name):
    ghm = tiny_ghms[name]()
    h = ghm.entropy(num_samples=4096, generator=torch.Generator().manual_seed(0))
    assert not h.exact and h.stderr > 0
    assert abs(h.nats - _enumerated_entropy(ghm)) < 4 * h.stderr
    assert h.stderr < 0.05 * max(h.nats, 1.0)  # the estimate is informative, not a wide interval


# ------------------------------------------------------------------------------ persistence
def _assert_same_ghm(g: GHM, ref: GHM, atol: float) -> None:
    """Same structure; integer tensors identical, probabilities within ``atol`` (0: bit-identical)."""
    assert g.layout == ref.layout and g.root_prior.dtype == torch.float64
    torch.testing.assert_close(g.root_prior, ref.root_prior, rtol=0, atol=atol)
    for a, b in zip(g.kernels, ref.kernels, strict=True):
        assert type(a) is type(b) and a.num_children == b.num_children
        state_a, state_b = a.state(), b.state()
        assert state_a.keys() == state_b.keys()
        for key in state_a:
            assert state_a[key].dtype == state_b[key].dtype
            torch.testing.assert_close(state_a[key], state_b[key], rtol=0, atol=atol if key != "rules" else 0)


def test_save_load_round_trip(tiny_ghm, tmp_path):
    tiny_ghm.save(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["ghm.json", "ghm.safetensors"]
    tiny_ghm.save(tmp_path / "m")  # overwriting is fine
    for g in (GHM.load(tmp_path / "m"), tiny_ghm.to("cpu")):
        _assert_same_ghm(g, tiny_ghm, atol=1e-15)  # see test_save_load_and_to_are_bit_exact
        x = tiny_ghm.sample(64, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(g.log_prob(x), tiny_ghm.log_prob(x), rtol=0, atol=1e-12)
        assert torch.equal(g.sample(64, generator=torch.Generator().manual_seed(0)), x)


def test_save_load_and_to_are_bit_exact(tmp_path):
    ghm = GHM.random_hierarchy(4, 3, 2, 2, rule_probs="zipf", seed=2)
    ghm.save(tmp_path)
    x = ghm.sample(64, generator=torch.Generator().manual_seed(0))
    for g in (GHM.load(tmp_path), ghm.to("cpu")):
        _assert_same_ghm(g, ghm, atol=0)
        assert torch.equal(g.log_prob(x), ghm.log_prob(x))


# ------------------------------------------------------------------------------ determinism
@pytest.mark.parametrize("family", ["rhm", "fac"])
def test_same_seed_same_model_and_samples(family):
    make = (lambda seed: GHM.random_hierarchy(4, 3, 2, 3, seed=seed)) if family == "rhm" else (
        lambda seed: GHM.random_factorized(4, 2, 3, seed=seed))
    a, b, c = make(7), make(7), make(8)
    state = lambda g: [t for k in g.kernels for t in k.state().values()]  # noqa: E731
    assert all(torch.equal(x, y) for x, y in zip(state(a), state(b)))
    assert not all(torch.equal(x, y) for x, y in zip(state(a), state(c)))
    xa = a.sample(100, generator=torch.Generator().manual_seed(0), return_tree=True)[1]
    xb = b.sample(100, generator=torch.Generator().manual_seed(0), return_tree=True)[1]
    assert all(torch.equal(x, y) for x, y in zip(xa, xb))
    assert not torch.equal(a.sample(100, generator=torch.Generator().manual_seed(1)), xa[-1])


def test_global_rngs_are_left_alone():
    from hdiff.bp import posterior, sample_posterior

    torch.manual_seed(123)
    np.random.seed(123)
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()[1].copy()
    gen = torch.Generator().manual_seed(0)
    ghm = GHM.random_hierarchy(4, 3, 2, 3, seed=0)
    GHM.random_factorized(3, 2, 2, seed=0)
    x = ghm.sample(10, generator=gen)
    ev = torch.randn(10, *ghm.leaf_shape, 4, generator=gen)
    posterior(ghm, ev)
    sample_posterior(ghm, ev, generator=gen)
    ghm.entropy()
    GHM.random_factorized(3, 2, 2, seed=0).entropy(num_samples=16, generator=gen)
    ghm.log_prob(x)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], np_state)
