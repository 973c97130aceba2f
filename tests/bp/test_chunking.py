"""BP under a memory budget: a batch split into chunks gives the results of one call.

Bit-identical for production kernels. A factorized level's matmul goes through BLAS, whose rounding
depends on the matrix shape (and for float64 on a column's position), so there the results agree
to a few ulps; the path choices are the same in both cases.
"""

from __future__ import annotations

import math

import pytest
import torch

import hdiff.bp.propagation as propagation
from hdiff.bp import log_evidence, posterior, row_bytes, sample_posterior, upward_messages
from hdiff.ghm import GHM
from hdiff.ghm.kernels import FactorizedKernel

from ._reference import invalid_string, make_evidence, onehot_evidence

GHMS = {
    "rhm-v4m2s2L6": lambda: GHM.random_hierarchy(4, 2, 2, 6, seed=0),
    "rhm-zipf-v4m3s2L5": lambda: GHM.random_hierarchy(4, 3, 2, 5, rule_probs="zipf", seed=1),
    "img-rhm-v4m3L3": lambda: GHM.random_hierarchy(4, 3, 4, 3, layout="image", seed=3),
    "fac-v3s2L6": lambda: GHM.random_factorized(3, 2, 6, seed=2),
    "rhm-v16m8s2L4": lambda: GHM.random_hierarchy(16, 8, 2, 4, seed=5),  # sums over 8 rules and 16 symbols
    "fac-v16s2L4": lambda: GHM.random_factorized(16, 2, 4, seed=6),  # a 16 x 16 matmul per level
}
B = 11  # with 3 rows per chunk: chunks of 3, 3, 3, 2


def _budget(ghm: GHM, dtype: torch.dtype, rows: int = 3, levels: bool = False) -> int:
    return rows * row_bytes(ghm, dtype, levels=levels)


def _evidence(ghm: GHM, kind: str, dtype: torch.dtype) -> torch.Tensor:
    if kind == "peaked-late":  # soft rows first, then rows that contradict a sample by 40 nats: the later
        # chunks need log space where the first ones took probability space, which restarts the chunks
        soft = make_evidence(ghm, "soft", batch=6, seed=0)
        x = ghm.sample(B - 6, generator=torch.Generator().manual_seed(4))
        flip = torch.rand(x.shape, generator=torch.Generator().manual_seed(5)) < 0.2
        peaked = onehot_evidence(torch.where(flip, (x + 1) % ghm.vocab_size, x), ghm.vocab_size, on=20.0, off=-20.0)
        ev = torch.cat([soft, peaked.to(soft.dtype)])
    else:
        ev = make_evidence(ghm, kind, batch=B, seed=1)
    return ev.to(dtype)


def _equal(a, b, bitwise: bool = True) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype
    if bitwise:
        assert torch.equal(a, b), f"max diff {float((a.double() - b.double()).abs().nan_to_num().max())}"
    else:  # same -inf pattern, values to a few ulps
        tol = 1e-5 if a.dtype == torch.float32 else 1e-12
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def _bitwise(ghm: GHM) -> bool:
    return not any(isinstance(k, FactorizedKernel) for k in ghm.kernels)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("kind", ["soft", "hard", "mixed", "peaked-late"])
@pytest.mark.parametrize("name", list(GHMS))
def test_chunked_posterior_is_bit_identical(name, kind, dtype):
    ghm = GHMS[name]()
    ev = _evidence(ghm, kind, dtype)
    bitwise = _bitwise(ghm)
    whole = posterior(ghm, ev, levels=True, max_bytes=math.inf)
    parts = posterior(ghm, ev, levels=True, max_bytes=_budget(ghm, dtype, levels=True))
    for a, b in [(whole.leaf_marginals, parts.leaf_marginals), (whole.log_evidence, parts.log_evidence),
                 (whole.root_marginals, parts.root_marginals), *zip(whole.level_marginals, parts.level_marginals)]:
        _equal(a, b, bitwise)
    _equal(log_evidence(ghm, ev, max_bytes=math.inf), log_evidence(ghm, ev, max_bytes=_budget(ghm, dtype)), bitwise)
    _equal(whole.log_evidence, log_evidence(ghm, ev, max_bytes=_budget(ghm, dtype, rows=2)), bitwise)
    for a, b in zip(upward_messages(ghm, ev, max_bytes=math.inf),
                    upward_messages(ghm, ev, max_bytes=_budget(ghm, dtype, levels=True))):
        _equal(a, b, bitwise)
    leaf = posterior(ghm, ev, max_bytes=_budget(ghm, dtype, rows=1)).leaf_marginals  # one row per chunk
    _equal(whole.leaf_marginals, leaf, bitwise)


def test_chunks_really_run_and_restart(monkeypatch):
    """The budget splits the batch, and a later chunk that needs log space makes the earlier ones rerun."""
    ghm = GHMS["rhm-v4m2s2L6"]()
    ev = _evidence(ghm, "peaked-late", torch.float32)
    sizes: list[int] = []
    restarts: list[int] = []
    real_posterior_rows, real_restart = propagation._posterior_rows, propagation._Restart.__init__

    def spy_rows(ghm_, ll, *args):
        sizes.append(ll.shape[0])
        return real_posterior_rows(ghm_, ll, *args)

    def spy_restart(self, *args):
        restarts.append(1)
        real_restart(self, *args)

    monkeypatch.setattr(propagation, "_posterior_rows", spy_rows)
    monkeypatch.setattr(propagation._Restart, "__init__", spy_restart)
    posterior(ghm, ev, max_bytes=_budget(ghm, torch.float32))
    assert restarts, "the peaked rows in the last chunks should force a restart"
    assert sizes[-4:] == [3, 3, 3, 2], sizes
    sizes.clear()
    posterior(ghm, ev, max_bytes=math.inf)
    assert sizes == [B]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", list(GHMS))
def test_chunked_sampling_draws_the_same_samples(name, dtype):
    """The generator is consumed as by one unchunked call, so the same seed gives the same samples."""
    ghm = GHMS[name]()
    ev = _evidence(ghm, "mixed", dtype)
    leaves, tree = sample_posterior(ghm, ev, generator=torch.Generator().manual_seed(7), return_tree=True,
                                    max_bytes=math.inf)
    for rows in (1, 3):
        g = torch.Generator().manual_seed(7)
        leaves_c, tree_c = sample_posterior(ghm, ev, generator=g, return_tree=True,
                                            max_bytes=_budget(ghm, dtype, rows=rows, levels=True))
        _equal(leaves, leaves_c)  # the same uniforms; with factorized kernels the probabilities agree to
        for a, b in zip(tree, tree_c):  # rounding, so a draw could only differ on a boundary (not for these seeds)
            _equal(a, b)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    _equal(sample_posterior(ghm, ev, generator=g1, max_bytes=math.inf),
           sample_posterior(ghm, ev, generator=g2, max_bytes=_budget(ghm, dtype)))
    assert torch.equal(g1.get_state(), g2.get_state()), "chunking must consume the generator as one call does"


@pytest.mark.parametrize("name", ["rhm-v4m2s2L6", "img-rhm-v4m3L3"])
def test_impossible_rows_under_chunking(name):
    """A row with impossible evidence: -inf and uniform marginals in its chunk, the others untouched;
    sampling names it by its row in the whole batch."""
    ghm = GHMS[name]()
    ev = make_evidence(ghm, "hard", batch=B, seed=0).float()
    ev[7] = onehot_evidence(invalid_string(ghm, seed=0), ghm.vocab_size).float()
    whole = posterior(ghm, ev, max_bytes=math.inf)
    assert not torch.isfinite(whole.log_evidence[7]) and torch.isfinite(whole.log_evidence[:7]).all()
    parts = posterior(ghm, ev, max_bytes=_budget(ghm, torch.float32))
    for a, b in zip([whole.leaf_marginals, whole.log_evidence, whole.root_marginals],
                    [parts.leaf_marginals, parts.log_evidence, parts.root_marginals]):
        _equal(a, b)
    with pytest.raises(ValueError, match=r"rows \[7\]"):
        sample_posterior(ghm, ev, generator=torch.Generator().manual_seed(0), max_bytes=_budget(ghm, torch.float32))


def test_budget_and_row_estimate():
    ghm = GHMS["rhm-v4m2s2L6"]()
    per_row = row_bytes(ghm)
    assert per_row > 4 * ghm.num_leaves * ghm.vocab_size  # at least the evidence in float32
    assert row_bytes(ghm, torch.float64) == 2 * per_row
    assert row_bytes(ghm, levels=True) > per_row
    assert propagation._rows_per_chunk(per_row, 10 * per_row) == 10
    assert propagation._rows_per_chunk(per_row, 1) == 1  # a row that exceeds the budget still runs
    with pytest.raises(ValueError, match="max_bytes"):
        posterior(ghm, make_evidence(ghm, "soft", batch=2, seed=0), max_bytes=0)
    empty = posterior(ghm, make_evidence(ghm, "soft", batch=2, seed=0)[:0], max_bytes=1)
    assert empty.leaf_marginals.shape == (0, *ghm.leaf_shape, ghm.vocab_size)
