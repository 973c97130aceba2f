"""The opt-in compiled BP path (hdiff.bp.compiled) against the eager path.

Compiling takes seconds per kernel signature (about a minute for this module on a 2-core CPU with a
cold inductor cache), hence ``slow``. The eager-only checks at the bottom are not.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

import hdiff.bp.compiled as fused
from hdiff.bp import log_evidence, posterior
from hdiff.ghm import GHM

from ._reference import invalid_string, logspace_bp, make_evidence, onehot_evidence

GHMS = {
    "rhm-v4m2s2L6": lambda: GHM.random_hierarchy(4, 2, 2, 6, seed=0),
    "rhm-zipf-v4m3s2L5": lambda: GHM.random_hierarchy(4, 3, 2, 5, rule_probs="zipf", seed=1),
    "img-rhm-v4m3L3": lambda: GHM.random_hierarchy(4, 3, 4, 3, layout="image", seed=3),
    "fac-v3s2L5": lambda: GHM.random_factorized(3, 2, 5, seed=2),  # no compiled kernel: stays eager
}


def _close(a: torch.Tensor, b: torch.Tensor, tol: float) -> None:
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", list(GHMS))
def test_compiled_matches_eager(name, dtype):
    """Marginals of every level, log-evidence and root posterior agree with the eager path to rounding,
    for soft, hard and mixed evidence; the -inf pattern of log-evidence is the same."""
    ghm = GHMS[name]()
    tol = 2e-6 if dtype == torch.float32 else 1e-13
    for kind in ("soft", "hard", "mixed"):
        ev = make_evidence(ghm, kind, batch=5, seed=0).to(dtype)
        eager = posterior(ghm, ev, levels=True)
        comp = posterior(ghm, ev, levels=True, compiled=True)
        assert torch.equal(torch.isfinite(eager.log_evidence), torch.isfinite(comp.log_evidence))
        _close(comp.log_evidence, eager.log_evidence, tol)
        _close(comp.root_marginals, eager.root_marginals, tol)
        for a, b in zip(comp.level_marginals, eager.level_marginals):
            _close(a, b, tol)
        _close(comp.leaf_marginals, eager.leaf_marginals, tol)
        _close(log_evidence(ghm, ev, compiled=True), eager.log_evidence, tol)
    assert not fused._FAILED, fused._FAILED


@pytest.mark.slow
def test_compiled_against_reference_and_edge_cases():
    """Against the float64 log-space reference; levels that need log space (peaked evidence), impossible
    rows (uniform marginals, -inf) and invalid evidence behave as on the eager path."""
    ghm = GHMS["rhm-v4m2s2L6"]()
    ev = make_evidence(ghm, "soft", batch=4, seed=3)
    log_ev, leaf, root = logspace_bp(ghm, ev)
    res = posterior(ghm, ev.float(), compiled=True)
    _close(res.log_evidence.double(), log_ev, 1e-5)
    _close(res.leaf_marginals.double(), leaf, 1e-5)
    _close(res.root_marginals.double(), root, 1e-5)

    x = ghm.sample(3, generator=torch.Generator().manual_seed(4))  # 40-nat contradictions: log space upstairs
    flip = torch.rand(x.shape, generator=torch.Generator().manual_seed(5)) < 0.1
    peaked = onehot_evidence(torch.where(flip, (x + 1) % ghm.vocab_size, x), ghm.vocab_size, on=20.0, off=-20.0).float()
    _close(posterior(ghm, peaked, compiled=True).leaf_marginals, posterior(ghm, peaked).leaf_marginals, 2e-6)

    bad = make_evidence(ghm, "hard", batch=3, seed=0).float()
    bad[1] = onehot_evidence(invalid_string(ghm, seed=0), ghm.vocab_size).float()
    comp = posterior(ghm, bad, compiled=True)
    assert comp.log_evidence[1] == -math.inf and torch.isfinite(comp.log_evidence[[0, 2]]).all()
    assert torch.allclose(comp.leaf_marginals[1], torch.full_like(comp.leaf_marginals[1], 1 / ghm.vocab_size))
    _close(comp.leaf_marginals, posterior(ghm, bad).leaf_marginals, 2e-6)

    nan = ev.float().clone()
    nan[0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        posterior(ghm, nan, compiled=True)
    empty = posterior(ghm, ev[:0].float(), compiled=True)
    assert empty.leaf_marginals.shape == (0, *ghm.leaf_shape, ghm.vocab_size)


@pytest.mark.slow
def test_compiled_with_chunks_matches_unchunked():
    ghm = GHMS["rhm-v4m2s2L6"]()
    ev = make_evidence(ghm, "mixed", batch=9, seed=1).float()
    whole = posterior(ghm, ev, compiled=True, max_bytes=math.inf)
    from hdiff.bp import row_bytes
    parts = posterior(ghm, ev, compiled=True, max_bytes=4 * row_bytes(ghm))
    _close(parts.leaf_marginals, whole.leaf_marginals, 2e-6)
    _close(parts.log_evidence, whole.log_evidence, 2e-6)


def test_compile_is_opt_in(monkeypatch):
    monkeypatch.delenv(fused.ENV, raising=False)
    assert not fused.requested(None) and fused.requested(True) and not fused.requested(False)
    for value, on in [("1", True), ("true", True), ("0", False), ("", False), ("off", False)]:
        monkeypatch.setenv(fused.ENV, value)
        assert fused.requested(None) is on
        assert fused.requested(False) is False


def test_eager_calls_never_touch_the_compiler():
    """A run that does not opt in neither compiles nor imports torch._dynamo (no short run pays)."""
    code = ("import sys, torch\n"
            "from hdiff.bp import posterior, log_evidence, sample_posterior\n"
            "from hdiff.ghm import GHM\n"
            "g = GHM.random_hierarchy(4, 2, 2, 4, seed=0)\n"
            "ev = torch.randn(3, 16, 4)\n"
            "posterior(g, ev); log_evidence(g, ev); sample_posterior(g, ev)\n"
            "import hdiff.bp.compiled as c\n"
            "assert not c._COMPILED, c._COMPILED\n"
            "assert 'torch._dynamo' not in sys.modules\n")
    env = {k: v for k, v in os.environ.items() if k != fused.ENV}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
