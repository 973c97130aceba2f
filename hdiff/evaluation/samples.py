"""Exact metrics of generated samples under the true GHM."""

from __future__ import annotations

import math

import torch

from hdiff.bp import posterior
from hdiff.ghm import GHM


def sample_metrics(ghm: GHM, tokens: torch.Tensor) -> dict:
    """Validity, exact log-likelihood and root-class histogram of samples.

    Args:
        ghm: the true model.
        tokens: ``(B, *leaf_shape)`` samples.

    Returns:
        ``valid_fraction`` (exact ``log p > -inf``), ``log_prob_bits_per_leaf`` (mean over valid
        samples of ``log2 p(x) / num_leaves``; None if none is valid), ``root_histogram``
        (expected root-class frequencies among valid samples, ``p(root | x)`` summed by BP, so it
        is exact for ambiguous grammars too) and ``root_prior``.
    """
    log_p = ghm.log_prob(tokens)
    valid = torch.isfinite(log_p)
    out = {
        "num_samples": int(tokens.shape[0]),
        "valid_fraction": float(valid.float().mean()),
        "log_prob_bits_per_leaf": None,
        "root_histogram": None,
        "root_prior": ghm.root_prior.tolist(),
    }
    if valid.any():
        out["log_prob_bits_per_leaf"] = float(log_p[valid].mean() / (ghm.num_leaves * math.log(2)))
        roots = posterior(ghm, ghm.hard_evidence(tokens[valid])).root_marginals.double()
        out["root_histogram"] = (roots.sum(0) / roots.shape[0]).tolist()
    return out
