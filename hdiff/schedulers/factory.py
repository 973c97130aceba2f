"""Schedulers by name, configured the way hdiff needs them (``clip_sample=False`` and friends).

Which scheduler samples which noise process is the process's knowledge
(:attr:`hdiff.noise.NoiseProcess.schedulers`); :func:`check_pair` refuses a mismatch up front.
"""

from __future__ import annotations

from typing import Any

import torch

from hdiff.noise import GaussianProcess, MaskingProcess, NoiseProcess, Schedule, UniformProcess, get_schedule

GAUSSIAN_SCHEDULERS = GaussianProcess.schedulers
#: every scheduler name, in the order the CLI lists them
SCHEDULER_NAMES: tuple[str, ...] = GaussianProcess.schedulers + MaskingProcess.schedulers + UniformProcess.schedulers
_MAX_BETA = 0.999  # as diffusers' squaredcos_cap_v2: the last step of a schedule ending at alpha = 0


def check_pair(process: NoiseProcess, scheduler: str) -> None:
    """Raise ``ValueError`` unless ``scheduler`` samples ``process``'s noise, naming those that do."""
    if scheduler not in SCHEDULER_NAMES:
        raise ValueError(f"scheduler must be one of {SCHEDULER_NAMES}, got {scheduler!r}")
    if scheduler not in process.schedulers:
        raise ValueError(f"scheduler {scheduler!r} does not sample {process.name} noise; "
                         f"use one of {process.schedulers}")


def gaussian_betas(schedule: Schedule, num_train_timesteps: int) -> list[float]:
    """``betas`` whose ``alphas_cumprod[k]`` is ``schedule.alpha((k + 1) / T)`` (the last beta capped at 0.999)."""
    ac = schedule.grid(num_train_timesteps)
    prev = torch.cat([torch.ones(1, dtype=ac.dtype), ac[:-1]])
    return (1 - ac / prev).clamp(max=_MAX_BETA).tolist()


def make_scheduler(name: str, *, num_train_timesteps: int = 1000, prediction_type: str = "epsilon",
                   schedule: str | Schedule | None = None, unmasking: str = "bernoulli") -> Any:
    """A scheduler instance by short name.

    Args:
        name: ``ddpm``, ``ddim``, ``euler``, ``dpmsolver`` (diffusers, Gaussian noise), ``masked``,
            ``uniform`` (hdiff's exact discrete schedulers) or ``discrete-ddim`` (diffusers'
            DiscreteDDIMScheduler for uniform noise; sample it with ``temperature=1.0``).
        num_train_timesteps: length of the training schedule.
        prediction_type: for Gaussian schedulers: ``epsilon``, ``sample`` or ``v_prediction``.
        schedule: the alpha schedule (a :func:`hdiff.noise.get_schedule` name or object), the one
            training used: hdiff's discrete schedulers tabulate it; diffusers' Gaussian schedulers
            get the ``trained_betas`` that reproduce it. ``None``: ``linear`` for the discrete
            schedulers, diffusers' own default betas for the Gaussian ones.
        unmasking: ``bernoulli`` or ``fixed`` for ``masked``.
    """
    import diffusers

    from hdiff import schedulers

    if name in GAUSSIAN_SCHEDULERS:
        common = {"num_train_timesteps": num_train_timesteps, "prediction_type": prediction_type}
        if schedule is not None:
            common["trained_betas"] = gaussian_betas(get_schedule(schedule), num_train_timesteps)
        if name == "ddpm":  # clip_sample=False: clipping to [-1, 1] silently ruins non-image data
            return diffusers.DDPMScheduler(clip_sample=False, **common)
        if name == "ddim":
            return diffusers.DDIMScheduler(clip_sample=False, **common)
        if name == "euler":
            return diffusers.EulerDiscreteScheduler(**common)
        # "trailing" spacing, as hdiff's discrete schedulers: diffusers' default "linspace" rounds
        # linspace(0, T - 1, n + 1) to integers, which repeats a timestep once n >= T; the multistep
        # update then divides by a zero step (h = 0) and every sample turns NaN (n = 1000 did)
        return diffusers.DPMSolverMultistepScheduler(timestep_spacing="trailing", **common)
    discrete = get_schedule(schedule if schedule is not None else "linear").name
    if name == "masked":
        return schedulers.MaskedDiffusionScheduler(num_train_timesteps=num_train_timesteps, schedule=discrete, unmasking=unmasking)
    if name == "uniform":
        return schedulers.UniformDiffusionScheduler(num_train_timesteps=num_train_timesteps, schedule=discrete)
    if name == "discrete-ddim":
        return diffusers.DiscreteDDIMScheduler()
    raise ValueError(f"scheduler must be one of {SCHEDULER_NAMES}, got {name!r}")


def check_steps(name: str, steps: int, **kwargs: Any) -> None:
    """Raise ``ValueError`` unless scheduler ``name`` can run ``steps`` inference steps.

    Builds the scheduler (``kwargs`` go to :func:`make_scheduler`) and sets its timesteps, so what
    it would refuse mid-sampling is refused up front, before any training; a grid that repeats a
    timestep (a zero step) is refused too.
    """
    scheduler = make_scheduler(name, **kwargs)
    try:
        scheduler.set_timesteps(steps)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{name} cannot take {steps} steps: {e}") from None
    timesteps = torch.as_tensor(scheduler.timesteps)
    if len(torch.unique(timesteps)) != len(timesteps):
        raise ValueError(f"{name} cannot take {steps} steps: its timestep grid repeats a timestep "
                         f"(num_train_timesteps = {scheduler.config.num_train_timesteps})")


def scheduler_options(name: str) -> dict[str, Any]:
    """What :func:`hdiff.sampling.sample` needs beside the scheduler itself for ``name``."""
    if name == "discrete-ddim":  # samples greedily unless temperature=1.0; alpha = t / steps; channels-last logits
        return {"step_kwargs": {"temperature": 1.0}, "channels_last": True, "alpha_fn": _discrete_ddim_alpha}
    return {}


def _discrete_ddim_alpha(scheduler: Any, timestep: float) -> float:
    # DiscreteDDIMScheduler: survival probability alpha = step_index / num_inference_steps
    return float(timestep) / scheduler.num_inference_steps
