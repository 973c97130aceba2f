"""Validation helpers shared by the GHM classes (errors name the offending field)."""

from __future__ import annotations

import torch

NORM_TOL = 1e-6


def check_distribution(p: torch.Tensor, name: str) -> torch.Tensor:
    """Check that ``p`` (float64) is finite, non-negative and sums to one on its last dim.

    Returns ``p`` renormalised exactly (so sums are 1 to float64 precision).
    """
    if not torch.isfinite(p).all():
        raise ValueError(f"{name} must be finite (found NaN or inf)")
    if (p < 0).any():
        raise ValueError(f"{name} must be non-negative (found {float(p.min()):.3g})")
    sums = p.sum(-1)
    bad = (sums - 1).abs() > NORM_TOL
    if bad.any():
        raise ValueError(f"{name} rows must sum to 1 (found a row summing to {float(sums[bad].flatten()[0]):.6g})")
    return (p / sums.unsqueeze(-1)).contiguous()
