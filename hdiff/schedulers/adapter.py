"""One adapter from any denoiser to any diffusers scheduler (docs/denoisers.md).

A denoiser returns ``log p(x0_i = b | x_t)``; a scheduler wants ``model_output`` in its own
convention. :class:`SchedulerModelAdapter` converts between them with no per-scheduler code:

- **noise level**: schedulers that expose ``sigmas`` (Euler, DPM-Solver, ...) give
  ``alpha = 1 / (1 + sigma^2)`` at their current step; the others give ``alphas_cumprod[t]``
  (DDPM, DDIM, and hdiff's discrete schedulers, whose ``alphas_cumprod`` is the keep
  probability); ``alpha_fn`` overrides both (e.g. diffusers' DiscreteDDIMScheduler, whose
  ``alpha = t / num_inference_steps``, see :func:`hdiff.schedulers.factory.scheduler_options`).
- **output**: Gaussian processes give ``x0_hat = sum_b p_b E_b`` converted to the scheduler's
  ``prediction_type``: ``epsilon = (z - sqrt(alpha) x0_hat) / sqrt(1 - alpha)``, ``sample =
  x0_hat``, ``v_prediction = sqrt(alpha) eps - sqrt(1 - alpha) x0_hat``; discrete processes give
  the log-probabilities themselves (channels-last with ``channels_last=True``).

The input ``sample`` is what the pipeline passes after ``scheduler.scale_model_input``, which
for Euler-type schedulers is the VP state ``z = x / sqrt(1 + sigma^2)``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from hdiff.denoisers.base import Denoiser

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


class SchedulerModelAdapter:
    """``(sample, timestep) -> model_output`` for a diffusers-style scheduler.

    Args:
        denoiser: any :class:`~hdiff.denoisers.Denoiser` (exact or learned).
        scheduler: the scheduler whose conventions the output follows; it is only read.
        channels_last: return discrete log-probabilities as ``(B, *leaf_shape, v)``.
        alpha_fn: ``(scheduler, timestep) -> alpha`` for schedulers that expose neither
            ``sigmas`` nor ``alphas_cumprod``.
    """

    def __init__(self, denoiser: Denoiser, scheduler, *, channels_last: bool = False,
                 alpha_fn: Callable[[Any, float], float] | None = None) -> None:
        if not callable(denoiser) or not hasattr(denoiser, "process"):
            raise TypeError("denoiser must be callable (x_t, alpha) with a `process` attribute")
        self.denoiser = denoiser
        self.scheduler = scheduler
        self.channels_last = channels_last
        self.alpha_fn = alpha_fn
        if not denoiser.process.discrete:
            prediction = getattr(getattr(scheduler, "config", None), "prediction_type", None)
            if prediction not in PREDICTION_TYPES:
                raise ValueError(f"scheduler.config.prediction_type must be one of {PREDICTION_TYPES}, got {prediction!r}")
        elif alpha_fn is None and not hasattr(scheduler, "alphas_cumprod"):
            raise ValueError("scheduler exposes no alphas_cumprod: pass alpha_fn=(scheduler, timestep) -> alpha")

    @property
    def process(self):
        """The denoiser's noise process."""
        return self.denoiser.process

    def alpha(self, timestep: float | torch.Tensor) -> float:
        """Signal level ``alpha`` in [0, 1] at ``timestep`` of the scheduler's current schedule."""
        t = timestep.item() if isinstance(timestep, torch.Tensor) else timestep
        if self.alpha_fn is not None:
            return float(self.alpha_fn(self.scheduler, t))
        s = self.scheduler
        if getattr(s, "sigmas", None) is not None and hasattr(s, "index_for_timestep"):
            index = s.step_index if getattr(s, "step_index", None) is not None else s.index_for_timestep(timestep)
            sigma = float(s.sigmas[index])
            return 1.0 / (1.0 + sigma * sigma)
        return float(s.alphas_cumprod[int(round(t))])

    def __call__(self, sample: torch.Tensor, timestep: float | torch.Tensor) -> torch.Tensor:
        """The scheduler's ``model_output`` for the denoiser's posterior at ``(sample, timestep)``."""
        alpha = self.alpha(timestep)
        log_probs = self.denoiser(sample, alpha)
        return self.from_log_probs(sample, alpha, log_probs)

    def from_x0(self, sample: torch.Tensor, timestep: float | torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """``model_output`` for a point-mass posterior on given clean tokens ``x0`` (joint sampling)."""
        v = self.process.vocab_size
        log_probs = torch.nn.functional.one_hot(x0.long(), v).movedim(-1, 1).float().log()
        return self.from_log_probs(sample, self.alpha(timestep), log_probs)

    def from_log_probs(self, sample: torch.Tensor, alpha: float, log_probs: torch.Tensor) -> torch.Tensor:
        """Convert leaf log-posteriors ``(B, v, *leaf_shape)`` to the scheduler's convention."""
        if self.process.discrete:
            return log_probs.movedim(1, -1) if self.channels_last else log_probs
        x0_hat = self.process.expected_embedding(log_probs.exp()).to(sample.dtype)
        prediction = self.scheduler.config.prediction_type
        if prediction == "sample":
            return x0_hat
        a = torch.tensor(alpha, dtype=sample.dtype, device=sample.device)
        eps = (sample - a.sqrt() * x0_hat) / (1 - a).sqrt() if alpha < 1 else torch.zeros_like(sample)
        if prediction == "epsilon":
            return eps
        return a.sqrt() * eps - (1 - a).sqrt() * x0_hat
