"""Exact reverse steps for uniform-noise discrete diffusion, in diffusers style.

Forward: ``q(x_t = c | x0 = a) = alpha_t 1[c = a] + (1 - alpha_t) / v`` (keep with probability
``alpha_t``, else redraw uniformly). From ``s`` to ``t > s`` the chain keeps with ``r = alpha_t / alpha_s``:
``q(x_t | x_s = c) = r 1[x_t = c] + (1 - r) / v``. The exact reverse kernel given a distribution over x0 is

    p(x_s = c | x_t) = sum_a p(a | x_t) q(x_s = c | x_t, a)
                     = sum_a p(a | x_t) q(x_t | x_s = c) q(x_s = c | a) / q(x_t | a)        (Bayes)

(docs/schedulers.md). D3PM's x0-parametrisation (Austin et al. 2021,
"Structured Denoising Diffusion Models in Discrete State-Spaces") instead uses
``∝ sum_a p(a | x_t) q(x_t | x_s = c) q(x_s = c | a)``, without dividing by ``q(x_t | a)``: it
counts the evidence of ``x_t`` twice (the denoiser's posterior already contains it) and so
over-weights the observed token. Here the division is kept, so the step is exact.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import register_to_config

from hdiff.schedulers._discrete_base import DiscreteSchedulerBase, DiscreteSchedulerOutput, sample_categorical
from hdiff.tokens import check_tokens


class UniformDiffusionScheduler(DiscreteSchedulerBase):
    """Uniform-noise scheduler whose reverse step is the exact posterior averaged over ``p(x0 | x_t)``.

    Args:
        num_train_timesteps: ``T >= 2``; train timestep ``t`` has keep probability ``alphas_cumprod[t]``.
        schedule: a :func:`hdiff.noise.get_schedule` name (``"linear"``: ``alpha = 1 - tau``; ``"cosine"``,
            ``"cosine_squared"``, ``"cosine_squared_shifted"``),
            ``tau = (t + 1) / T``.
    """

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, schedule: str = "linear") -> None:
        self._setup(num_train_timesteps, schedule)

    def reverse_probs(self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """The exact reverse kernel ``p(x_s = c | x_t) = sum_a p(a | x_t) q(x_s = c | x_t, a)`` per leaf.

        Computed in ``O(v)`` per leaf: with ``w_a = p(a | x_t) / q(x_t | a)``,
        ``sum_a w_a q(c | a) = alpha_s w_c + (1 - alpha_s) / v * sum_a w_a``, times ``q(x_t | x_s = c)``,
        then normalised (Bayes makes the sum one already; normalising only removes rounding).

        Args:
            model_output: ``(B, v, *leaf_shape)`` float ``log p(x0_i = a | x_t)`` (normalised here by
                ``log_softmax``; ``-inf`` allowed). For a given ``x0``, the log of its one-hot.
            timestep: the current ``t``, one of ``self.timesteps``; ``s = previous_timestep(t)``.
            sample: ``(B, *leaf_shape)`` long ``x_t`` in ``[0, v)``.

        Returns:
            ``(B, v, *leaf_shape)`` float64 probabilities of ``x_s`` (``p(x0 | x_t)`` itself on the last step).
        """
        t = self._timestep_int(timestep)
        v = self._check_model_output(model_output, sample)
        check_tokens(sample, "sample", v)
        p = self._log_posterior(model_output).exp()
        return self._kernel(p, self.alpha_at(t), self.alpha_at(self.previous_timestep(t)), sample)

    @staticmethod
    def _kernel(p: torch.Tensor, alpha_t: float, alpha_s: float, sample: torch.Tensor) -> torch.Tensor:
        v = p.shape[1]
        observed = torch.nn.functional.one_hot(sample.to(p.device), v).movedim(-1, 1).to(torch.float64)
        lik_t = alpha_t * observed + (1.0 - alpha_t) / v  # q(x_t | x0 = a) > 0 since alpha_t < 1
        w = p / lik_t
        mix = alpha_s * w + (1.0 - alpha_s) / v * w.sum(dim=1, keepdim=True)  # sum_a w_a q(x_s = c | a)
        r = alpha_t / alpha_s  # alpha_s > alpha_t >= 0
        out = mix * (r * observed + (1.0 - r) / v)  # times q(x_t | x_s = c)
        return out / out.sum(dim=1, keepdim=True)

    def step(self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor, *,
             generator: torch.Generator | None = None, x0: torch.Tensor | None = None,
             return_dict: bool = True) -> DiscreteSchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """One reverse step ``x_t -> x_s``, exact per leaf.

        Draws ``x0_i ~ p(x0_i | x_t)`` per leaf from ``model_output`` (or takes the given jointly sampled
        ``x0``), then ``x_s,i ~ q(x_s,i | x_t,i, x0_i)``. Marginalising the draw, each leaf follows
        :meth:`reverse_probs` exactly; drawing ``x0`` first makes ``pred_original_sample`` the ``x0``
        the step used. On the last step (``alpha_s = 1``) ``x_s = x0``.

        Args:
            model_output: ``(B, v, *leaf_shape)`` float ``log p(x0_i = b | x_t)`` (``-inf`` allowed).
            timestep: the current ``t``, one of ``self.timesteps``.
            sample: ``(B, *leaf_shape)`` long ``x_t`` in ``[0, v)``.
            generator: the only RNG used.
            x0: optional ``(B, *leaf_shape)`` long clean tokens in ``[0, v)`` to condition on.
            return_dict: return a :class:`DiscreteSchedulerOutput` (else a tuple).

        Returns:
            ``prev_sample`` ``x_s`` and ``pred_original_sample`` ``x0``, both ``(B, *leaf_shape)`` long.
        """
        t = self._timestep_int(timestep)
        v = self._check_model_output(model_output, sample)
        check_tokens(sample, "sample", v)
        if x0 is not None:
            check_tokens(x0, "x0", v, shape=tuple(sample.shape))
            x0 = x0.to(sample.device)
        else:
            x0 = sample_categorical(self._log_posterior(model_output), generator=generator)
        point = torch.nn.functional.one_hot(x0, v).movedim(-1, 1).to(torch.float64)
        probs = self._kernel(point, self.alpha_at(t), self.alpha_at(self.previous_timestep(t)), sample)
        prev = sample_categorical(probs.log(), generator=generator)
        if not return_dict:
            return prev, x0
        return DiscreteSchedulerOutput(prev_sample=prev, pred_original_sample=x0)
