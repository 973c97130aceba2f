"""The training objective: cross-entropy of the predicted clean leaves over random noise levels.

A learned denoiser outputs ``log p(x0_i = b | x_t)`` (the denoiser currency, docs/denoisers.md),
and the cross-entropy ``-log p_theta(x0_i | x_t)`` is the proper loss for it: its minimiser is the
exact posterior, the BP oracle. ``t ~ U(t_min, 1)`` is mapped to ``alpha(t)`` by a
:class:`~hdiff.noise.Schedule` (the same object the schedulers and bounds use), and the process
reduces the per-leaf cross-entropies (:meth:`~hdiff.noise.NoiseProcess.reduce_loss`: masking counts
masked leaves only, optionally with MDLM's ELBO weight; the others average every leaf).
"""

from __future__ import annotations

from typing import Callable

import torch

from hdiff.noise import NoiseProcess, Schedule, get_schedule

def sample_t(batch: int, t_min: float, *, generator: torch.Generator, device: torch.device,
             stratified: bool = False) -> torch.Tensor:
    """``t ~ U(t_min, 1)``, ``(B,)`` float32, drawn from ``generator`` (which lives on ``device``).

    ``stratified``: the low-discrepancy sampler of VDM (Kingma et al. 2021, appendix I.1):
    ``u_i = (u_0 + i / B) mod 1`` with one ``u_0 ~ U(0, 1)``. Every ``u_i`` is still uniform (the loss
    stays unbiased) but the batch covers ``[0, 1)`` evenly, which lowers the loss's variance.
    """
    if stratified:
        u0 = torch.rand(1, generator=generator, device=device)
        u = torch.remainder(u0 + torch.arange(batch, device=device) / batch, 1.0)
    else:
        u = torch.rand(batch, generator=generator, device=device)
    return t_min + (1 - t_min) * u


def diffusion_loss(model: torch.nn.Module, x0: torch.Tensor, process: NoiseProcess, *, schedule: str | Schedule,
                   t_min: float, elbo: bool, generator: torch.Generator, oracle: Callable | None = None,
                   stratified: bool = False) -> torch.Tensor:
    """One Monte-Carlo estimate of the training loss on a batch of clean leaves.

    Args:
        model: ``model(x_t, alpha) -> log p(x0 | x_t)`` ``(B, v, *leaf_shape)``; ``alpha`` is passed
            as a ``(B,)`` float32 tensor.
        x0: clean tokens ``(B, *leaf_shape)``.
        process: the forward process (its ``add_noise`` draws from ``generator``).
        schedule: maps ``t`` to ``alpha`` (:func:`hdiff.noise.get_schedule`).
        t_min: lower end of ``t``.
        elbo: masking only: weight masked cross-entropies by the MDLM weight (see module doc).
        generator: the only RNG used (time and noise), on ``x0``'s device.
        oracle: a soft target: the exact denoiser of the GHM (:class:`~hdiff.denoisers.BPDenoiser`)
            or of the training set (:class:`~hdiff.denoisers.EmpiricalDenoiser`). When given, the target of
            each leaf is the oracle's posterior ``p(x0_i | x_t)`` instead of the clean token (the
            Rao-Blackwellised loss: the soft cross-entropy ``-sum_b p_b log q_b``, whose expectation
            is the same up to the oracle's entropy, and whose minimiser is the same, with no label
            noise). Used to split a learned model's gap (docs/experiments.md, "Diagnostics").
        stratified: draw the batch's noise levels with the low-discrepancy sampler (:func:`sample_t`).

    Returns:
        A scalar, in nats per leaf (per masked leaf for unweighted masking).
    """
    t = sample_t(x0.shape[0], t_min, generator=generator, device=x0.device, stratified=stratified)
    schedule = get_schedule(schedule)
    alpha = schedule.alpha(t)
    x_t = process.add_noise(x0, alpha, generator=generator)
    log_probs = model(x_t, alpha)
    if oracle is not None:
        with torch.no_grad():
            target = oracle(x_t, alpha).float().exp()  # (B, v, *leaf_shape)
        # 0 * log q = 0 where the oracle rules a token out (the model may put -inf there too)
        nll = -torch.where(target > 0, target * log_probs.float(), 0.0).sum(1)
    else:  # a gather, not F.nll_loss: any leaf shape, and no contiguity demands on the model's output
        nll = -log_probs.float().gather(1, x0.unsqueeze(1)).squeeze(1)  # (B, *leaf_shape)
    return process.reduce_loss(nll, x_t, t, schedule, elbo=elbo)


@torch.no_grad()
def evaluation_loss(model: torch.nn.Module, tokens: torch.Tensor, process: NoiseProcess, *, schedule: str | Schedule,
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
