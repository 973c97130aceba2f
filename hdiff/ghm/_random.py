"""Categorical sampling by inverse CDF with an explicit generator (no global RNG)."""

from __future__ import annotations

import torch


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Index drawn from each row of ``probs`` ``(..., K)`` (any scale) with uniforms ``u`` ``(..., 1)``.

    An entry with zero mass is never drawn while its row has mass; a row of zeros gives index 0.
    """
    cdf = probs.cumsum(-1)
    idx = torch.searchsorted(cdf, u * cdf[..., -1:], right=True).squeeze(-1)
    # Rounding can push u * total onto the last cdf value: clamp to the last entry with mass.
    k = probs.shape[-1]
    last = torch.where(probs > 0, torch.arange(k, device=probs.device), 0).amax(-1)
    return torch.minimum(idx, last)


def categorical(probs: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one index per row of ``probs`` ``(..., K)`` (non-negative, any scale) -> ``(...)`` long.

    Rows need not be normalised. An entry with zero mass is never drawn while its row has mass;
    a row of zeros is the caller's error (it returns index 0).
    """
    u = torch.rand(probs.shape[:-1] + (1,), generator=generator, dtype=probs.dtype, device=probs.device)
    return inverse_cdf(probs, u)
