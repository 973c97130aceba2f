"""What hdiff's discrete schedulers share: the keep schedule, the timestep grid, validation, sampling.

The discrete schedulers (masking, uniform) follow diffusers' conventions (``SchedulerMixin`` +
``ConfigMixin``, ``set_timesteps`` / ``step`` / ``add_noise``) but their state is tokens and their
``model_output`` is the denoiser currency ``log p(x0_i = b | x_t)``, shape ``(B, v, *leaf_shape)``
(docs/schedulers.md).

Schedule: with ``tau = (t + 1) / T`` for train timestep ``t`` in ``[0, T)``, the keep probability is
``alpha(tau)`` of the named :class:`~hdiff.noise.Schedule` (the same object training and the bounds
use), so ``alpha(T - 1) = 0`` (reverse diffusion starts fully noised) and ``alpha(-1) = 1`` (clean).
It is stored as ``alphas_cumprod`` so that one adapter reads ``alpha = alphas_cumprod[t]`` for
every scheduler.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers import ConfigMixin, SchedulerMixin
from diffusers.utils import BaseOutput

from hdiff.noise import get_schedule


@dataclass
class DiscreteSchedulerOutput(BaseOutput):
    """Output of a discrete scheduler's ``step``.

    Args:
        prev_sample: ``(B, *leaf_shape)`` long, the state ``x_s`` at the previous timestep.
        pred_original_sample: ``(B, *leaf_shape)`` long, the clean tokens ``x0`` the step used.
    """

    prev_sample: torch.LongTensor
    pred_original_sample: torch.LongTensor


def sample_categorical(log_probs: torch.Tensor, *, generator: torch.Generator | None) -> torch.Tensor:
    """One draw per leaf from normalised ``log_probs`` ``(B, v, *leaf_shape)`` -> ``(B, *leaf_shape)`` long.

    Gumbel-max: ``argmax_b (log p_b + G_b)`` is distributed as ``p``; ``-inf`` entries are never drawn.
    Vectorised over batch and leaves; the only randomness is ``generator``.
    """
    u = torch.rand(log_probs.shape, generator=generator, device=log_probs.device, dtype=torch.float64)
    gumbel = -torch.log(-torch.log(u.clamp_min(torch.finfo(torch.float64).tiny)))
    return (log_probs.to(torch.float64) + gumbel).argmax(dim=1)


class DiscreteSchedulerBase(SchedulerMixin, ConfigMixin):
    """Schedule, timestep grid and checks shared by the masked and uniform schedulers.

    Subclasses call :meth:`_setup` from their ``@register_to_config`` ``__init__``.

    Attributes:
        alphas_cumprod: ``(T,)`` float64 keep probabilities ``alpha_t``.
        timesteps: ``(n,)`` long descending inference timesteps (``None`` before ``set_timesteps``).
        num_inference_steps: ``n`` (``None`` before ``set_timesteps``).
    """

    config_name = "scheduler_config.json"
    _compatibles: list[str] = []
    order = 1

    def _setup(self, num_train_timesteps: int, schedule: str) -> None:
        self.alphas_cumprod = get_schedule(schedule).grid(num_train_timesteps)
        self.init_noise_sigma = 1.0
        self.timesteps: torch.Tensor | None = None
        self.num_inference_steps: int | None = None
        self._index: dict[int, int] = {}

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    # ------------------------------------------------------------------ timestep grid
    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Subsample ``n`` train timesteps, evenly in ``tau``, descending from ``T - 1``.

        ``t_j = round(T (n - j) / n) - 1`` for ``j = 0 .. n-1`` (diffusers' "trailing" spacing): the
        grid of ``tau = (t + 1) / T`` is exactly ``1, (n-1)/n, ..., 1/n`` and the last step goes to
        ``tau = 0`` (clean). Why not ``linspace(T-1, 0, n)``: that spends its last step on
        ``tau = 1/T -> 0``; this grid makes ``n = N`` linear-schedule steps reveal exactly one of
        ``N`` masked tokens each with ``unmasking="fixed"``. ``n = T`` gives every timestep;
        nothing is truncated.

        Args:
            num_inference_steps: ``n`` in ``[1, T]``.
            device: where ``timesteps`` lives.

        Raises:
            ValueError: ``num_inference_steps`` not an int in ``[1, T]``.
        """
        T = self.config.num_train_timesteps
        n = num_inference_steps
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= T:
            raise ValueError(f"num_inference_steps must be an int in [1, {T}], got {n!r}")
        # exact integer round-half-up of T (n - j) / n; consecutive values differ by T/n >= 1, so distinct
        steps = [(2 * T * (n - j) + n) // (2 * n) - 1 for j in range(n)]
        self.timesteps = torch.tensor(steps, dtype=torch.long, device=device)
        self.num_inference_steps = n
        self._index = {t: i for i, t in enumerate(steps)}

    def _timestep_int(self, timestep: int | torch.Tensor) -> int:
        """``timestep`` as a Python int; ``ValueError`` unless it is one of the current ``timesteps``."""
        if self.timesteps is None:
            raise ValueError("timestep: call set_timesteps(num_inference_steps) before stepping")
        if isinstance(timestep, torch.Tensor):
            if timestep.numel() != 1:
                raise ValueError(f"timestep must be a scalar, got a tensor of shape {tuple(timestep.shape)}")
            timestep = timestep.item()
        if isinstance(timestep, bool) or not isinstance(timestep, (int, float)) or timestep != int(timestep):
            raise ValueError(f"timestep must be an integer, got {timestep!r}")
        t = int(timestep)
        if t not in self._index:
            raise ValueError(f"timestep {t} is not in the current timesteps (set_timesteps({self.num_inference_steps}))")
        return t

    def previous_timestep(self, timestep: int | torch.Tensor) -> int:
        """The timestep after ``timestep`` in ``timesteps``, or ``-1`` (clean) after the last one."""
        i = self._index[self._timestep_int(timestep)]
        return int(self.timesteps[i + 1]) if i + 1 < len(self._index) else -1

    def alpha_at(self, timestep: int | torch.Tensor) -> float:
        """Keep probability ``alpha_t = alphas_cumprod[t]``; ``1.0`` at ``t = -1`` (clean)."""
        t = int(timestep.item() if isinstance(timestep, torch.Tensor) else timestep)
        if t == -1:
            return 1.0
        if not 0 <= t < self.config.num_train_timesteps:
            raise ValueError(f"timestep must lie in [-1, {self.config.num_train_timesteps}), got {t}")
        return float(self.alphas_cumprod[t])

    def scale_model_input(self, sample: torch.Tensor, timestep: int | torch.Tensor | None = None) -> torch.Tensor:
        """Identity: discrete states are not rescaled (diffusers interface)."""
        return sample

    # ------------------------------------------------------------------ helpers for step
    @staticmethod
    def _check_model_output(model_output: torch.Tensor, sample: torch.Tensor) -> int:
        """Validate ``model_output`` ``(B, v, *leaf_shape)`` against ``sample`` ``(B, *leaf_shape)``; return ``v``."""
        if not isinstance(model_output, torch.Tensor) or not model_output.is_floating_point():
            raise ValueError("model_output must be a float tensor of log-probabilities (B, v, *leaf_shape)")
        if not isinstance(sample, torch.Tensor) or sample.ndim < 2:
            raise ValueError(f"sample must be a token tensor (B, *leaf_shape), got "
                             f"{tuple(sample.shape) if isinstance(sample, torch.Tensor) else type(sample).__name__}")
        want = (sample.shape[0], sample.shape[1:])
        if model_output.ndim != sample.ndim + 1 or (model_output.shape[0], model_output.shape[2:]) != want:
            raise ValueError(f"model_output must have shape (B, v, *leaf_shape) = ({sample.shape[0]}, v, "
                             f"{', '.join(map(str, sample.shape[1:]))}), got {tuple(model_output.shape)}")
        if model_output.shape[1] < 2:
            raise ValueError(f"model_output must have v >= 2 channels, got {model_output.shape[1]}")
        if torch.isnan(model_output).any() or (model_output == math.inf).any():
            raise ValueError("model_output contains NaN or +inf")
        return model_output.shape[1]

    @staticmethod
    def _log_posterior(model_output: torch.Tensor, needed: torch.Tensor | None = None) -> torch.Tensor:
        """``log_softmax`` over ``v`` in float64 (defensive normalisation; ``-inf`` allowed).

        Raises ``ValueError`` if a leaf in ``needed`` ``(B, *leaf_shape)`` (all leaves if ``None``)
        has no finite log-probability, i.e. the model rules out every clean token there.
        """
        logp = torch.log_softmax(model_output.to(torch.float64), dim=1)
        bad = torch.isnan(logp).any(dim=1)
        if needed is not None:
            bad &= needed
        if bad.any():
            raise ValueError("model_output: some leaf has no finite log-probability (all -inf)")
        return logp
