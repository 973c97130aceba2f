"""BP's probability-space fast paths against its log-space paths, and the helpers that choose them."""

from __future__ import annotations

import math

import pytest
import torch

import hdiff.bp.messages as messages
import hdiff.bp.propagation as propagation
from hdiff.bp import posterior, sample_posterior
from hdiff.bp.messages import finite_shift, prob_spread_of, spread_of
from hdiff.ghm import GHM

from ._reference import logspace_bp, make_evidence, onehot_evidence

NEVER_SAFE = {torch.float32: -1.0, torch.float64: -1.0}  # every level takes its exact log-space path

GHMS = {
    "rhm-v4m2s2L6": lambda: GHM.random_hierarchy(4, 2, 2, 6, seed=0),
    "rhm-zipf-v4m3s2L5": lambda: GHM.random_hierarchy(4, 3, 2, 5, rule_probs="zipf", seed=1),
    "img-rhm-v4m3L3": lambda: GHM.random_hierarchy(4, 3, 4, 3, layout="image", seed=3),
    "fac-v3s2L6": lambda: GHM.random_factorized(3, 2, 6, seed=2),
}


def test_spread_helpers():
    h = torch.tensor([[0.0, -3.0], [-1.5, 0.0]])
    assert spread_of(h) == 3.0
    h[1, 0] = -math.inf  # exact zeros are not part of the spread
    assert spread_of(h) == 3.0
    assert spread_of(torch.full((2, 3), -math.inf)) == 0.0 and spread_of(torch.empty(2, 0)) == 0.0
    u = h.exp()
    assert prob_spread_of(u) == pytest.approx(3.0, abs=1e-6)
    assert prob_spread_of(torch.zeros(2, 3)) == 0.0 and prob_spread_of(torch.empty(2, 0)) == 0.0
    mx = torch.tensor([0.5, -math.inf])
    col = torch.tensor([[-1.0, -math.inf], [0.5, -math.inf]])
    shifted = col - finite_shift(mx)
    assert torch.equal(shifted, torch.tensor([[-1.5, -math.inf], [0.0, -math.inf]]))


def _levels_taken(monkeypatch) -> list[bool]:
    """Record, per upward level (bottom first), whether it returned its parents in probability form."""
    seen: list[bool] = []

    def spy(kernel, x, prob):
        out = messages.upward(kernel, x, prob)
        seen.append(out[1])
        return out

    monkeypatch.setattr(propagation, "upward", spy)
    return seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("kind", ["soft", "hard", "mixed", "peaked"])
@pytest.mark.parametrize("name", list(GHMS))
def test_fast_paths_equal_log_space_paths(monkeypatch, name, kind, dtype):
    """Same marginals and log-evidence with the fast paths allowed and with every level forced to log space."""
    ghm = GHMS[name]()
    if kind == "peaked":  # a sample, contradicted by 40 nats at a few leaves: the upper levels need log space
        x = ghm.sample(3, generator=torch.Generator().manual_seed(4))
        flip = torch.rand(x.shape, generator=torch.Generator().manual_seed(5)) < 0.1
        ev = onehot_evidence(torch.where(flip, (x + 1) % ghm.vocab_size, x), ghm.vocab_size, on=20.0, off=-20.0)
    else:
        ev = make_evidence(ghm, kind, batch=3, seed=0)
    ev = ev.to(dtype)
    fast = posterior(ghm, ev, levels=True)
    monkeypatch.setattr(messages, "SAFE_RANGE", NEVER_SAFE)
    slow = posterior(ghm, ev, levels=True)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    assert torch.equal(torch.isfinite(fast.log_evidence), torch.isfinite(slow.log_evidence))
    fin = torch.isfinite(slow.log_evidence)
    torch.testing.assert_close(fast.log_evidence[fin], slow.log_evidence[fin], rtol=tol, atol=tol)
    for a, b in zip(fast.level_marginals, slow.level_marginals):
        torch.testing.assert_close(a, b, rtol=0, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_probability_levels_then_log_levels_match_reference(monkeypatch, dtype):
    """Soft evidence keeps the bottom levels in probability form; sharp evidence makes the spread grow up
    the tree until a level must switch to log space from probability-form children. Both must hold
    the float64 log-space reference, hard zeros included."""
    ghm = GHM.random_hierarchy(4, 2, 2, 8, seed=0)
    gen = torch.Generator().manual_seed(0)
    x = ghm.sample(3, generator=gen)
    amp = 6.0 if dtype == torch.float32 else 60.0  # float64's safe range is ~9x wider
    ev = amp * torch.nn.functional.one_hot(x, ghm.vocab_size).double() + torch.randn(*x.shape, 4, generator=gen,
                                                                                   dtype=torch.float64)
    ev[0, :5] = ev[0, :5].masked_fill(torch.nn.functional.one_hot(x[0, :5], 4) == 0, -math.inf)  # exact zeros
    seen = _levels_taken(monkeypatch)
    res = posterior(ghm, ev.to(dtype), levels=True)
    assert seen[0] and not seen[-1], f"expected probability form at the bottom, log form at the top: {seen}"
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    log_ev, leaf, root = logspace_bp(ghm, ev[1:])  # the reference needs finite evidence
    torch.testing.assert_close(res.log_evidence[1:].double(), log_ev, rtol=tol, atol=0)
    torch.testing.assert_close(res.leaf_marginals[1:].double(), leaf, rtol=0, atol=tol)
    torch.testing.assert_close(res.root_marginals[1:].double(), root, rtol=0, atol=tol)
    monkeypatch.setattr(messages, "SAFE_RANGE", NEVER_SAFE)  # the row with exact zeros: against log space
    slow = posterior(ghm, ev[:1].to(dtype), levels=True)
    torch.testing.assert_close(res.log_evidence[:1], slow.log_evidence, rtol=tol, atol=0)
    for a, b in zip(res.level_marginals, slow.level_marginals):
        torch.testing.assert_close(a[:1], b, rtol=0, atol=tol)


def test_sampling_from_probability_form_caches_respects_hard_evidence():
    """Joint samples drawn from the undivided rule products of the fast path never pick an excluded symbol."""
    ghm = GHM.random_hierarchy(4, 2, 2, 5, seed=0)
    ev = make_evidence(ghm, "mixed", batch=64, seed=2).float()
    leaves = sample_posterior(ghm, ev, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(ev.gather(-1, leaves.unsqueeze(-1))).all()
