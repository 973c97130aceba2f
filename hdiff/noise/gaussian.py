"""Gaussian (variance-preserving) noise on a token embedding."""

from __future__ import annotations

import math
from typing import Any

import torch

from hdiff.noise.base import Alpha, DenoiserFn, NoiseProcess
from hdiff.noise.schedules import Schedule


class GaussianProcess(NoiseProcess):
    """VP diffusion on embedded tokens: ``z = sqrt(alpha) E[x0] + sqrt(1 - alpha) eps``.

    States are channels-first floats ``(B, k, *leaf_shape)`` (diffusers' convention).

    Args:
        vocab_size: ``v``.
        embedding: ``(v, k)`` float; default ``2 * onehot - 1`` (so ``k = v``, values in [-1, 1]).
        log_snr_range: ``(g_min, g_max)``, the log-SNR range of the VDM bound (:meth:`bound_term`).

    The leaf likelihood (docs/noise.md) is ``-||z_i - sqrt(alpha) E_b||^2 / (2 (1 - alpha))``,
    computed without the ``b``-independent ``||z_i||^2`` term; at ``alpha = 1`` it is hard
    evidence for the nearest embedding.
    """

    name = "gaussian"
    discrete = False
    default_schedule = "cosine_squared_shifted"
    schedulers = ("ddpm", "ddim", "euler", "dpmsolver")

    def __init__(self, vocab_size: int, embedding: torch.Tensor | None = None,
                 log_snr_range: tuple[float, float] = (-10.0, 10.0)) -> None:
        super().__init__(vocab_size)
        g_min, g_max = (float(g) for g in log_snr_range)
        if not (math.isfinite(g_min) and math.isfinite(g_max) and g_min < g_max):
            raise ValueError(f"log_snr_range must be finite and increasing, got {log_snr_range!r}")
        self.log_snr_range = (g_min, g_max)
        if embedding is None:
            embedding = 2 * torch.eye(vocab_size, dtype=torch.float32) - 1
        if not isinstance(embedding, torch.Tensor) or not embedding.is_floating_point():
            raise ValueError("embedding must be a floating-point tensor of shape (vocab_size, k)")
        if embedding.ndim != 2 or embedding.shape[0] != vocab_size:
            raise ValueError(f"embedding must have shape ({vocab_size}, k), got {tuple(embedding.shape)}")
        if not torch.isfinite(embedding).all():
            raise ValueError("embedding must be finite")
        if torch.unique(embedding, dim=0).shape[0] != vocab_size:
            raise ValueError("embedding rows must be distinct (tokens must be identifiable)")
        self.embedding = embedding.to(torch.float32)

    def __repr__(self) -> str:
        return f"GaussianProcess(vocab_size={self.vocab_size}, embedding_dim={self.embedding_dim})"

    def config(self) -> dict[str, Any]:
        """Name, ``v`` and the embedding (as nested lists), for :func:`hdiff.noise.get_process`."""
        return {**super().config(), "embedding": self.embedding.tolist(), "log_snr_range": list(self.log_snr_range)}

    @property
    def embedding_dim(self) -> int:
        """``k``, the channels of a state."""
        return self.embedding.shape[1]

    def embed(self, x0: torch.Tensor) -> torch.Tensor:
        """Tokens ``(B, *leaf_shape)`` -> ``E[x0]`` ``(B, k, *leaf_shape)``."""
        self.check_tokens(x0, "x0")
        return self.embedding.to(x0.device)[x0.long()].movedim(-1, 1)

    def expected_embedding(self, probs: torch.Tensor) -> torch.Tensor:
        """``sum_b p_b E_b``: probabilities ``(B, v, *leaf_shape)`` -> ``(B, k, *leaf_shape)``."""
        e = self.embedding.to(device=probs.device, dtype=probs.dtype)
        return torch.einsum("bv...,vk->bk...", probs, e)

    def add_noise(self, x0: torch.Tensor, alpha: Alpha, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """``sqrt(alpha) E[x0] + sqrt(1 - alpha) eps`` ``(B, k, *leaf_shape)``."""
        e = self.embed(x0)
        a = self.alpha_tensor(alpha, x0.shape[0], e.ndim, x0.device, torch.float32)
        eps = torch.randn(e.shape, generator=generator, device=e.device, dtype=e.dtype)
        return a.sqrt() * e + (1 - a).sqrt() * eps

    def check_state(self, z: torch.Tensor, name: str = "x_t") -> None:
        """Raise ``ValueError`` unless ``z`` is a finite float ``(B, k, *leaf_shape)``."""
        if not isinstance(z, torch.Tensor) or not z.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor of shape (B, {self.embedding_dim}, *leaf_shape)")
        if z.ndim < 3 or z.shape[1] != self.embedding_dim:
            raise ValueError(f"{name} must have shape (B, {self.embedding_dim}, *leaf_shape), got {tuple(z.shape)}")
        if not torch.isfinite(z).all():
            raise ValueError(f"{name} contains NaN or inf")

    def leaf_log_likelihood(self, x_t: torch.Tensor, alpha: Alpha) -> torch.Tensor:
        """``(B, *leaf_shape, v)`` float32, each leaf shifted so that its max is 0."""
        self.check_state(x_t)
        z = x_t.movedim(1, -1).to(torch.float64)  # (B, *leaf_shape, k)
        a = self.alpha_tensor(alpha, z.shape[0], z.ndim, z.device)
        e = self.embedding.to(device=z.device, dtype=torch.float64)
        # -||z - sqrt(a) E_b||^2 / (2(1-a)) = (sqrt(a) z.E_b - a ||E_b||^2 / 2) / (1 - a) + const(z)
        score = a.sqrt() * (z @ e.T) - a * (e * e).sum(-1) / 2
        noisy = a < 1
        ll = score / torch.where(noisy, 1 - a, 1.0)
        if not bool(noisy.all()):  # alpha = 1: z is an embedding; hard evidence for the nearest one
            nearest = torch.cdist(z.flatten(1, -2), e.unsqueeze(0).expand(z.shape[0], -1, -1)).argmin(-1)
            hard = torch.full_like(ll, -torch.inf).flatten(1, -2)
            hard.scatter_(-1, nearest.unsqueeze(-1), 0.0)
            ll = torch.where(noisy, ll, hard.view_as(ll))
        ll = ll - ll.amax(-1, keepdim=True)  # a per-leaf constant; keeps float32 precision
        return ll.to(torch.float32)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Most likely token per leaf of a (nearly) clean state: ``(B, k, *leaf_shape)`` -> ``(B, *leaf_shape)``."""
        return self.leaf_log_likelihood(z, 1.0).argmax(-1)

    def leaf_shape_of(self, x_t: torch.Tensor) -> tuple[int, ...]:
        """Channels-first floats: ``x_t.shape[2:]``."""
        return tuple(x_t.shape[2:])

    def prior_sample(self, batch_size: int, leaf_shape: tuple[int, ...], *, generator: torch.Generator | None = None,
                     device: torch.device | str = "cpu") -> torch.Tensor:
        """Standard normal ``(B, k, *leaf_shape)`` (the caller scales it by the scheduler's ``init_noise_sigma``)."""
        return torch.randn((batch_size, self.embedding_dim, *leaf_shape), generator=generator, device=device)

    def bound_term(self, denoiser: DenoiserFn, x0: torch.Tensor, u: torch.Tensor, schedule: Schedule, *,
                   generator: torch.Generator | None) -> torch.Tensor:
        """The VDM bound (Kingma et al. 2021) in log-SNR ``gamma``, one draw at ``gamma = g_min + u (g_max - g_min)``.

        ``KL(q(z_1 | x0) || N(0, I)) + E[-log p(x0 | z_0)] + 1/2 int e^g ||E[x0] - x0_hat(z_g)||^2 dg``
        with ``alpha = sigmoid(gamma)``; the decoder ``p(x0 | z_0)`` is the denoiser at ``g_max``.
        The bound depends on the schedule only through its end points, so ``schedule`` is unused.
        """
        g_min, g_max = self.log_snr_range
        a_min, a_max = 1 / (1 + math.exp(-g_min)), 1 / (1 + math.exp(-g_max))
        b = x0.shape[0]
        emb = self.embed(x0).double()  # (b, k, *leaf_shape)
        # prior: KL(N(sqrt(a) E, (1 - a) I) || N(0, I)) per dimension, summed
        prior = 0.5 * (a_min * emb.pow(2) + (1 - a_min) - 1 - math.log(1 - a_min)).flatten(1).sum(1)
        x_end = self.add_noise(x0, a_max, generator=generator)  # decoder at g_max
        log_p = denoiser(x_end, torch.full((b,), a_max))
        recon = -log_p.gather(1, x0.long().unsqueeze(1)).squeeze(1).double().flatten(1).sum(1)
        gamma = g_min + u * (g_max - g_min)
        alpha = torch.sigmoid(gamma)
        z = self.add_noise(x0, alpha.float(), generator=generator)
        x0_hat = self.expected_embedding(denoiser(z, alpha.float()).double().exp())
        diffusion = 0.5 * (g_max - g_min) * gamma.exp() * (emb - x0_hat).pow(2).flatten(1).sum(1)
        return prior + recon + diffusion
