"""Schedulers by name, configured the way hdiff needs them (``clip_sample=False`` and friends)."""

from __future__ import annotations

from typing import Any

GAUSSIAN_SCHEDULERS = ("ddpm", "ddim", "euler", "dpmsolver")
DISCRETE_SCHEDULERS = {"masking": ("masked",), "uniform": ("uniform", "discrete-ddim")}


def make_scheduler(name: str, *, num_train_timesteps: int = 1000, prediction_type: str = "epsilon",
                   schedule: str = "linear", unmasking: str = "bernoulli") -> Any:
    """A scheduler instance by short name.

    Args:
        name: ``ddpm``, ``ddim``, ``euler``, ``dpmsolver`` (diffusers, Gaussian noise), ``masked``,
            ``uniform`` (hdiff's exact discrete schedulers) or ``discrete-ddim`` (diffusers'
            DiscreteDDIMScheduler for uniform noise; sample it with ``temperature=1.0``).
        num_train_timesteps: length of the training schedule.
        prediction_type: for Gaussian schedulers: ``epsilon``, ``sample`` or ``v_prediction``.
        schedule: ``linear`` or ``cosine`` for hdiff's discrete schedulers.
        unmasking: ``bernoulli`` or ``fixed`` for ``masked``.
    """
    import diffusers

    from hdiff import schedulers

    if name == "ddpm":  # clip_sample=False: clipping to [-1, 1] silently ruins non-image data
        return diffusers.DDPMScheduler(num_train_timesteps=num_train_timesteps, prediction_type=prediction_type, clip_sample=False)
    if name == "ddim":
        return diffusers.DDIMScheduler(num_train_timesteps=num_train_timesteps, prediction_type=prediction_type, clip_sample=False)
    if name == "euler":
        return diffusers.EulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, prediction_type=prediction_type)
    if name == "dpmsolver":
        return diffusers.DPMSolverMultistepScheduler(num_train_timesteps=num_train_timesteps, prediction_type=prediction_type)
    if name == "masked":
        return schedulers.MaskedDiffusionScheduler(num_train_timesteps=num_train_timesteps, schedule=schedule, unmasking=unmasking)
    if name == "uniform":
        return schedulers.UniformDiffusionScheduler(num_train_timesteps=num_train_timesteps, schedule=schedule)
    if name == "discrete-ddim":
        return diffusers.DiscreteDDIMScheduler()
    raise ValueError(f"scheduler must be one of {GAUSSIAN_SCHEDULERS + ('masked', 'uniform', 'discrete-ddim')}, got {name!r}")


def scheduler_options(name: str) -> dict[str, Any]:
    """What :func:`hdiff.sampling.sample` needs beside the scheduler itself for ``name``."""
    if name == "discrete-ddim":  # samples greedily unless temperature=1.0; alpha = t / steps; channels-last logits
        return {"step_kwargs": {"temperature": 1.0}, "channels_last": True, "alpha_fn": _discrete_ddim_alpha}
    return {}


def _discrete_ddim_alpha(scheduler: Any, timestep: float) -> float:
    # DiscreteDDIMScheduler: survival probability alpha = step_index / num_inference_steps
    return float(timestep) / scheduler.num_inference_steps
