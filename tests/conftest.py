"""Shared fixtures: tiny GHMs that can be enumerated, and a chi-square goodness-of-fit helper."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub

from typing import Callable  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from hdiff.ghm import GHM, FactorizedKernel, ProductionKernel  # noqa: E402


def ambiguous_mixed_ghm() -> GHM:
    """Non-uniform root prior; an ambiguous production level (a tuple reachable from two parents,
    a repeated tuple, a zero-weight rule) whose child alphabet (4) exceeds the symbols its rules
    use; then a factorized level with zeros in its transitions. Leaves: 4 tokens over 3 symbols."""
    rules = torch.tensor([[[0, 1], [1, 1], [0, 1]],
                          [[1, 0], [0, 1], [2, 2]]])
    weights = torch.tensor([[0.5, 0.3, 0.2], [0.6, 0.4, 0.0]], dtype=torch.float64)
    t = torch.tensor([[[0.7, 0.3, 0.0], [0.0, 0.5, 0.5], [0.2, 0.2, 0.6], [1.0, 0.0, 0.0]],
                      [[0.1, 0.0, 0.9], [0.4, 0.6, 0.0], [0.0, 1.0, 0.0], [0.3, 0.3, 0.4]]],
                     dtype=torch.float64)
    return GHM(torch.tensor([0.3, 0.7], dtype=torch.float64),
               [ProductionKernel(rules, weights, num_children=4), FactorizedKernel(t)])


def sparse_factorized_ghm() -> GHM:
    """A factorized GHM whose transitions have zeros, so some strings are impossible."""
    t0 = torch.tensor([[[0.5, 0.5, 0.0], [0.0, 0.2, 0.8], [1.0, 0.0, 0.0]],
                       [[0.0, 0.3, 0.7], [0.6, 0.0, 0.4], [0.5, 0.5, 0.0]]], dtype=torch.float64)
    t1 = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]],
                       [[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]], dtype=torch.float64)
    return GHM(torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64), [FactorizedKernel(t0), FactorizedKernel(t1)])


#: Tiny GHMs of both families and layouts, small enough for :func:`hdiff.ghm.enumerate_trees`.
TINY_GHMS: dict[str, Callable[[], GHM]] = {
    "rhm-v3m2s2L2": lambda: GHM.random_hierarchy(3, 2, 2, 2, seed=1),
    "rhm-zipf-v4m3s2L2": lambda: GHM.random_hierarchy(4, 3, 2, 2, rule_probs="zipf", seed=2),
    "rhm-nc2-v4m2s2L2": lambda: GHM.random_hierarchy(4, 2, 2, 2, num_classes=2, seed=3),
    "rhm-v2m2s3L2": lambda: GHM.random_hierarchy(2, 2, 3, 2, seed=4),
    "rhm-v2m2s2L3": lambda: GHM.random_hierarchy(2, 2, 2, 3, seed=5),
    "fac-v2s2L2": lambda: GHM.random_factorized(2, 2, 2, seed=6),
    "fac-nc2-v3s2L2": lambda: GHM.random_factorized(3, 2, 2, num_classes=2, concentration=0.5, seed=7),
    "fac-sparse": sparse_factorized_ghm,
    "mixed-ambiguous": ambiguous_mixed_ghm,
    "img-rhm-v3m2L2": lambda: GHM.random_hierarchy(3, 2, 4, 2, num_classes=2, layout="image", seed=8),
    "img-rhm-zipf-v2m3L1": lambda: GHM.random_hierarchy(2, 3, 4, 1, rule_probs="zipf", layout="image", seed=9),
    "img-fac-v3L1": lambda: GHM.random_factorized(3, 4, 1, layout="image", seed=10),
}


@pytest.fixture(params=list(TINY_GHMS), ids=list(TINY_GHMS))
def tiny_ghm(request) -> GHM:
    """Each GHM of :data:`TINY_GHMS` in turn."""
    return TINY_GHMS[request.param]()


def chisquare_pvalue(samples: torch.Tensor, support: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of Pearson's chi-square test of ``samples`` against the distribution ``probs``.

    Args:
        samples: ``(n, ...)`` integer outcomes (e.g. token strings or whole trees).
        support: ``(K, ...)`` the distinct outcomes, same trailing shape.
        probs: ``(K,)`` their probabilities (summing to one); zero entries are allowed.

    Every sample must be an outcome of positive probability (asserted: a sample outside the
    support is a plain failure, not a small p-value). Cells with expected count < 5 are pooled
    into one cell (merged with the smallest remaining cell if the pool is still < 5).
    """
    from scipy.stats import chisquare

    n = samples.shape[0]
    flat_s = samples.reshape(n, -1).cpu().numpy()
    flat_k = support.reshape(support.shape[0], -1).cpu().numpy()
    index = {tuple(row): k for k, row in enumerate(flat_k)}
    probs = probs.double().cpu().numpy()
    counts = np.zeros(len(flat_k))
    for row in map(tuple, flat_s):
        k = index.get(row)
        assert k is not None and probs[k] > 0, f"sampled outcome {row} has probability 0"
        counts[k] += 1
    expected = probs / probs.sum() * n
    keep = expected >= 5
    obs, exp = list(counts[keep]), list(expected[keep])
    pooled_obs, pooled_exp = counts[~keep].sum(), expected[~keep].sum()
    if pooled_exp > 0:
        if pooled_exp < 5 and exp:
            i = int(np.argmin(exp))
            obs[i] += pooled_obs
            exp[i] += pooled_exp
        else:
            obs.append(pooled_obs)
            exp.append(pooled_exp)
    assert len(obs) >= 2, "the chi-square test needs at least two cells"
    return float(chisquare(np.asarray(obs), np.asarray(exp)).pvalue)


@pytest.fixture
def chi2_pvalue() -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], float]:
    """:func:`chisquare_pvalue`, as a fixture."""
    return chisquare_pvalue


@pytest.fixture
def tiny_ghms() -> dict[str, Callable[[], GHM]]:
    """:data:`TINY_GHMS`, to pick one by name."""
    return TINY_GHMS


def assert_tree_consistent(ghm: GHM, levels: list[torch.Tensor]) -> None:
    """Every node's children (in the GHM's layout) can be emitted by its symbol with positive probability:
    a positive-weight rule of a production kernel, positive transitions of a factorized one."""
    from hdiff.ghm import to_tree_order

    assert len(levels) == ghm.depth + 1
    n = levels[0].shape[0]
    for level, x in enumerate(levels):
        assert x.dtype == torch.int64 and x.shape == (n, *ghm.level_shape(level))
        assert x.numel() == 0 or (int(x.min()) >= 0 and int(x.max()) < ghm.symbols(level))
    for level, kernel in enumerate(ghm.kernels):
        parents = to_tree_order(levels[level], ghm.layout, level).reshape(n, -1)  # (n, N)
        children = to_tree_order(levels[level + 1], ghm.layout, level + 1).reshape(n, -1, ghm.branching)
        if isinstance(kernel, ProductionKernel):
            match = (kernel.rules[parents] == children.unsqueeze(2)).all(-1)  # (n, N, m)
            ok = (match & (kernel.weights[parents] > 0)).any(-1)
        else:
            j = torch.arange(ghm.branching)
            ok = (kernel.transitions[j, parents.unsqueeze(-1), children] > 0).all(-1)
        assert ok.all(), f"level {level}: {int((~ok).sum())} nodes emit children their kernel cannot produce"


@pytest.fixture
def tree_consistent() -> Callable[[GHM, list[torch.Tensor]], None]:
    """:func:`assert_tree_consistent`, as a fixture."""
    return assert_tree_consistent
