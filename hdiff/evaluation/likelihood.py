"""Upper bounds on ``-log p(x0)`` from any denoiser: the continuous-time NELBO of each noise process.

All three are Monte-Carlo estimates over noise levels (stratified) and noisy states; each holds
for any denoiser, and with the exact conditionals of the BP oracle each is *tight* (up to the
negligible end-point terms of the Gaussian one), so the oracle's estimate is an unbiased estimate
of the exact NLL that BP gives directly, and the gap of a learned denoiser is its excess.

- **masking** (MDLM, Sahoo et al. 2024), keep probability ``alpha(t)``, ``t ~ U(0, 1)``::

    NELBO = E_t E_{x_t} [ (-alpha'(t)) / (1 - alpha(t)) * sum_{i masked} -log p(x0_i | x_t) ]

- **uniform** (the continuous-time ELBO of a CTMC, Campbell et al. 2022, in the denoising
  score-entropy form of Lou et al. 2024, "SEDD"): the forward rate of each leaf is
  ``beta(t) (11^T / v - I)`` with ``beta = -alpha'/alpha``; with ``s_ic`` the model's ratio
  ``p_t(x_t with leaf i set to c) / p_t(x_t)`` and ``r_ic`` the same ratio under ``q(. | x0)``::

    NELBO = E_t E_{x_t} [ beta(t) / v * sum_i sum_{c != x_t,i} ( s_ic - r_ic log s_ic + r_ic log r_ic - r_ic ) ]

  The ratio of a one-leaf change only needs the leaf's posterior ``p = p(x0_i | x_t)``:
  ``s_ic = sum_b p_b q_t(c | b) / q_t(x_t,i | b)`` (closed form in :func:`uniform_nelbo`). The
  prior term vanishes because ``alpha(1) = 0`` makes ``q_1`` exactly uniform.

- **gaussian** (VDM, Kingma et al. 2021) on the embedding ``E``, in log-SNR ``gamma`` (the bound
  depends on the schedule only through its end points)::

    NELBO = KL(q(z_1 | x0) || N(0, I)) + E[-log p(x0 | z_0)] + 1/2 int_{g_min}^{g_max} e^g E ||E[x0] - x0_hat(z_g)||^2 dg

  with ``alpha = sigmoid(gamma)``, ``x0_hat = sum_b p(x0_i = b | z) E_b`` from the denoiser, and
  the decoder ``p(x0 | z_0) = prod_i p(x0_i | z_0)`` from the denoiser at ``g_max``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from hdiff.denoisers.base import Denoiser

SCHEDULES = ("linear", "cosine")


@dataclass
class BoundEstimate:
    """A Monte-Carlo estimate of an upper bound on ``-log p(x0)`` in nats.

    Attributes:
        nats: ``(B,)`` per-sample estimates.
        stderr: ``(B,)`` their standard errors.
    """

    nats: torch.Tensor
    stderr: torch.Tensor

    def bits_per_leaf(self, num_leaves: int) -> tuple[float, float]:
        """Mean over samples and its standard error, in bits per leaf."""
        scale = 1.0 / (num_leaves * math.log(2))
        mean = float(self.nats.mean()) * scale
        se = float(self.stderr.pow(2).sum().sqrt() / len(self.stderr)) * scale
        return mean, se


def _alpha_and_weight(t: torch.Tensor, schedule: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``alpha(t)`` and ``-alpha'(t) / (1 - alpha(t))``."""
    if schedule == "linear":
        return 1 - t, 1 / t
    alpha = torch.cos(math.pi / 2 * t)
    return alpha, (math.pi / 2) * torch.sin(math.pi / 2 * t) / (1 - alpha)


def _check(denoiser: Denoiser, x0: torch.Tensor, kind: str, num_draws: int) -> None:
    if denoiser.process.kind != kind:
        raise ValueError(f"this bound needs a {kind} process, got {denoiser.process!r}")
    if isinstance(num_draws, bool) or not isinstance(num_draws, int) or num_draws < 2:
        raise ValueError(f"num_draws must be an int >= 2 (for a standard error), got {num_draws!r}")
    denoiser.process.check_tokens(x0, "x0")


def _stratified(B: int, num_draws: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """``(B, K)`` float64 in (0, 1]: draw ``k`` of every sample lies in ``(k / K, (k + 1) / K]``."""
    u = torch.rand(B, num_draws, generator=generator, dtype=torch.float64, device=device)
    return (torch.arange(num_draws, device=device) + 1 - u) / num_draws


def _monte_carlo(x0: torch.Tensor, levels: torch.Tensor, batch_limit: int,
                 term: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> BoundEstimate:
    """Average ``term(x0_rows, level_rows) -> (b,)`` over the ``(B, K)`` levels of each sample."""
    B, K = levels.shape
    values = torch.empty(B * K, dtype=torch.float64, device=x0.device)
    flat_x0, flat_levels = x0.repeat_interleave(K, 0), levels.flatten()
    for start in range(0, B * K, batch_limit):
        sl = slice(start, start + batch_limit)
        values[sl] = term(flat_x0[sl], flat_levels[sl])
    values = values.view(B, K)
    return BoundEstimate(values.mean(1), values.std(1) / math.sqrt(K))


@torch.no_grad()
def masked_nelbo(denoiser: Denoiser, x0: torch.Tensor, *, num_draws: int = 64, schedule: str = "linear",
                 generator: torch.Generator | None = None, batch_limit: int = 8192) -> BoundEstimate:
    """Estimate the MDLM NELBO of each clean sample (masking noise).

    Args:
        denoiser: a denoiser whose ``process`` is a :class:`~hdiff.noise.MaskingProcess`.
        x0: clean tokens ``(B, *leaf_shape)``.
        num_draws: Monte-Carlo draws of ``(t, x_t)`` per sample, with ``t`` stratified over (0, 1).
        schedule: ``linear`` (``alpha = 1 - t``) or ``cosine`` (``alpha = cos(pi t / 2)``); the
            bound's value does not depend on it, only its variance.
        generator: RNG for ``t`` and the masks.
        batch_limit: most ``(sample, draw)`` pairs sent to the denoiser at once.

    Returns:
        :class:`BoundEstimate` in nats.
    """
    _check(denoiser, x0, "masking", num_draws)
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    process = denoiser.process

    def term(clean: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, weight = _alpha_and_weight(t.clamp_min(1e-6), schedule)
        x_t = process.add_noise(clean, alpha, generator=generator)
        log_p = denoiser(x_t, alpha.float())  # (b, v, *leaf_shape)
        nll = -log_p.gather(1, clean.long().unsqueeze(1)).squeeze(1).double()
        return weight * torch.where(x_t == process.mask_token, nll, 0.0).flatten(1).sum(1)

    return _monte_carlo(x0, _stratified(x0.shape[0], num_draws, generator, x0.device), batch_limit, term)


@torch.no_grad()
def uniform_nelbo(denoiser: Denoiser, x0: torch.Tensor, *, num_draws: int = 64,
                  generator: torch.Generator | None = None, batch_limit: int = 8192) -> BoundEstimate:
    """Estimate the continuous-time NELBO of uniform noise (module docstring), ``alpha = 1 - t``.

    Closed forms, with ``u = (1 - alpha) / v``, ``x = x_t,i``, ``p = p(x0_i | x_t)`` and ``c != x``:
    ``s_c = (1 - p_x) + u p_x / (u + alpha) + (alpha / u) p_c``; ``r_c = u / (u + alpha)`` if
    ``x0_i = x``, else ``1 + alpha / u`` for ``c = x0_i`` and ``1`` otherwise.

    Args:
        denoiser: a denoiser whose ``process`` is a :class:`~hdiff.noise.UniformProcess`.
        x0: clean tokens ``(B, *leaf_shape)``.
        num_draws: Monte-Carlo draws of ``(t, x_t)`` per sample, ``t = tau**3`` with ``tau``
            stratified over (0, 1) (importance sampling of small ``t``).
        generator: RNG for ``t`` and the noise.
        batch_limit: most ``(sample, draw)`` pairs sent to the denoiser at once.

    Returns:
        :class:`BoundEstimate` in nats.
    """
    _check(denoiser, x0, "uniform", num_draws)
    process, v = denoiser.process, denoiser.process.vocab_size

    def term(clean: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        # t = tau^3 (density 3 tau^2): a corrupted leaf at small t contributes ~ log(1/t) / t with
        # probability ~ t, which has infinite variance under t ~ U(0, 1) and finite variance here
        tau = tau.clamp(1e-2, 1 - 1e-7)  # t >= 1e-6: alpha stays below 1 in float32
        t = tau.pow(3)
        alpha = 1 - t
        x_t = process.add_noise(clean, alpha, generator=generator)
        p = denoiser(x_t, alpha.float()).double().exp().movedim(1, -1)  # (b, *leaf_shape, v)
        shape = (-1,) + (1,) * (p.ndim - 1)
        a, u = alpha.view(shape), (t / v).view(shape)
        p_x = p.gather(-1, x_t.unsqueeze(-1).long())
        s = (1 - p_x) + u * p_x / (u + a) + (a / u) * p
        onehot_x0 = torch.nn.functional.one_hot(clean.long(), v).bool()
        clean_kept = (x_t == clean).unsqueeze(-1)
        r = torch.where(clean_kept, u / (u + a), torch.where(onehot_x0, 1 + a / u, torch.ones_like(p)))
        f = s - r * s.log() + r * r.log() - r
        f = f.masked_fill(torch.nn.functional.one_hot(x_t.long(), v).bool(), 0.0)  # only c != x_t,i
        beta = 1 / alpha  # -alpha' / alpha for alpha = 1 - t
        return 3 * tau.square() * beta / v * f.flatten(1).sum(1)

    return _monte_carlo(x0, _stratified(x0.shape[0], num_draws, generator, x0.device), batch_limit, term)


@torch.no_grad()
def gaussian_nelbo(denoiser: Denoiser, x0: torch.Tensor, *, num_draws: int = 64, log_snr_range: tuple[float, float] = (-10.0, 10.0),
                   generator: torch.Generator | None = None, batch_limit: int = 8192) -> BoundEstimate:
    """Estimate the VDM bound (module docstring) for Gaussian noise on the embedding.

    Args:
        denoiser: a denoiser whose ``process`` is a :class:`~hdiff.noise.GaussianProcess`.
        x0: clean tokens ``(B, *leaf_shape)``.
        num_draws: Monte-Carlo draws per sample, ``gamma`` stratified over ``log_snr_range``; every
            draw also estimates the decoder term with its own ``z_0``.
        log_snr_range: ``(g_min, g_max)``; the prior term at ``g_min`` is computed exactly.
        generator: RNG for ``gamma`` and the noise.
        batch_limit: most ``(sample, draw)`` pairs sent to the denoiser at once.

    Returns:
        :class:`BoundEstimate` in nats.
    """
    _check(denoiser, x0, "gaussian", num_draws)
    g_min, g_max = (float(g) for g in log_snr_range)
    if not g_min < g_max:
        raise ValueError(f"log_snr_range must be increasing, got {log_snr_range!r}")
    process = denoiser.process
    a_min, a_max = 1 / (1 + math.exp(-g_min)), 1 / (1 + math.exp(-g_max))

    def term(clean: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
        b = clean.shape[0]
        emb = process.embed(clean).double()  # (b, k, *leaf_shape)
        # prior: KL(N(sqrt(a) E, (1 - a) I) || N(0, I)) per dimension, summed
        prior = 0.5 * (a_min * emb.pow(2) + (1 - a_min) - 1 - math.log(1 - a_min)).flatten(1).sum(1)
        # decoder at g_max
        x_end = process.add_noise(clean, a_max, generator=generator)
        log_p = denoiser(x_end, torch.full((b,), a_max))
        recon = -log_p.gather(1, clean.long().unsqueeze(1)).squeeze(1).double().flatten(1).sum(1)
        # diffusion term at gamma = g_min + unit * (g_max - g_min)
        gamma = g_min + unit * (g_max - g_min)
        alpha = torch.sigmoid(gamma)
        z = process.add_noise(clean, alpha.float(), generator=generator)
        x0_hat = process.expected_embedding(denoiser(z, alpha.float()).double().exp())
        diffusion = 0.5 * (g_max - g_min) * gamma.exp() * (emb - x0_hat).pow(2).flatten(1).sum(1)
        return prior + recon + diffusion

    return _monte_carlo(x0, _stratified(x0.shape[0], num_draws, generator, x0.device), batch_limit, term)


def nelbo(denoiser: Denoiser, x0: torch.Tensor, *, num_draws: int = 64, generator: torch.Generator | None = None,
          batch_limit: int = 8192) -> BoundEstimate:
    """The NELBO of the denoiser's own noise process: :func:`masked_nelbo`, :func:`uniform_nelbo` or :func:`gaussian_nelbo`."""
    bound = {"masking": masked_nelbo, "uniform": uniform_nelbo, "gaussian": gaussian_nelbo}[denoiser.process.kind]
    return bound(denoiser, x0, num_draws=num_draws, generator=generator, batch_limit=batch_limit)
