"""The denoiser currency: the posterior over clean leaves (docs/denoisers.md).

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

