"""Likelihood bounds from a denoiser: the continuous-time NELBO of masked diffusion.

MDLM (Sahoo et al. 2024), with keep probability ``alpha(t)``, ``t ~ U(0, 1)``:

    NELBO(x0) = E_t E_{x_t ~ q_t(. | x0)} [ (-alpha'(t)) / (1 - alpha(t)) * sum_{i masked} -log p(x0_i | x_t) ]

It upper-bounds ``-log p(x0)`` for any denoiser; with the exact conditionals it *equals* it in
expectation (BACKGROUND.md: it averages the chain rule over reveal orders), so the oracle's
estimate is an unbiased estimate of the exact NLL that BP gives directly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hdiff.denoisers.base import Denoiser

SCHEDULES = ("linear", "cosine")


@dataclass
class BoundEstimate:
    """A Monte-Carlo estimate of an upper bound on ``-log p(x0)`` in nats.

    Attributes:
        nats: ``(B,)`` per-sample estimates.
        stderr: ``(B,)`` their standard errors.
    """

    nats: torch.Tensor
    stderr: torch.Tensor

    def bits_per_leaf(self, num_leaves: int) -> tuple[float, float]:
        """Mean over samples and its standard error, in bits per leaf."""
        scale = 1.0 / (num_leaves * math.log(2))
        mean = float(self.nats.mean()) * scale
        se = float(self.stderr.pow(2).sum().sqrt() / len(self.stderr)) * scale
        return mean, se


def _alpha_and_weight(t: torch.Tensor, schedule: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``alpha(t)`` and ``-alpha'(t) / (1 - alpha(t))``."""
    if schedule == "linear":
        return 1 - t, 1 / t
    alpha = torch.cos(math.pi / 2 * t)
    return alpha, (math.pi / 2) * torch.sin(math.pi / 2 * t) / (1 - alpha)


def masked_nelbo(denoiser: Denoiser, x0: torch.Tensor, *, num_draws: int = 64, schedule: str = "linear",
                 generator: torch.Generator | None = None, batch_limit: int = 8192) -> BoundEstimate:
    """Estimate the MDLM NELBO of each clean sample.

    Args:
        denoiser: a denoiser whose ``process`` is a :class:`~hdiff.noise.MaskingProcess`.
        x0: clean tokens ``(B, *leaf_shape)``.
        num_draws: Monte-Carlo draws of ``(t, x_t)`` per sample, with ``t`` stratified over (0, 1).
        schedule: ``linear`` (``alpha = 1 - t``) or ``cosine`` (``alpha = cos(pi t / 2)``); the
            bound's value does not depend on it, only its variance.
        generator: RNG for ``t`` and the masks.
        batch_limit: most ``(sample, draw)`` pairs sent to the denoiser at once.

    Returns:
        :class:`BoundEstimate` in nats.
    """
    process = denoiser.process
    if process.kind != "masking":
        raise ValueError(f"masked_nelbo needs a masking process, got {process!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if num_draws < 2:
        raise ValueError(f"num_draws must be >= 2 (for a standard error), got {num_draws}")
    process.check_tokens(x0, "x0")
    B = x0.shape[0]
    # stratified t: draw k of every sample lies in ((k) / K, (k + 1) / K]
    u = torch.rand(B, num_draws, generator=generator, dtype=torch.float64, device=x0.device)
    t = ((torch.arange(num_draws, device=x0.device) + 1 - u) / num_draws).clamp_min(1e-6)
    alpha, weight = _alpha_and_weight(t, schedule)
    values = torch.empty(B, num_draws, dtype=torch.float64, device=x0.device)
    flat_x0 = x0.repeat_interleave(num_draws, 0)
    flat_alpha, flat_weight = alpha.flatten(), weight.flatten()
    for start in range(0, flat_x0.shape[0], batch_limit):
        sl = slice(start, start + batch_limit)
        x_t = process.add_noise(flat_x0[sl], flat_alpha[sl], generator=generator)
        log_p = denoiser(x_t, flat_alpha[sl].float())  # (b, v, *leaf_shape)
        nll = -log_p.gather(1, flat_x0[sl].long().unsqueeze(1)).squeeze(1).double()
        masked = x_t == process.mask_token
        values.view(-1)[sl] = flat_weight[sl] * torch.where(masked, nll, 0.0).flatten(1).sum(1)
    return BoundEstimate(values.mean(1), values.std(1) / math.sqrt(num_draws))
