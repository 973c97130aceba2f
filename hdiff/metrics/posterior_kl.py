"""``KL(oracle || learned)`` of leaf posteriors per noise level, as a torchmetrics ``Metric``.

The denoiser-level metric of docs/metrics.md: on held-out clean data, noise each sample to a
signal level in every bin of ``alpha`` and compare the two denoisers' leaf posteriors. Which leaves
count is the process's business (:meth:`~hdiff.noise.NoiseProcess.informative_leaves`: for masking,
only masked leaves carry a posterior to compare).
"""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics import Metric


class PosteriorKL(Metric):
    """``KL(oracle || learned)`` of leaf posteriors, per noise-level bin, in nats per leaf.

    ``update(log_p_oracle, log_p_learned, alpha, weight)``: log-posteriors ``(B, v, *leaf_shape)``,
    the signal level ``alpha`` ``(B,)`` of each row, and ``weight`` ``(B, *leaf_shape)`` (1 for a
    leaf that counts: for masking, the masked leaves, since the others are known exactly; else
    every leaf). ``compute()`` returns ``(num_bins,)`` float64: the weighted mean KL of the leaves
    whose ``alpha`` falls in each bin of ``[0, 1]`` (``nan`` for an empty bin).

    Args:
        num_bins: equal-width bins of ``alpha``.
    """

    full_state_update = False
    higher_is_better = False

    def __init__(self, num_bins: int = 10, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 1:
            raise ValueError(f"num_bins must be a positive int, got {num_bins!r}")
        self.num_bins = num_bins
        self.add_state("kl_sum", default=torch.zeros(num_bins, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros(num_bins, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, log_p_oracle: torch.Tensor, log_p_learned: torch.Tensor, alpha: torch.Tensor,
               weight: torch.Tensor | None = None) -> None:
        """Accumulate one batch (shapes in the class docstring)."""
        if log_p_oracle.shape != log_p_learned.shape:
            raise ValueError(f"log_p_oracle {tuple(log_p_oracle.shape)} and log_p_learned "
                             f"{tuple(log_p_learned.shape)} must have the same shape")
        p = log_p_oracle.double().exp()
        # 0 log 0 = 0 where the oracle rules a token out; -inf learned log-probs give inf where it does not
        kl = torch.where(p > 0, p * (log_p_oracle.double() - log_p_learned.double()), torch.zeros_like(p)).sum(1)
        w = torch.ones_like(kl) if weight is None else weight.to(kl)
        B = kl.shape[0]
        bins = (alpha.to(kl.device).double() * self.num_bins).long().clamp(0, self.num_bins - 1)
        self.kl_sum.index_add_(0, bins, (kl * w).reshape(B, -1).sum(1).nan_to_num(nan=0.0))
        self.count.index_add_(0, bins, w.reshape(B, -1).sum(1))

    def compute(self) -> torch.Tensor:
        """``(num_bins,)`` mean KL per leaf per bin."""
        return self.kl_sum / self.count

    def bin_centres(self) -> list[float]:
        """The ``alpha`` at the centre of each bin."""
        return [(k + 0.5) / self.num_bins for k in range(self.num_bins)]


@torch.no_grad()
def posterior_kl(oracle: Any, learned: Any, x0: torch.Tensor, *, num_bins: int = 10, draws_per_bin: int = 1,
                 generator: torch.Generator | None = None, batch_limit: int = 4096) -> PosteriorKL:
    """Measure ``KL(oracle || learned)`` of leaf posteriors on clean data, per bin of ``alpha``.

    For every sample, bin and draw: ``alpha ~ U(bin)``, ``x_t ~ q(x_t | x0, alpha)``, and both
    denoisers' ``log p(x0_i | x_t)`` (:class:`PosteriorKL` does the rest).

    Args:
        oracle: the exact denoiser (:class:`~hdiff.denoisers.BPDenoiser`).
        learned: any denoiser with the same noise process.
        x0: held-out clean tokens ``(n, *leaf_shape)``.
        num_bins: equal-width bins of ``alpha`` in ``[0, 1]``.
        draws_per_bin: noisy copies of every sample per bin.
        generator: RNG for ``alpha`` and the noise.
        batch_limit: most noisy states sent to the denoisers at once.

    Returns:
        The updated :class:`PosteriorKL` (``.compute()`` gives the per-bin curve).
    """
    process = oracle.process
    if process != learned.process:
        raise ValueError(f"the denoisers' processes differ: {process!r} vs {learned.process!r}")
    metric = PosteriorKL(num_bins)
    n = x0.shape[0]
    bins = torch.arange(num_bins, dtype=torch.float64).repeat_interleave(n * draws_per_bin)
    u = torch.rand(bins.shape[0], generator=generator, dtype=torch.float64, device=x0.device)
    alphas = ((bins.to(x0.device) + u) / num_bins).clamp(1e-4, 1 - 1e-4)
    rows = torch.arange(n, device=x0.device).repeat(num_bins * draws_per_bin)
    for start in range(0, rows.shape[0], batch_limit):
        sl = slice(start, start + batch_limit)
        clean, alpha = x0[rows[sl]], alphas[sl].float()
        x_t = process.add_noise(clean, alpha, generator=generator)
        informative = process.informative_leaves(x_t)
        weight = None if informative is None else informative.double()
        metric.update(oracle(x_t, alpha), learned(x_t, alpha), alpha, weight)
    return metric
