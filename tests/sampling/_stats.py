"""Statistical checks of generated samples against a GHM's exact distribution."""

from __future__ import annotations

import math

import torch

from hdiff.bp import posterior
from hdiff.ghm import GHM, enumerate_strings

#: |z| above this fails a z-test; with ~100 cells per check a false alarm has probability ~1e-3
Z_MAX = 4.5


def leaf_marginal_z(ghm: GHM, tokens: torch.Tensor) -> float:
    """Largest |z| of per-(leaf, token) frequencies against the exact leaf marginals."""
    exact = posterior(ghm, torch.zeros(1, *ghm.leaf_shape, ghm.vocab_size, dtype=torch.float64)).leaf_marginals[0]
    freq = torch.nn.functional.one_hot(tokens, ghm.vocab_size).double().mean(0)
    se = (exact * (1 - exact) / tokens.shape[0]).sqrt().clamp_min(1e-12)
    return float(((freq - exact).abs() / se).max())


def root_z(ghm: GHM, tokens: torch.Tensor) -> float:
    """Largest |z| of the mean root posterior ``p(root | x)`` over samples against the prior.

    ``E_x p(root | x) = prior`` when ``x ~ p``; for unambiguous grammars it is the root-class histogram.
    """
    roots = posterior(ghm, ghm.hard_evidence(tokens, dtype=torch.float64)).root_marginals
    se = (roots.var(0) / roots.shape[0]).sqrt().clamp_min(1e-12)
    return float(((roots.mean(0) - ghm.root_prior) .abs() / se).max())


def tv_to_exact(ghm: GHM, tokens: torch.Tensor) -> tuple[float, float]:
    """Total variation between the empirical distribution of ``tokens`` and the exact one (enumeration),
    and the TV expected from sampling error alone (``sum_x sqrt(p(1-p)/(2 pi n))``, the mean |dev| of a multinomial)."""
    strings, prob = enumerate_strings(ghm)
    n = tokens.shape[0]
    codes = {tuple(s.flatten().tolist()): i for i, s in enumerate(strings)}
    counts = torch.zeros(len(strings), dtype=torch.float64)
    outside = 0
    for row in tokens.flatten(1).tolist():
        i = codes.get(tuple(row))
        if i is None:
            outside += 1
        else:
            counts[i] += 1
    tv = 0.5 * (float((counts / n - prob).abs().sum()) + outside / n)
    expected = float((prob * (1 - prob) / (2 * math.pi * n)).sqrt().sum())
    return tv, expected
