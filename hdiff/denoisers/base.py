"""The denoiser currency: the posterior over clean leaves (DESIGN.md).

Every denoiser, exact or learned, maps a noisy state and its signal level to
``log p(x0_i = b | x_t)``, shape ``(B, v, *leaf_shape)`` (channels-first log-probabilities).
Everything a scheduler needs (x0_hat, epsilon, v, the score, the discrete reverse kernels) is a
function of it, so one adapter serves every scheduler and every denoiser.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from hdiff.noise.base import Alpha, NoiseProcess


@runtime_checkable
class Denoiser(Protocol):
    """``denoiser(x_t, alpha) -> log p(x0 = b | x_t)`` of shape ``(B, v, *leaf_shape)``.

    Attributes:
        process: the noise process whose states ``x_t`` the denoiser reads.
    """

    process: NoiseProcess

    def __call__(self, x_t: torch.Tensor, alpha: Alpha) -> torch.Tensor:  # pragma: no cover - protocol
        ...


@runtime_checkable
class JointSampler(Protocol):
    """A denoiser that can also draw ``x0`` jointly from ``p(x0 | x_t)`` (the BP oracle)."""

    def sample_x0(self, x_t: torch.Tensor, alpha: Alpha, *,
                  generator: torch.Generator | None = None) -> torch.Tensor:  # pragma: no cover - protocol
        """Draws ``x0`` jointly from the exact posterior ``p(x0 | x_t)``.

        Args:
            x_t: the noisy state: tokens ``(B, *leaf_shape)`` for discrete noise, or
                ``(B, k, *leaf_shape)`` embeddings for Gaussian noise.
            alpha: the signal level of ``x_t`` (a float, or one per sample ``(B,)``).
            generator: the random generator of the draw.

        Returns:
            ``(B, *leaf_shape)`` LongTensor of clean tokens, one joint draw per sample.
        """
        ...
