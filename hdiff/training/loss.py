"""The training objective: cross-entropy of the predicted clean leaves over random noise levels.

A learned denoiser outputs ``log p(x0_i = b | x_t)`` (the denoiser currency, DESIGN.md), and the
cross-entropy ``-log p_theta(x0_i | x_t)`` is the proper loss for it: its minimiser is the exact
posterior, the BP oracle. Per process (Sahoo et al. 2024, "MDLM", for masking):

- masking: only masked leaves carry information; the loss is their mean cross-entropy, or with
  ``elbo_weight`` ``sum_masked CE * w(t) / num_leaves`` with ``w = -alpha'(t) / (1 - alpha(t))``
  (``1/t`` for ``alpha = 1 - t``), whose expectation over ``t ~ U(0, 1)`` is the MDLM bound on
  ``-log p(x) / num_leaves`` in nats.
- uniform and Gaussian: the mean cross-entropy over all leaves.
"""

from __future__ import annotations

import math

import torch

from hdiff.noise.base import NoiseProcess

_COSINE_OFFSET = 0.008  # Nichol & Dhariwal (2021): keeps alpha_bar'(0) finite


def alpha_of_t(t: torch.Tensor, schedule: str, *, gaussian: bool) -> torch.Tensor:
    """Signal level ``alpha(t)`` for ``t`` in [0, 1].

    Args:
        t: ``(B,)`` times.
        schedule: ``linear`` (``alpha = 1 - t``) or ``cosine``: ``alpha_bar(t) = f(t) / f(0)`` with
            ``f(t) = cos^2((t + s) / (1 + s) * pi / 2)``, ``s = 0.008`` for Gaussian noise (Nichol &
            Dhariwal 2021), and ``cos^2(t pi / 2)`` for the discrete processes (``s = 0``, as hdiff's
            discrete schedulers).
        gaussian: which variant of ``cosine``.

    Returns:
        ``(B,)`` alpha in [0, 1], same dtype as ``t``.
    """
    if schedule == "linear":
        return (1 - t).clamp(0, 1)
    if schedule != "cosine":
        raise ValueError(f"schedule must be 'linear' or 'cosine', got {schedule!r}")
    s = _COSINE_OFFSET if gaussian else 0.0
    f = torch.cos((t + s) / (1 + s) * (math.pi / 2)) ** 2
    return (f / math.cos(s / (1 + s) * math.pi / 2) ** 2).clamp(0, 1)


def elbo_weight(t: torch.Tensor, schedule: str) -> torch.Tensor:
    """MDLM's weight ``-alpha'(t) / (1 - alpha(t))`` of the masked cross-entropy (discrete schedules)."""
    if schedule == "linear":
        return 1 / t
    # alpha = cos^2(pi t / 2): -alpha' = (pi / 2) sin(pi t), 1 - alpha = sin^2(pi t / 2)  ->  pi / tan(pi t / 2)
    return math.pi / torch.tan(t * (math.pi / 2))


def sample_t(batch: int, t_min: float, *, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """``t ~ U(t_min, 1)``, ``(B,)`` float32, drawn from ``generator`` (which lives on ``device``)."""
    u = torch.rand(batch, generator=generator, device=device)
    return t_min + (1 - t_min) * u


def diffusion_loss(model: torch.nn.Module, x0: torch.Tensor, process: NoiseProcess, *, schedule: str,
                   t_min: float, elbo: bool, generator: torch.Generator) -> torch.Tensor:
    """One Monte-Carlo estimate of the training loss on a batch of clean leaves.

    Args:
        model: ``model(x_t, alpha) -> log p(x0 | x_t)`` ``(B, v, *leaf_shape)``; ``alpha`` is passed
            as a ``(B,)`` float32 tensor.
        x0: clean tokens ``(B, *leaf_shape)``.
        process: the forward process (its ``add_noise`` draws from ``generator``).
        schedule: ``linear`` or ``cosine`` (:func:`alpha_of_t`).
        t_min: lower end of ``t``.
        elbo: masking only: weight masked cross-entropies by :func:`elbo_weight` (see module doc).
        generator: the only RNG used (time and noise), on ``x0``'s device.

    Returns:
        A scalar, in nats per leaf (per masked leaf for unweighted masking).
    """
    t = sample_t(x0.shape[0], t_min, generator=generator, device=x0.device)
    alpha = alpha_of_t(t, schedule, gaussian=not process.discrete)
    x_t = process.add_noise(x0, alpha, generator=generator)
    log_probs = model(x_t, alpha)
    # a gather, not F.nll_loss: any leaf shape, and no contiguity demands on the model's output
    nll = -log_probs.float().gather(1, x0.unsqueeze(1)).squeeze(1)  # (B, *leaf_shape)
    if process.kind != "masking":
        return nll.mean()
    masked = x_t == process.mask_token
    nll = torch.where(masked, nll, 0.0)  # kept leaves are given: nothing to learn there
    if elbo:
        w = elbo_weight(t, schedule).view(-1, *[1] * (nll.ndim - 1))
        return (w * nll).sum() / nll.numel()
    return nll.sum() / masked.sum().clamp_min(1)


@torch.no_grad()
def evaluation_loss(model: torch.nn.Module, tokens: torch.Tensor, process: NoiseProcess, *, schedule: str,
                    t_min: float, elbo: bool, batch_size: int, seed: int, device: torch.device) -> float:
    """:func:`diffusion_loss` averaged over a whole token set, with the same noise draws on every call.

    The generator is reseeded from ``seed`` each time, so successive evaluations during training
    differ only through the weights: a smooth held-out curve, and no draw from the training RNGs.

    Args:
        model: the denoiser (put in eval mode by the caller).
        tokens: ``(n, *leaf_shape)`` clean samples.
        process, schedule, t_min, elbo: as in :func:`diffusion_loss`.
        batch_size: samples per forward pass.
        seed: the evaluation noise seed.
        device: where to compute.

    Returns:
        The sample-weighted mean of the per-batch losses.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    total, n = 0.0, tokens.shape[0]
    for i in range(0, n, batch_size):
        x0 = tokens[i:i + batch_size].to(device)
        loss = diffusion_loss(model, x0, process, schedule=schedule, t_min=t_min, elbo=elbo, generator=gen)
        total += float(loss) * x0.shape[0]
    return total / n
