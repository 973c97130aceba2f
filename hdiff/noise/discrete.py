"""Discrete corruptions of tokens: masking (absorbing state) and uniform resampling."""

from __future__ import annotations

import torch

from hdiff.noise.base import Alpha, NoiseProcess


class MaskingProcess(NoiseProcess):
    """Absorbing noise: each token kept with probability ``alpha``, else replaced by ``MASK``.

    ``MASK`` is the token id ``vocab_size``. Leaf likelihood: ``0`` for every ``b`` at a masked
    leaf, ``log 1[b = x_t,i]`` at a kept one.
    """

    kind = "masking"

    @property
    def mask_token(self) -> int:
        """The id of MASK, ``vocab_size``."""
        return self.vocab_size

    def add_noise(self, x0: torch.Tensor, alpha: Alpha, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """Mask each token independently with probability ``1 - alpha``."""
        self.check_tokens(x0, "x0")
        a = self.alpha_tensor(alpha, x0.shape[0], x0.ndim, x0.device)
        keep = torch.rand(x0.shape, generator=generator, device=x0.device, dtype=torch.float64) < a
        return torch.where(keep, x0, self.mask_token)

    def leaf_log_likelihood(self, x_t: torch.Tensor, alpha: Alpha) -> torch.Tensor:
        """``(B, *leaf_shape, v)``: 0 where compatible, ``-inf`` where excluded."""
        self.check_tokens(x_t, "x_t", allow_mask=True)
        self.alpha_tensor(alpha, x_t.shape[0], x_t.ndim, x_t.device)  # validated; masking evidence does not depend on it
        onehot = torch.nn.functional.one_hot(x_t.long(), self.vocab_size + 1)[..., : self.vocab_size]
        masked = (x_t == self.mask_token).unsqueeze(-1)
        return torch.where(masked | (onehot > 0), 0.0, -torch.inf).to(torch.float32)

    def leaf_shape_of(self, x_t: torch.Tensor) -> tuple[int, ...]:
        """Tokens: ``x_t.shape[1:]``."""
        return tuple(x_t.shape[1:])

    def prior_sample(self, batch_size: int, leaf_shape: tuple[int, ...], *, generator: torch.Generator | None = None,
                     device: torch.device | str = "cpu") -> torch.Tensor:
        """All MASK, ``(B, *leaf_shape)``."""
        return torch.full((batch_size, *leaf_shape), self.mask_token, dtype=torch.long, device=device)


class UniformProcess(NoiseProcess):
    """Uniform noise: each token kept with probability ``alpha``, else redrawn uniformly from ``[0, v)``.

    ``q(x_t = c | x0 = b) = alpha 1[b = c] + (1 - alpha) / v``; the redraw may give back ``b``.
    """

    kind = "uniform"

    def add_noise(self, x0: torch.Tensor, alpha: Alpha, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """Redraw each token uniformly with probability ``1 - alpha``."""
        self.check_tokens(x0, "x0")
        a = self.alpha_tensor(alpha, x0.shape[0], x0.ndim, x0.device)
        keep = torch.rand(x0.shape, generator=generator, device=x0.device, dtype=torch.float64) < a
        fresh = torch.randint(0, self.vocab_size, x0.shape, generator=generator, device=x0.device)
        return torch.where(keep, x0, fresh)

    def leaf_log_likelihood(self, x_t: torch.Tensor, alpha: Alpha) -> torch.Tensor:
        """``log(alpha 1[b = x_t,i] + (1 - alpha) / v)``, ``(B, *leaf_shape, v)``."""
        self.check_tokens(x_t, "x_t")
        a = self.alpha_tensor(alpha, x_t.shape[0], x_t.ndim + 1, x_t.device)
        onehot = torch.nn.functional.one_hot(x_t.long(), self.vocab_size).to(torch.float64)
        return (a * onehot + (1 - a) / self.vocab_size).log().to(torch.float32)

    def leaf_shape_of(self, x_t: torch.Tensor) -> tuple[int, ...]:
        """Tokens: ``x_t.shape[1:]``."""
        return tuple(x_t.shape[1:])

    def prior_sample(self, batch_size: int, leaf_shape: tuple[int, ...], *, generator: torch.Generator | None = None,
                     device: torch.device | str = "cpu") -> torch.Tensor:
        """Uniform tokens, ``(B, *leaf_shape)``."""
        return torch.randint(0, self.vocab_size, (batch_size, *leaf_shape), generator=generator, device=device)
