"""Exact reverse steps for masked (absorbing-state) diffusion, in diffusers style.

Forward: each token is kept with probability ``alpha_t``, else replaced by ``MASK`` (token id ``v``).
Reverse (MDLM, Sahoo et al. 2024, "Simple and Effective Masked Diffusion Language Models"): for
``s < t`` (``alpha_s > alpha_t``) the exact posterior given ``x0`` is, per leaf,

    q(x_s | x_t, x0) = 1[x_s = x_t]                                          if x_t != MASK
                     = (alpha_s - alpha_t)/(1 - alpha_t) 1[x_s = x0]
                       + (1 - alpha_s)/(1 - alpha_t) 1[x_s = MASK]           if x_t == MASK,

and averaging over the denoiser's ``p(x0_i | x_t)`` replaces ``1[x_s = x0]`` by ``p(x0_i = x_s | x_t)``.
Revealing leaves independently factorises the step; it is exact only when at most one leaf is
revealed per step, hence ``unmasking="fixed"`` (docs/schedulers.md).
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import register_to_config

from hdiff.schedulers._discrete_base import DiscreteSchedulerBase, DiscreteSchedulerOutput, sample_categorical
from hdiff.tokens import check_tokens

UNMASKING = ("bernoulli", "fixed")


class MaskedDiffusionScheduler(DiscreteSchedulerBase):
    """Masked-diffusion scheduler: exact posterior reverse steps (MDLM) with Bernoulli or fixed-count unmasking.

    Args:
        num_train_timesteps: ``T >= 2``; train timestep ``t`` has keep probability ``alphas_cumprod[t]``.
        schedule: a :func:`hdiff.noise.get_schedule` name (``"linear"``: ``alpha = 1 - tau``; ``"cosine"``,
            ``"cosine_squared"``, ``"cosine_squared_shifted"``),
            ``tau = (t + 1) / T``.
        unmasking: ``"bernoulli"``: each masked leaf revealed independently with probability
            ``(alpha_s - alpha_t) / (1 - alpha_t)`` (MDLM); ``"fixed"``: per row, exactly
            ``k = #masked - round(N (1 - alpha_s))`` uniformly chosen masked leaves are revealed, so the
            number of masks tracks its expectation ``N (1 - alpha_s)`` (``N`` leaves); with ``n = N``
            steps on the linear schedule, exactly one per step.
    """

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, schedule: str = "linear", unmasking: str = "bernoulli") -> None:
        if unmasking not in UNMASKING:
            raise ValueError(f"unmasking must be one of {UNMASKING}, got {unmasking!r}")
        self._setup(num_train_timesteps, schedule)

    def reveal_probability(self, timestep: int | torch.Tensor) -> float:
        """``(alpha_s - alpha_t) / (1 - alpha_t)``: chance a masked leaf is revealed stepping from ``timestep``.

        ``s = previous_timestep(timestep)``; it is ``1`` on the last step (``alpha_s = 1``). With
        ``unmasking="bernoulli"`` it is the per-leaf reveal probability; with ``"fixed"`` the average one.
        """
        alpha_t = self.alpha_at(self._timestep_int(timestep))
        alpha_s = self.alpha_at(self.previous_timestep(timestep))
        return (alpha_s - alpha_t) / (1.0 - alpha_t)  # alpha_t < 1 for every t >= 0

    def step(self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor, *,
             generator: torch.Generator | None = None, x0: torch.Tensor | None = None,
             return_dict: bool = True) -> DiscreteSchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """One reverse step ``x_t -> x_s`` from ``q(x_s | x_t, x0)`` averaged over ``p(x0 | x_t)``.

        Unmasked leaves stay. Each masked leaf ``i`` is revealed (Bernoulli or fixed count, see the
        class) with value ``x0_i ~ p(x0_i | x_t)`` drawn per leaf from ``model_output``, or ``x0_i``
        itself when a jointly sampled ``x0`` is given. The last step (``s = -1``) reveals every leaf.

        Args:
            model_output: ``(B, v, *leaf_shape)`` float ``log p(x0_i = b | x_t)`` (normalised here by
                ``log_softmax`` over ``v``; ``-inf`` allowed; rows at unmasked leaves are not read).
            timestep: the current ``t``, one of ``self.timesteps``.
            sample: ``(B, *leaf_shape)`` long ``x_t`` in ``[0, v]`` (``v`` = MASK).
            generator: the only RNG used.
            x0: optional ``(B, *leaf_shape)`` long clean tokens in ``[0, v)`` to condition on.
            return_dict: return a :class:`DiscreteSchedulerOutput` (else a tuple).

        Returns:
            ``prev_sample`` ``x_s`` and ``pred_original_sample`` (``x_t`` at unmasked leaves, the
            ``x0`` draw or the given ``x0`` at masked ones), both ``(B, *leaf_shape)`` long.
        """
        t = self._timestep_int(timestep)
        v = self._check_model_output(model_output, sample)
        check_tokens(sample, "sample", v + 1)
        masked = sample == v
        if x0 is not None:
            check_tokens(x0, "x0", v, shape=tuple(sample.shape))
            x0 = x0.to(sample.device)
        else:
            x0 = sample_categorical(self._log_posterior(model_output, needed=masked), generator=generator)
        pred = torch.where(masked, x0, sample)  # already-revealed tokens are never changed
        if self.config.unmasking == "bernoulli":
            u = torch.rand(sample.shape, generator=generator, device=sample.device, dtype=torch.float64)
            reveal = masked & (u < self.reveal_probability(t))  # u < 1 always: the last step reveals all
        else:
            reveal = self._fixed_reveal(masked, self.alpha_at(self.previous_timestep(t)), generator)
        prev = torch.where(reveal, pred, sample)
        if not return_dict:
            return prev, pred
        return DiscreteSchedulerOutput(prev_sample=prev, pred_original_sample=pred)

    def num_to_reveal(self, masked: torch.Tensor, timestep: int | torch.Tensor) -> torch.Tensor:
        """``unmasking="fixed"``: ``k = clamp(#masked - round(N (1 - alpha_s)), 0, #masked)`` per row, ``(B,)`` long.

        Args:
            masked: ``(B, *leaf_shape)`` bool, which leaves are MASK now.
            timestep: the current ``t``; ``alpha_s`` is read at ``previous_timestep(t)``.
        """
        return self._count(masked.flatten(1), self.alpha_at(self.previous_timestep(timestep)))

    @staticmethod
    def _count(masked: torch.Tensor, alpha_s: float) -> torch.Tensor:
        n_leaves = masked.shape[1]
        target = int(n_leaves * (1.0 - alpha_s) + 0.5 + 1e-9)  # round half up; 1e-9 absorbs float error
        m = masked.sum(dim=1)
        return (m - target).clamp(min=0).minimum(m)

    def _fixed_reveal(self, masked: torch.Tensor, alpha_s: float, generator: torch.Generator | None) -> torch.Tensor:
        """Reveal ``k`` masked leaves per row, uniformly at random, vectorised.

        Random scores, unmasked leaves pushed above every masked one, then each leaf's rank in its row;
        masked leaves get ranks ``0 .. #masked-1`` in uniformly random order, and ``rank < k`` are revealed.
        """
        flat = masked.flatten(1)
        k = self._count(flat, alpha_s)
        scores = torch.rand(flat.shape, generator=generator, device=flat.device, dtype=torch.float64)
        scores = torch.where(flat, scores, 2.0)  # scores are in [0, 1): unmasked rank last
        rank = scores.argsort(dim=1).argsort(dim=1)
        return (flat & (rank < k.unsqueeze(1))).view(masked.shape)
