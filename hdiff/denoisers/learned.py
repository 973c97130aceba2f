"""The shared base of learned denoisers: the Denoiser protocol on a diffusers ``ModelMixin``.

A learned denoiser predicts the same currency as the BP oracle (docs/denoisers.md): ``model(x_t, alpha) -> log p(x0_i = b | x_t)``, shape
``(B, v, *leaf_shape)`` float32 log-probabilities. ``log_softmax`` is taken inside ``forward``, so
the output goes unchanged to :class:`~hdiff.schedulers.SchedulerModelAdapter`, every scheduler and
:class:`~hdiff.sampling.HierarchicalDiffusionPipeline`, and training is
``nll_loss(model(x_t, alpha), x0)`` (cross-entropy is the proper loss for a posterior).

Noise conditioning reads the signal level ``alpha`` itself, never a schedule index, so one
trained model serves every scheduler and every step count:

- Gaussian: the log-SNR ``log(alpha / (1 - alpha))`` clamped to ``[-LOG_SNR_MAX, LOG_SNR_MAX]``;
- masking / uniform: ``alpha`` (the keep probability).

Both are mapped to a normalised signal level ``u`` in [0, 1] (0 = pure noise, 1 = clean) by
:meth:`LearnedDenoiser.signal_level`; the nets embed ``u`` with Fourier features
(:func:`fourier_features`), diffusers' U-Nets receive it as a continuous timestep.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from diffusers import ConfigMixin, ModelMixin

from hdiff.ghm.layout import LAYOUTS, level_shape
from hdiff.noise import NoiseProcess, get_process
from hdiff.noise.base import Alpha

#: Gaussian log-SNR is clamped to +-LOG_SNR_MAX (alpha = 1 or 0 would give +-inf). The diffusers
#: linear schedule spans about [-10, 9.2]; cosine schedules reach further into the noise.
LOG_SNR_MAX = 15.0


def fourier_features(u: torch.Tensor, dim: int, max_freq: float = 1000.0) -> torch.Tensor:
    """Sinusoidal features of a signal level in [0, 1].

    Args:
        u: ``(B,)`` values in [0, 1].
        dim: even number of features.
        max_freq: the highest angular frequency; the lowest is 1, so the slowest pair is
            monotone on [0, 1] and the fastest resolves steps of about ``1 / max_freq``.

    Returns:
        ``(B, dim)`` ``[sin(f u), cos(f u)]`` for ``dim / 2`` geometric frequencies ``f``.
    """
    half = dim // 2
    freqs = torch.exp(torch.linspace(0.0, math.log(max_freq), half, device=u.device, dtype=torch.float32))
    angles = u.float().unsqueeze(-1) * freqs
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def check_int(value, name: str, low: int) -> int:
    """``value`` if it is an int >= ``low``, else ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def check_tree(branching: int, depth: int, layout: str) -> None:
    """Validate a tree shape: ``branching >= 2``, ``depth >= 1``, a known layout, image needs branching 4."""
    check_int(branching, "branching", 2)
    check_int(depth, "depth", 1)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if layout == "image" and branching != 4:
        raise ValueError(f"layout 'image' needs branching 4 (2x2 blocks), got branching {branching}")


def channels_per_level(channels: int | Sequence[int], depth: int) -> list[int]:
    """``channels`` as ``depth + 1`` widths, leaves first (index ``i`` = tree level ``depth - i``)."""
    widths = [channels] * (depth + 1) if isinstance(channels, int) and not isinstance(channels, bool) else list(channels)
    if len(widths) != depth + 1 or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in widths):
        raise ValueError(f"channels must be a positive int or {depth + 1} positive ints (leaves to root), got {channels!r}")
    return widths


class LearnedDenoiser(ModelMixin, ConfigMixin):
    """Base of the learned denoisers: config -> process and leaf shape, validation, noise level.

    Subclasses register their config (it must hold ``vocab_size`` and ``process``) and implement
    :meth:`logits` ``(x_t, u) -> (B, v, *leaf_shape)`` unnormalised; :meth:`forward` validates the
    input, computes ``u`` and returns ``log_softmax`` over dim 1 in float32.

    Attributes:
        process: the :class:`~hdiff.noise.NoiseProcess` built from ``config.process`` and
            ``config.vocab_size`` (Denoiser protocol).
        leaf_shape: the tree's leaf shape (Denoiser protocol; read by the sampler).
    """

    config_name = "config.json"

    def _init_process(self, process: str, vocab_size: int) -> None:
        check_int(vocab_size, "vocab_size", 2)
        self._process = get_process(process, vocab_size)

    @property
    def process(self) -> NoiseProcess:
        """The noise process whose states ``x_t`` this model reads."""
        return self._process

    @property
    def leaf_shape(self) -> tuple[int, ...]:
        """``(s**L,)`` for sequences, ``(2**L, 2**L)`` for images (from the config)."""
        c = self.config
        return level_shape(c.layout, c.branching, c.depth)

    @property
    def vocab_size(self) -> int:
        """``v``."""
        return self.config.vocab_size

    # ----------------------------------------------------------------- inputs
    def check_input(self, x_t: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``x_t`` is a valid state of :attr:`process` with :attr:`leaf_shape`.

        Tokens must lie in ``[0, v)``, or ``[0, v]`` with ``MASK = v`` for the masking process;
        Gaussian states must be finite floats ``(B, k, *leaf_shape)``.
        """
        p = self.process
        p.check_state(x_t, "x_t")
        if p.leaf_shape_of(x_t) != self.leaf_shape:
            raise ValueError(f"x_t has leaf shape {p.leaf_shape_of(x_t)}, this model's is {self.leaf_shape} "
                             f"(x_t must be {'(B, *leaf_shape) tokens' if p.discrete else '(B, k, *leaf_shape) floats'})")

    def signal_level(self, alpha: Alpha, batch: int, device: torch.device) -> torch.Tensor:
        """Normalised signal level ``u`` ``(B,)`` float32 in [0, 1] (0 = pure noise, 1 = clean).

        Gaussian: ``u = (clamp(log-SNR) + LOG_SNR_MAX) / (2 LOG_SNR_MAX)``; discrete: ``u = alpha``.
        ``alpha`` is validated by the process (a float or ``(B,)`` in [0, 1]).
        """
        a = self.process.alpha_tensor(alpha, batch, 1, device, torch.float32)  # float32: MPS has no float64
        if self.process.discrete:
            return a
        log_snr = (a.log() - torch.log1p(-a)).clamp(-LOG_SNR_MAX, LOG_SNR_MAX)  # +-inf at alpha = 1, 0
        return (log_snr + LOG_SNR_MAX) / (2 * LOG_SNR_MAX)

    # ---------------------------------------------------------------- forward
    def logits(self, x_t: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Unnormalised leaf logits ``(B, v, *leaf_shape)`` from a validated state and ``u`` ``(B,)``."""
        raise NotImplementedError

    def forward(self, x_t: torch.Tensor, alpha: Alpha) -> torch.Tensor:
        """``log p(x0_i = b | x_t)``.

        Args:
            x_t: tokens ``(B, *leaf_shape)`` (discrete; ``MASK = v`` for masking) or floats
                ``(B, k, *leaf_shape)`` (Gaussian).
            alpha: the signal level, a float or a ``(B,)`` tensor in [0, 1].

        Returns:
            ``(B, v, *leaf_shape)`` float32 log-probabilities (``logsumexp`` over dim 1 is 0).

        Raises:
            ValueError: wrong shape or dtype, tokens out of range (MASK included for non-masking
                processes), non-finite Gaussian states, alpha outside [0, 1] or of the wrong shape.
        """
        self.check_input(x_t)
        u = self.signal_level(alpha, x_t.shape[0], x_t.device)
        return torch.log_softmax(self.logits(x_t, u).float(), dim=1)
