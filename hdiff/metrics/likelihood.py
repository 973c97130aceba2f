"""Upper bounds on ``-log p(x0)`` from any denoiser: the continuous-time NELBO of each noise process.

Each bound is a Monte-Carlo average over noise levels (stratified) and noisy states of the
process's own integrand, :meth:`hdiff.noise.NoiseProcess.bound_term` (docs/metrics.md):

- **masking**: MDLM (Sahoo et al. 2024), ``E_t [(-alpha'(t)) / (1 - alpha(t)) sum_{i masked} -log p(x0_i | x_t)]``;
- **uniform**: the CTMC ELBO (Campbell et al. 2022) in SEDD's score-entropy form (Lou et al. 2024);
- **gaussian**: the VDM bound (Kingma et al. 2021) in log-SNR.

Each holds for any denoiser, and with the exact conditionals of the BP oracle each is *tight* (up
to the negligible end-point terms of the Gaussian one), so the oracle's estimate is an unbiased
estimate of the exact NLL that BP gives directly, and the gap of a learned denoiser is its excess.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from hdiff.denoisers.base import Denoiser
from hdiff.noise import GaussianProcess, MaskingProcess, Schedule, UniformProcess, resolve_schedule


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


def _check(denoiser: Denoiser, x0: torch.Tensor, num_draws: int, process_type: type | None = None) -> None:
    if process_type is not None and not isinstance(denoiser.process, process_type):
        raise ValueError(f"this bound needs {process_type.name} noise ({process_type.__name__}), got {denoiser.process!r}")
    if isinstance(num_draws, bool) or not isinstance(num_draws, int) or num_draws < 2:
        raise ValueError(f"num_draws must be an int >= 2 (for a standard error), got {num_draws!r}")
    denoiser.process.check_tokens(x0, "x0")


def _stratified(B: int, num_draws: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """``(B, K)`` float64 in (0, 1]: draw ``k`` of every sample lies in ``(k / K, (k + 1) / K]``."""
    u = torch.rand(B, num_draws, generator=generator, dtype=torch.float64, device=device)
    return (torch.arange(num_draws, device=device) + 1 - u) / num_draws


def _monte_carlo(x0: torch.Tensor, levels: torch.Tensor, batch_limit: int,
                 term: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> BoundEstimate:
    """Average ``term(x0_rows, level_rows) -> (b,)`` over the ``(B, K)`` levels of each sample."""
    B, K = levels.shape
    values = torch.empty(B * K, dtype=torch.float64, device=x0.device)
    flat_x0, flat_levels = x0.repeat_interleave(K, 0), levels.flatten()
    for start in range(0, B * K, batch_limit):
        sl = slice(start, start + batch_limit)
        values[sl] = term(flat_x0[sl], flat_levels[sl])
    values = values.view(B, K)
    return BoundEstimate(values.mean(1), values.std(1) / math.sqrt(K))


@torch.no_grad()
def nelbo(denoiser: Denoiser, x0: torch.Tensor, *, num_draws: int = 64, schedule: str | Schedule = "auto",
          generator: torch.Generator | None = None, batch_limit: int = 8192) -> BoundEstimate:
    """Estimate the NELBO of each clean sample under the denoiser's own noise process.

    Args:
        denoiser: any denoiser (its ``process`` supplies the integrand).
        x0: clean tokens ``(B, *leaf_shape)``.
        num_draws: Monte-Carlo draws per sample, stratified over (0, 1].
        schedule: a schedule name or object, ``auto`` = the process's default; the bound's value
            does not depend on it (only its variance does), but training and sampling should
            pass the one they use.
        generator: RNG for the levels and the noise.
        batch_limit: most ``(sample, draw)`` pairs sent to the denoiser at once.

    Returns:
        :class:`BoundEstimate` in nats.
    """
    return _nelbo(denoiser, x0, num_draws, schedule, generator, batch_limit, None)


def _nelbo(denoiser: Denoiser, x0: torch.Tensor, num_draws: int, schedule: str | Schedule,
           generator: torch.Generator | None, batch_limit: int, process_type: type | None) -> BoundEstimate:
    _check(denoiser, x0, num_draws, process_type)
    process = denoiser.process
    sched = resolve_schedule(schedule, process) if isinstance(schedule, str) else schedule

    def term(clean: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return process.bound_term(denoiser, clean, u, sched, generator=generator)

    return _monte_carlo(x0, _stratified(x0.shape[0], num_draws, generator, x0.device), batch_limit, term)


def masked_nelbo(denoiser: Denoiser, x0: torch.Tensor, *, num_draws: int = 64, schedule: str | Schedule = "linear",
                 generator: torch.Generator | None = None, batch_limit: int = 8192) -> BoundEstimate:
    """:func:`nelbo` for a :class:`~hdiff.noise.MaskingProcess` denoiser (refuses any other)."""
    return _nelbo(denoiser, x0, num_draws, schedule, generator, batch_limit, MaskingProcess)


def uniform_nelbo(denoiser: Denoiser, x0: torch.Tensor, *, num_draws: int = 64, schedule: str | Schedule = "linear",
                  generator: torch.Generator | None = None, batch_limit: int = 8192) -> BoundEstimate:
    """:func:`nelbo` for a :class:`~hdiff.noise.UniformProcess` denoiser (refuses any other)."""
    return _nelbo(denoiser, x0, num_draws, schedule, generator, batch_limit, UniformProcess)


def gaussian_nelbo(denoiser: Denoiser, x0: torch.Tensor, *, num_draws: int = 64,
                   generator: torch.Generator | None = None, batch_limit: int = 8192) -> BoundEstimate:
    """:func:`nelbo` for a :class:`~hdiff.noise.GaussianProcess` denoiser (the VDM bound; schedule-free)."""
    return _nelbo(denoiser, x0, num_draws, "auto", generator, batch_limit, GaussianProcess)
