"""Validation helpers shared by the GHM classes (errors name the offending field)."""

from __future__ import annotations

import torch

NORM_TOL = 1e-6


def check_distribution(p: torch.Tensor, name: str) -> torch.Tensor:
    """Check that ``p`` (float64) is finite, non-negative and sums to one on its last dim.

    Returns ``p`` as given when its rows already sum to 1 within float64 rounding, else
    renormalised; so the check is idempotent (save/load and ``.to`` are bit-exact).
    """
    if not torch.isfinite(p).all():
        raise ValueError(f"{name} must be finite (found NaN or inf)")
    if (p < 0).any():
        raise ValueError(f"{name} must be non-negative (found {float(p.min()):.3g})")
    sums = p.sum(-1)
    bad = (sums - 1).abs() > NORM_TOL
    if bad.any():
        raise ValueError(f"{name} rows must sum to 1 (found a row summing to {float(sums[bad].flatten()[0]):.6g})")
    if ((sums - 1).abs() <= 8 * torch.finfo(torch.float64).eps).all():
        return p.contiguous()
    return (p / sums.unsqueeze(-1)).contiguous()
