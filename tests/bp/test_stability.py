"""Numerical stability: deep trees in float32, and very peaked evidence (consistent or not)."""

from __future__ import annotations

import math

import pytest
import torch

from hdiff.bp import log_evidence, posterior
from hdiff.ghm import GHM

from ._reference import exact_posterior, invalid_string, logspace_bp, make_evidence, onehot_evidence

DEEP = {
    "rhm-v4m2s2L12": lambda: GHM.random_hierarchy(4, 2, 2, 12, seed=0),
    "rhm-zipf-v4m3s2L12": lambda: GHM.random_hierarchy(4, 3, 2, 12, rule_probs="zipf", seed=1),
    "fac-v3s2L12": lambda: GHM.random_factorized(3, 2, 12, seed=2),
    "img-rhm-v4m3L6": lambda: GHM.random_hierarchy(4, 3, 4, 6, layout="image", seed=3),
    "rhm-v3m2s2L16": lambda: GHM.random_hierarchy(3, 2, 2, 16, seed=4),
}


def _check_valid(res, ghm: GHM, atol: float = 1e-5) -> None:
    """No NaN/inf anywhere; every level's marginals are distributions."""
    assert not torch.isnan(res.log_evidence).any()
    for q in res.level_marginals or [res.leaf_marginals, res.root_marginals]:
        assert torch.isfinite(q).all() and (q >= 0).all()
        torch.testing.assert_close(q.sum(-1).double(), torch.ones(q.shape[:-1], dtype=torch.float64),
                                   rtol=0, atol=atol)


def _noisy_observation(ghm: GHM, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A true sample ``x`` and float32 evidence ``8 * onehot(x) + randn`` (a Gaussian-like observation)."""
    gen = torch.Generator().manual_seed(seed)
    x = ghm.sample(batch, generator=gen)
    ev = 8 * torch.nn.functional.one_hot(x, ghm.vocab_size).float()
    return x, ev + torch.randn(ev.shape, generator=gen)


# ------------------------------------------------ very peaked evidence, and the deep reference
PEAKED_GHMS = ["rhm-v3m2s2L2", "rhm-nc2-v4m2s2L2", "img-rhm-v3m2L2", "mixed-ambiguous", "fac-sparse"]


def _peaked(ghm: GHM, amp: float, seed: int = 0) -> torch.Tensor:
    """float64 evidence ``+amp`` at an invalid string's tokens and ``-amp`` elsewhere (possible, but
    every explanation contradicts some leaf by ``2 * amp`` nats). A string of positive probability
    when the GHM has no invalid one."""
    try:
        x = invalid_string(ghm, seed=seed, tries=200)
    except AssertionError:
        x = ghm.sample(1, generator=torch.Generator().manual_seed(seed))
    return onehot_evidence(x, ghm.vocab_size, on=amp, off=-amp)


def test_logspace_reference_matches_enumeration(tiny_ghm):
    """The deep tests' reference (a naive float64 log-space BP) is itself exact on tiny GHMs."""
    for ev in [make_evidence(tiny_ghm, "soft", batch=3, seed=0), _peaked(tiny_ghm, 500.0, seed=1)]:
        ex = exact_posterior(tiny_ghm, ev)
        log_ev, leaf, root = logspace_bp(tiny_ghm, ev)
        torch.testing.assert_close(log_ev, ex.log_evidence, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(leaf, ex.leaf_marginals, rtol=0, atol=1e-12)
        torch.testing.assert_close(root, ex.root_marginals, rtol=0, atol=1e-12)


def _assert_matches_reference(ghm: GHM, ev: torch.Tensor, dtype: torch.dtype) -> None:
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    log_ev, leaf, root = logspace_bp(ghm, ev)
    res = posterior(ghm, ev.to(dtype), levels=True)
    _check_valid(res, ghm)
    assert torch.isfinite(res.log_evidence).all(), f"log_evidence {res.log_evidence} vs exact {log_ev}"
    torch.testing.assert_close(res.log_evidence.double(), log_ev, rtol=tol, atol=0)
    torch.testing.assert_close(res.leaf_marginals.double(), leaf, rtol=0, atol=tol)
    torch.testing.assert_close(res.root_marginals.double(), root, rtol=0, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", list(DEEP))
def test_deep_noisy_observation_matches_logspace_reference(name, dtype):
    ghm = DEEP[name]()
    x, ev = _noisy_observation(ghm, batch=4 if ghm.num_leaves <= 4096 else 1, seed=0)
    _assert_matches_reference(ghm, ev.double(), dtype)
    if dtype == torch.float32:  # every level, float32 against float64
        r32, r64 = posterior(ghm, ev, levels=True), posterior(ghm, ev.double(), levels=True)
        for a, b in zip(r32.level_marginals, r64.level_marginals):
            torch.testing.assert_close(a.double(), b, rtol=0, atol=1e-5)
        # the observation is informative: the posterior mode is (mostly) the true sample
        assert (r64.leaf_marginals.argmax(-1) == x).double().mean() > 0.9


@pytest.mark.slow
@pytest.mark.parametrize("name", ["rhm-v3m2s2L18", "fac-v2s2L18"])
def test_depth_18_matches_logspace_reference(name):
    ghm = (GHM.random_hierarchy(3, 2, 2, 18, seed=6) if name.startswith("rhm")
           else GHM.random_factorized(2, 2, 18, seed=7))  # 262144 leaves
    _, ev = _noisy_observation(ghm, batch=1, seed=0)
    _assert_matches_reference(ghm, ev.double(), torch.float32)
    x = ghm.sample(2, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(ghm.log_prob(x)).all()


@pytest.mark.parametrize("name", list(DEEP))
def test_deep_log_prob_of_a_sample_is_finite_and_exact(name):
    ghm = DEEP[name]()
    x = ghm.sample(3, generator=torch.Generator().manual_seed(1))
    lp = ghm.log_prob(x)
    assert lp.dtype == torch.float64 and torch.isfinite(lp).all()
    hard32 = log_evidence(ghm, onehot_evidence(x, ghm.vocab_size).float())
    torch.testing.assert_close(hard32.double(), lp, rtol=1e-5, atol=0)
    if name.startswith("rhm-v"):  # uniform RHM: every valid string has probability 1 / P_max
        s, L, m, nc = ghm.branching, ghm.depth, ghm.kernels[0].num_rules, ghm.num_classes
        log_pmax = math.log(nc) + (s**L - 1) // (s - 1) * math.log(m)
        torch.testing.assert_close(lp, torch.full_like(lp, -log_pmax), rtol=1e-12, atol=0)


def test_deep_impossible_row_in_a_batch():
    ghm = DEEP["rhm-v4m2s2L12"]()
    x, ev = _noisy_observation(ghm, batch=2, seed=3)
    bad = onehot_evidence(invalid_string(ghm), ghm.vocab_size).float()
    res = posterior(ghm, torch.cat([ev, bad]), levels=True)
    assert torch.isfinite(res.log_evidence[:2]).all() and res.log_evidence[2] == -math.inf
    _check_valid(res, ghm)
    assert torch.all(res.leaf_marginals[2] == 1.0 / ghm.vocab_size)
    alone = posterior(ghm, ev)
    torch.testing.assert_close(res.log_evidence[:2], alone.log_evidence, rtol=1e-6, atol=0)
    torch.testing.assert_close(res.leaf_marginals[:2], alone.leaf_marginals, rtol=0, atol=1e-6)


# Evidence that contradicts the grammar by tens to hundreds of nats per leaf: messages are kept in log
# space, so nothing underflows to an exact zero (these cases failed with probability-space messages).


@pytest.mark.parametrize("dtype,amp", [
    (torch.float32, 20.0), (torch.float32, 44.0),
    (torch.float32, 60.0), (torch.float32, 500.0), (torch.float64, 60.0), (torch.float64, 500.0),
], ids=lambda p: str(p).replace("torch.", ""))
def test_peaked_inconsistent_evidence_never_gives_nan(tiny_ghms, dtype, amp):
    for name in PEAKED_GHMS:
        ghm = tiny_ghms[name]()
        res = posterior(ghm, _peaked(ghm, amp).to(dtype), levels=True)
        _check_valid(res, ghm)
        assert res.log_evidence[0] < math.inf


@pytest.mark.parametrize("dtype,amp", [
    (torch.float32, 20.0), (torch.float32, 40.0),
    (torch.float32, 44.0),
    (torch.float32, 60.0),
    (torch.float32, 500.0),
    (torch.float64, 60.0), (torch.float64, 350.0),
    (torch.float64, 500.0),
], ids=lambda p: str(p).replace("torch.", ""))
def test_peaked_inconsistent_evidence_matches_enumeration(tiny_ghms, dtype, amp):
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    for name in PEAKED_GHMS:
        ghm = tiny_ghms[name]()
        ev = _peaked(ghm, amp)
        ex = exact_posterior(ghm, ev)
        assert torch.isfinite(ex.log_evidence).all()
        res = posterior(ghm, ev.to(dtype), levels=True)
        assert torch.isfinite(res.log_evidence).all(), f"{name}: log_evidence {res.log_evidence}"
        # float32 rounds intermediate sums of size ~amp * leaves: relative to that scale, not to the result
        err = (res.log_evidence.double() - ex.log_evidence).abs() / ex.log_evidence.abs().clamp_min(amp)
        assert bool((err <= tol).all()), f"{name}: log_evidence {res.log_evidence} vs {ex.log_evidence}"
        for level, (a, b) in enumerate(zip(res.level_marginals, ex.level_marginals)):
            torch.testing.assert_close(a.double(), b, rtol=0, atol=tol, msg=lambda m: f"{name} level {level}: {m}")


@pytest.mark.parametrize("dtype,amp", [
    (torch.float32, 20.0), (torch.float32, 30.0),
    (torch.float64, 100.0), (torch.float64, 200.0),
], ids=lambda p: str(p).replace("torch.", ""))
def test_deep_peaked_inconsistent_evidence_matches_logspace_reference(dtype, amp):
    ghm = DEEP["rhm-v4m2s2L12"]()
    gen = torch.Generator().manual_seed(5)
    x = ghm.sample(2, generator=gen)
    flip = torch.rand(x.shape, generator=gen) < 0.01  # ~40 corrupted tokens: invalid strings
    x = torch.where(flip, (x + 1) % ghm.vocab_size, x)
    assert (ghm.log_prob(x) == -math.inf).all()
    # (+-30 nats per leaf already breaks float32 here, +-200 float64: contradictions add up in the tree)
    _assert_matches_reference(ghm, onehot_evidence(x, ghm.vocab_size, on=amp, off=-amp), dtype)
