"""The noise-process interface shared by Gaussian, masking and uniform corruption.

A process defines, once, both the forward corruption ``add_noise(x0, alpha)`` and the leaf
likelihood ``leaf_log_likelihood(x_t, alpha) = log p(x_t,i | x0,i = b)``, shape
``(B, *leaf_shape, v)``: the evidence that BP turns into the exact posterior (docs/noise.md).
``alpha`` in [0, 1] is the signal level (Gaussian: ``alpha_bar``; masking / uniform: probability
that a token is kept), a float or one per sample.

Everything else that depends on the process is a method here too, so that training, metrics,
schedulers and learned models never branch on which process they hold (as the ``Graph`` classes of
SEDD, Lou et al. 2024): validation of states (:meth:`check_state`), which leaves carry a posterior
worth scoring (:meth:`informative_leaves`), the training loss reduction (:meth:`reduce_loss`), the
integrand of the likelihood bound (:meth:`bound_term`), the default schedule and the schedulers
that sample it. Processes are found by name through :func:`hdiff.noise.get_process`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable

import torch

from hdiff.noise.schedules import Schedule
from hdiff.tokens import check_tokens

Alpha = float | torch.Tensor
#: ``denoiser(x_t, alpha) -> log p(x0_i = b | x_t)`` ``(B, v, *leaf_shape)``, as the bounds call it
DenoiserFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class NoiseProcess(ABC):
    """Base class. Subclasses set the class attributes and implement the abstract methods.

    Attributes:
        vocab_size: ``v``, the clean alphabet.
        name: the registry name: ``"gaussian"``, ``"masking"`` or ``"uniform"``.
        discrete: True when ``x_t`` is tokens (masking, uniform), False for float states.
        default_schedule: the :mod:`~hdiff.noise.schedules` name used when a config says ``auto``.
        schedulers: the scheduler names (:func:`hdiff.schedulers.make_scheduler`) that sample this
            process; any other is refused up front.
        elbo_loss: whether the training loss can be ELBO-weighted (masking: MDLM).
        posterior_needs_alpha: whether ``p(x0 | x_t)`` depends on the noise level beyond ``x_t``
            itself (False for masking: the visible leaves are the whole evidence), i.e. whether a
            denoiser must be told ``alpha``.
    """

    name: str = ""
    discrete: bool = True
    default_schedule: str = "linear"
    schedulers: tuple[str, ...] = ()
    #: whether :meth:`reduce_loss` can weight the cross-entropy into the process's ELBO
    elbo_loss: bool = False
    posterior_needs_alpha: bool = True

    def __init__(self, vocab_size: int) -> None:
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 2:
            raise ValueError(f"vocab_size must be an int >= 2, got {vocab_size!r}")
        self.vocab_size = vocab_size

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.config() == other.config()

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.vocab_size))

    # ----------------------------------------------------------------- checks
    def alpha_tensor(self, alpha: Alpha, batch: int, ndim: int, device: torch.device,
                     dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """``alpha`` as a tensor broadcastable to ``(B, *rest)`` with ``ndim`` dims; validated."""
        a = torch.as_tensor(alpha, dtype=dtype, device=device)
        if a.ndim == 0:
            a = a.expand(batch)
        if a.ndim != 1 or a.shape[0] != batch:
            raise ValueError(f"alpha must be a float or a tensor of shape ({batch},), got shape {tuple(a.shape)}")
        if torch.isnan(a).any() or (a < 0).any() or (a > 1).any():
            raise ValueError(f"alpha must lie in [0, 1], got values in [{float(a.min()):.4g}, {float(a.max()):.4g}]")
        return a.view(batch, *[1] * (ndim - 1))

    def check_tokens(self, x: torch.Tensor, name: str) -> None:
        """Raise ``ValueError`` unless ``x`` is clean tokens ``(B, *leaf_shape)`` in ``[0, v)``."""
        check_tokens(x, name, self.vocab_size)

    def check_state(self, x_t: torch.Tensor, name: str = "x_t") -> None:
        """Raise ``ValueError`` unless ``x_t`` is a state of this process (discrete: tokens in ``[0, v)``)."""
        check_tokens(x_t, name, self.vocab_size)

    def config(self) -> dict[str, Any]:
        """What :func:`hdiff.noise.get_process` needs to rebuild this process (JSON-serialisable)."""
        return {"name": self.name, "vocab_size": self.vocab_size}

    def informative_leaves(self, x_t: torch.Tensor) -> torch.Tensor | None:
        """Bool ``(B, *leaf_shape)``: the leaves whose clean value is uncertain given ``x_t``; None = all.

        Losses and posterior metrics count only these (for masking, a kept leaf is known exactly).
        """
        return None

    def reduce_loss(self, nll: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, schedule: Schedule, *,
                    elbo: bool) -> torch.Tensor:
        """The training loss from per-leaf cross-entropies ``nll`` ``(B, *leaf_shape)`` at times ``t`` ``(B,)``.

        Default: the mean over every leaf. ``elbo=True`` (an ELBO-weighted loss) is defined only
        where the bound is a weighted cross-entropy (masking).
        """
        if elbo:
            raise ValueError(f"noise.elbo_weight is only defined for noise.process = 'masking', not {self.name!r}")
        return nll.mean()

    @abstractmethod
    def bound_term(self, denoiser: DenoiserFn, x0: torch.Tensor, u: torch.Tensor, schedule: Schedule, *,
                   generator: torch.Generator | None) -> torch.Tensor:
        """One Monte-Carlo draw of the NELBO on ``-log p(x0)`` in nats per sample (docs/metrics.md).

        Args:
            denoiser: the denoiser whose bound it is.
            x0: clean tokens ``(b, *leaf_shape)``.
            u: ``(b,)`` float64 in (0, 1], stratified by the caller: each draw maps it to a noise level.
            schedule: the alpha schedule (the bound's value does not depend on it, its variance does).
            generator: RNG for the noise.

        Returns:
            ``(b,)`` float64; the expectation over ``u ~ U(0, 1)`` is the bound.
        """

    # -------------------------------------------------------------- interface
    @abstractmethod
    def add_noise(self, x0: torch.Tensor, alpha: Alpha, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """Corrupt clean tokens ``x0`` ``(B, *leaf_shape)`` to signal level ``alpha``."""

    @abstractmethod
    def leaf_log_likelihood(self, x_t: torch.Tensor, alpha: Alpha) -> torch.Tensor:
        """``log p(x_t,i | x0,i = b)`` ``(B, *leaf_shape, v)`` float32 (up to a per-leaf constant)."""

    @abstractmethod
    def prior_sample(self, batch_size: int, leaf_shape: tuple[int, ...], *, generator: torch.Generator | None = None,
                     device: torch.device | str = "cpu") -> torch.Tensor:
        """A draw from the fully noised state (``alpha = 0``): where reverse diffusion starts."""

    @abstractmethod
    def leaf_shape_of(self, x_t: torch.Tensor) -> tuple[int, ...]:
        """The leaf shape of a state ``x_t``."""
