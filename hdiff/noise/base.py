"""The noise-process interface shared by Gaussian, masking and uniform corruption.

A process defines, once, both the forward corruption ``add_noise(x0, alpha)`` and the leaf
likelihood ``leaf_log_likelihood(x_t, alpha) = log p(x_t,i | x0,i = b)``, shape
``(B, *leaf_shape, v)``: the evidence that BP turns into the exact posterior (DESIGN.md, "Noise
processes and the denoiser currency"). ``alpha`` in [0, 1] is the signal level (Gaussian:
``alpha_bar``; masking / uniform: probability that a token is kept), a float or one per sample.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

Alpha = float | torch.Tensor


class NoiseProcess(ABC):
    """Base class. Subclasses set :attr:`kind` and implement the two methods below.

    Attributes:
        vocab_size: ``v``, the clean alphabet.
        kind: ``"gaussian"``, ``"masking"`` or ``"uniform"``.
        discrete: True when ``x_t`` is tokens (masking, uniform), False for float states.
    """

    kind: str = ""
    discrete: bool = True

    def __init__(self, vocab_size: int) -> None:
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 2:
            raise ValueError(f"vocab_size must be an int >= 2, got {vocab_size!r}")
        self.vocab_size = vocab_size

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"

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

    def check_tokens(self, x: torch.Tensor, name: str, *, allow_mask: bool = False) -> None:
        """Raise ``ValueError`` unless ``x`` is an integer tensor with values in ``[0, v)`` (``[0, v]`` with MASK)."""
        if not isinstance(x, torch.Tensor) or x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor of tokens")
        if x.ndim < 2:
            raise ValueError(f"{name} must have shape (B, *leaf_shape), got {tuple(x.shape)}")
        high = self.vocab_size + (1 if allow_mask else 0)
        if x.numel() and (int(x.min()) < 0 or int(x.max()) >= high):
            what = f"[0, {self.vocab_size}] (v = MASK)" if allow_mask else f"[0, {self.vocab_size})"
            raise ValueError(f"{name}: tokens must lie in {what}, got range [{int(x.min())}, {int(x.max())}]")

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
