"""Noise schedules: the signal level ``alpha(t)`` of continuous time ``t`` in [0, 1], one object per name.

One :class:`Schedule` serves training (which draws ``t`` and noises to ``alpha(t)``), the
schedulers (whose ``alphas_cumprod[k]`` is ``alpha((k + 1) / T)``) and the likelihood bounds (which
need ``alpha'(t)`` too), so a name means the same function everywhere (docs/noise.md, "Schedules").
``alpha(0) = 1`` (clean) and ``alpha(1) = 0`` (fully noised) for every schedule.

========================== ================================================ ==========================
name                       ``alpha(t)``                                     used by default for
========================== ================================================ ==========================
``linear``                 ``1 - t``                                        masking, uniform
``cosine``                 ``cos(pi t / 2)``
``cosine_squared``         ``cos^2(pi t / 2)``
``cosine_squared_shifted`` ``f(t) / f(0)``, ``f = cos^2((t + s)/(1 + s) pi/2)`` Gaussian (``s = 0.008``,
                                                                             Nichol & Dhariwal 2021)
========================== ================================================ ==========================
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch


class Schedule(ABC):
    """A signal level ``alpha(t)``, decreasing from ``alpha(0) = 1`` to ``alpha(1) = 0``.

    Attributes:
        name: the registry name (what configs and the CLI say).
    """

    name: str = ""

    @abstractmethod
    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        """``alpha(t)`` for ``t`` in [0, 1], same shape and dtype as ``t``, clamped to [0, 1]."""

    @abstractmethod
    def alpha_derivative(self, t: torch.Tensor) -> torch.Tensor:
        """``d alpha / dt`` (``<= 0``), same shape and dtype as ``t``."""

    def masked_elbo_weight(self, t: torch.Tensor) -> torch.Tensor:
        """MDLM's weight ``-alpha'(t) / (1 - alpha(t))`` of a masked leaf's cross-entropy (``1/t`` for linear)."""
        return -self.alpha_derivative(t) / (1 - self.alpha(t))

    def grid(self, num_train_timesteps: int) -> torch.Tensor:
        """``alpha((k + 1) / T)`` for ``k = 0 .. T-1`` ``(T,)`` float64: a scheduler's ``alphas_cumprod``.

        The last entry is exactly 0 (``cos(pi/2)`` is ``6e-17`` in floating point): reverse
        diffusion starts fully noised.
        """
        if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, int) or num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be an int >= 2, got {num_train_timesteps!r}")
        tau = torch.arange(1, num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps
        alpha = self.alpha(tau)
        alpha[-1] = 0.0
        return alpha

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class LinearSchedule(Schedule):
    """``alpha = 1 - t``."""

    name = "linear"

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        """``alpha(t)`` (class docstring)."""
        return (1 - t).clamp(0, 1)

    def alpha_derivative(self, t: torch.Tensor) -> torch.Tensor:
        """``d alpha / dt`` in closed form."""
        return -torch.ones_like(t)

    def masked_elbo_weight(self, t: torch.Tensor) -> torch.Tensor:
        """``1 / t``, exact (without the rounding of ``1 - (1 - t)``)."""
        return 1 / t


class CosineSchedule(Schedule):
    """``alpha = cos(pi t / 2)``."""

    name = "cosine"

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        """``alpha(t)`` (class docstring)."""
        return torch.cos(t * (math.pi / 2)).clamp(0, 1)

    def alpha_derivative(self, t: torch.Tensor) -> torch.Tensor:
        """``d alpha / dt`` in closed form."""
        return -(math.pi / 2) * torch.sin(t * (math.pi / 2))


class CosineSquaredSchedule(Schedule):
    """``alpha = cos^2(pi t / 2)``."""

    name = "cosine_squared"

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        """``alpha(t)`` (class docstring)."""
        return (torch.cos(t * (math.pi / 2)) ** 2).clamp(0, 1)

    def alpha_derivative(self, t: torch.Tensor) -> torch.Tensor:
        """``d alpha / dt`` in closed form."""
        return -(math.pi / 2) * torch.sin(t * math.pi)

    def masked_elbo_weight(self, t: torch.Tensor) -> torch.Tensor:
        """``(pi/2) sin(pi t) / sin^2(pi t / 2) = pi / tan(pi t / 2)``, without cancellation at small ``t``."""
        return math.pi / torch.tan(t * (math.pi / 2))


class ShiftedCosineSquaredSchedule(Schedule):
    """Nichol & Dhariwal (2021): ``alpha = f(t) / f(0)``, ``f(t) = cos^2((t + s) / (1 + s) * pi / 2)``.

    The offset ``s = 0.008`` keeps ``alpha'(0)`` finite (no vanishingly small noise at ``t = 0``).
    """

    name = "cosine_squared_shifted"
    offset = 0.008

    def _f0(self) -> float:
        return math.cos(self.offset / (1 + self.offset) * math.pi / 2) ** 2

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        """``alpha(t)`` (class docstring)."""
        s = self.offset
        return (torch.cos((t + s) / (1 + s) * (math.pi / 2)) ** 2 / self._f0()).clamp(0, 1)

    def alpha_derivative(self, t: torch.Tensor) -> torch.Tensor:
        """``d alpha / dt`` in closed form."""
        s = self.offset
        theta = (t + s) / (1 + s) * (math.pi / 2)
        return -(math.pi / (2 * (1 + s))) * torch.sin(2 * theta) / self._f0()


_SCHEDULES: dict[str, Schedule] = {
    s.name: s for s in (LinearSchedule(), CosineSchedule(), CosineSquaredSchedule(), ShiftedCosineSquaredSchedule())
}
SCHEDULE_NAMES: tuple[str, ...] = tuple(_SCHEDULES)


def get_schedule(name: str | Schedule) -> Schedule:
    """The schedule called ``name`` (a :class:`Schedule` is returned as is).

    Raises:
        ValueError: naming the valid names, when ``name`` is not one of them.
    """
    if isinstance(name, Schedule):
        return name
    if name not in _SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULE_NAMES}, got {name!r}")
    return _SCHEDULES[name]
