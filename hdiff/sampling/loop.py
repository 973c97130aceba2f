"""Reverse diffusion as a plain function over (denoiser, scheduler) (cf. k-diffusion's samplers)."""

from __future__ import annotations

import copy
import inspect
from typing import Callable, Iterable

import torch

from hdiff.denoisers.base import Denoiser
from hdiff.schedulers.adapter import SchedulerModelAdapter

X0_MODES = ("marginal", "joint")


@torch.no_grad()  # never build an autograd graph across steps, even for learned denoisers
def sample(denoiser: Denoiser, scheduler, *, batch_size: int, num_inference_steps: int,
           leaf_shape: tuple[int, ...] | None = None, generator: torch.Generator | None = None,
           x0_mode: str = "marginal", step_kwargs: dict | None = None, alpha_fn: Callable | None = None,
           channels_last: bool = False, device: torch.device | str = "cpu",
           progress: Callable[[Iterable], Iterable] | None = None) -> torch.Tensor:
    """Run reverse diffusion from the fully noised state and return clean tokens.

    Each step: ``model_input = scheduler.scale_model_input(x, t)``, the denoiser's posterior is
    converted by :class:`SchedulerModelAdapter` to the scheduler's ``model_output``, then
    ``x = scheduler.step(model_output, t, x, generator=..., **step_kwargs).prev_sample``.

    Args:
        denoiser: any denoiser; ``x0_mode="joint"`` needs ``denoiser.sample_x0`` (the BP oracle).
        scheduler: a diffusers-style scheduler. It is copied, never mutated: no state leaks
            between calls (same generator seed, same samples).
        batch_size: ``B``.
        num_inference_steps: reverse steps.
        leaf_shape: defaults to ``denoiser.leaf_shape``.
        generator: the only RNG used.
        x0_mode: ``"marginal"`` (per-leaf posteriors) or ``"joint"``: at every step draw ``x0``
            jointly from ``p(x0 | x_t)`` and step conditioned on it, which makes discrete reverse
            steps exact at any step count (docs/denoisers.md, "Marginal vs joint x0").
        step_kwargs: extra keyword arguments for ``scheduler.step`` (e.g. ``temperature=1.0``).
        alpha_fn, channels_last: forwarded to :class:`SchedulerModelAdapter`.
        device: where the states live.
        progress: wraps the timestep iterable (e.g. a pipeline's ``progress_bar``).

    Returns:
        tokens ``(B, *leaf_shape)`` long. Gaussian end states are decoded to the most likely
        token per leaf.
    """
    if x0_mode not in X0_MODES:
        raise ValueError(f"x0_mode must be one of {X0_MODES}, got {x0_mode!r}")
    if x0_mode == "joint" and not hasattr(denoiser, "sample_x0"):
        raise ValueError("x0_mode='joint' needs a denoiser with sample_x0 (the BP oracle)")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")
    leaf_shape = tuple(leaf_shape if leaf_shape is not None else denoiser.leaf_shape)
    process = denoiser.process
    scheduler = copy.deepcopy(scheduler)
    scheduler.set_timesteps(num_inference_steps, device=device)
    model = SchedulerModelAdapter(denoiser, scheduler, channels_last=channels_last, alpha_fn=alpha_fn)
    x = process.prior_sample(batch_size, leaf_shape, generator=generator, device=device)
    if not process.discrete:
        x = x * scheduler.init_noise_sigma
    kwargs = dict(step_kwargs or {})
    takes_x0 = "x0" in inspect.signature(scheduler.step).parameters
    # discrete schedulers may have no scale_model_input (diffusers' DiscreteDDIMScheduler): identity then
    scale = getattr(scheduler, "scale_model_input", None) or (lambda sample, timestep: sample)
    timesteps = scheduler.timesteps
    for t in (progress(timesteps) if progress is not None else timesteps):
        model_input = scale(x, t)
        if x0_mode == "joint":
            x0 = denoiser.sample_x0(model_input, model.alpha(t), generator=generator)
            output = model.from_x0(model_input, t, x0)
            if takes_x0:  # hdiff's discrete schedulers condition on x0 itself; others see a one-hot posterior
                kwargs["x0"] = x0
        else:
            output = model(model_input, t)
        x = scheduler.step(output, t, x, generator=generator, **kwargs).prev_sample
    return x if process.discrete else process.decode(x)
