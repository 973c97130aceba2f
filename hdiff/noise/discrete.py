"""Discrete corruptions of tokens: masking (absorbing state) and uniform resampling."""

from __future__ import annotations

import torch

from hdiff.noise.base import Alpha, DenoiserFn, NoiseProcess
from hdiff.noise.schedules import Schedule
from hdiff.tokens import check_tokens


class MaskingProcess(NoiseProcess):
    """Absorbing noise: each token kept with probability ``alpha``, else replaced by ``MASK``.

    ``MASK`` is the token id ``vocab_size``. Leaf likelihood: ``0`` for every ``b`` at a masked
    leaf, ``log 1[b = x_t,i]`` at a kept one.
    """

    name = "masking"
    posterior_needs_alpha = False  # a masked leaf carries no evidence at any alpha
    schedulers = ("masked",)
    elbo_loss = True

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
        self.check_state(x_t)
        self.alpha_tensor(alpha, x_t.shape[0], x_t.ndim, x_t.device)  # validated; masking evidence does not depend on it
        onehot = torch.nn.functional.one_hot(x_t.long(), self.vocab_size + 1)[..., : self.vocab_size]
        masked = (x_t == self.mask_token).unsqueeze(-1)
        return torch.where(masked | (onehot > 0), 0.0, -torch.inf).to(torch.float32)

    def check_state(self, x_t: torch.Tensor, name: str = "x_t") -> None:
        """Raise ``ValueError`` unless ``x_t`` is tokens in ``[0, v]`` (``v`` = MASK)."""
        check_tokens(x_t, name, self.vocab_size + 1)

    def informative_leaves(self, x_t: torch.Tensor) -> torch.Tensor:
        """The masked leaves (a kept leaf is its clean value)."""
        return x_t == self.mask_token

    def reduce_loss(self, nll: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, schedule: Schedule, *,
                    elbo: bool) -> torch.Tensor:
        """Masked leaves only (MDLM, Sahoo et al. 2024).

        ``elbo=False``: their mean cross-entropy. ``elbo=True``: ``sum_masked CE * w(t) / num_leaves``
        with ``w = -alpha'(t) / (1 - alpha(t))``, whose expectation over ``t ~ U(0, 1)`` is the MDLM
        bound on ``-log p(x) / num_leaves`` in nats.
        """
        masked = self.informative_leaves(x_t)
        nll = torch.where(masked, nll, 0.0)  # kept leaves are given: nothing to learn there
        if elbo:
            w = schedule.masked_elbo_weight(t).view(-1, *[1] * (nll.ndim - 1))
            return (w * nll).sum() / nll.numel()
        return nll.sum() / masked.sum().clamp_min(1)

    def bound_term(self, denoiser: DenoiserFn, x0: torch.Tensor, u: torch.Tensor, schedule: Schedule, *,
                   generator: torch.Generator | None) -> torch.Tensor:
        """MDLM's continuous-time bound at ``t = u``: ``(-alpha'/(1 - alpha)) sum_{i masked} -log p(x0_i | x_t)``."""
        t = u.clamp_min(1e-6)
        alpha, weight = schedule.alpha(t), schedule.masked_elbo_weight(t)
        x_t = self.add_noise(x0, alpha, generator=generator)
        log_p = denoiser(x_t, alpha.float())  # (b, v, *leaf_shape)
        nll = -log_p.gather(1, x0.long().unsqueeze(1)).squeeze(1).double()
        return weight * torch.where(self.informative_leaves(x_t), nll, 0.0).flatten(1).sum(1)

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

    name = "uniform"
    schedulers = ("uniform", "discrete-ddim")

    def add_noise(self, x0: torch.Tensor, alpha: Alpha, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """Redraw each token uniformly with probability ``1 - alpha``."""
        self.check_tokens(x0, "x0")
        a = self.alpha_tensor(alpha, x0.shape[0], x0.ndim, x0.device)
        keep = torch.rand(x0.shape, generator=generator, device=x0.device, dtype=torch.float64) < a
        fresh = torch.randint(0, self.vocab_size, x0.shape, generator=generator, device=x0.device)
        return torch.where(keep, x0, fresh)

    def leaf_log_likelihood(self, x_t: torch.Tensor, alpha: Alpha) -> torch.Tensor:
        """``log(alpha 1[b = x_t,i] + (1 - alpha) / v)``, ``(B, *leaf_shape, v)``."""
        self.check_state(x_t)
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

    def bound_term(self, denoiser: DenoiserFn, x0: torch.Tensor, u: torch.Tensor, schedule: Schedule, *,
                   generator: torch.Generator | None) -> torch.Tensor:
        """The CTMC bound in score-entropy form (Campbell et al. 2022; Lou et al. 2024) at ``t = u**3``.

        Forward rate of a leaf: ``beta(t) (11^T / v - I)``, ``beta = -alpha'/alpha``. With
        ``u_ = (1 - alpha) / v``, ``x = x_t,i``, ``p = p(x0_i | x_t)`` and ``c != x``, the model's
        ratio ``s_c = (1 - p_x) + u_ p_x / (u_ + alpha) + (alpha / u_) p_c`` and the true one
        ``r_c = u_ / (u_ + alpha)`` if ``x0_i = x``, else ``1 + alpha / u_`` for ``c = x0_i`` and 1
        otherwise; the integrand is ``beta / v sum_i sum_{c != x} (s - r log s + r log r - r)``.
        ``t = u**3`` (density ``3 u^2``) because a corrupted leaf at small ``t`` contributes
        ``~ log(1/t) / t`` with probability ``~ t``: infinite variance under ``t ~ U(0, 1)``.
        """
        v = self.vocab_size
        tau = u.clamp(1e-2, 1 - 1e-7)  # t >= 1e-6: alpha stays below 1 in float32
        t = tau.pow(3)
        alpha = schedule.alpha(t)
        x_t = self.add_noise(x0, alpha, generator=generator)
        p = denoiser(x_t, alpha.float()).double().exp().movedim(1, -1)  # (b, *leaf_shape, v)
        shape = (-1,) + (1,) * (p.ndim - 1)
        a, un = alpha.view(shape), ((1 - alpha) / v).view(shape)
        p_x = p.gather(-1, x_t.unsqueeze(-1).long())
        s = (1 - p_x) + un * p_x / (un + a) + (a / un) * p
        onehot_x0 = torch.nn.functional.one_hot(x0.long(), v).bool()
        clean_kept = (x_t == x0).unsqueeze(-1)
        r = torch.where(clean_kept, un / (un + a), torch.where(onehot_x0, 1 + a / un, torch.ones_like(p)))
        f = s - r * s.log() + r * r.log() - r
        f = f.masked_fill(torch.nn.functional.one_hot(x_t.long(), v).bool(), 0.0)  # only c != x_t,i
        beta = -schedule.alpha_derivative(t) / alpha
        return 3 * tau.square() * beta / v * f.flatten(1).sum(1)
