"""A stand-in learned denoiser with the TreeUNet interface, small enough for CPU tests.

``forward(x_t, alpha) -> log p(x0 | x_t)`` ``(B, v, *leaf_shape)``; a diffusers ModelMixin +
ConfigMixin with ``process`` and ``leaf_shape`` properties. An MLP over all leaves at once: it
sees the whole context, so it can learn a small GHM's rules in a few hundred steps.
"""

from __future__ import annotations

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from hdiff.noise import GaussianProcess, MaskingProcess, NoiseProcess, UniformProcess

_PROCESSES = {"gaussian": GaussianProcess, "masking": MaskingProcess, "uniform": UniformProcess}


class TinyDenoiser(ModelMixin, ConfigMixin):
    """Embedding per leaf -> MLP over the flattened leaves and alpha -> per-leaf log-softmax."""

    @register_to_config
    def __init__(self, vocab_size: int, branching: int, depth: int, layout: str = "sequence",
                 process: str = "masking", channels: int = 16, hidden: int = 256) -> None:
        super().__init__()
        self.num_leaves = branching ** depth
        if process == "gaussian":
            self.embed = nn.Linear(vocab_size, channels)
        else:
            self.embed = nn.Embedding(vocab_size + (process == "masking"), channels)
        self.mlp = nn.Sequential(nn.Linear(self.num_leaves * channels + 1, hidden), nn.GELU(),
                                 nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, self.num_leaves * vocab_size))

    @property
    def process(self) -> NoiseProcess:
        """The noise process this model denoises."""
        return _PROCESSES[self.config.process](self.config.vocab_size)

    @property
    def leaf_shape(self) -> tuple[int, ...]:
        """``(s**L,)`` or ``(2**L, 2**L)``."""
        if self.config.layout == "image":
            side = 2 ** self.config.depth
            return (side, side)
        return (self.num_leaves,)

    def forward(self, x_t: torch.Tensor, alpha: float | torch.Tensor) -> torch.Tensor:
        b = x_t.shape[0]
        if self.config.process == "gaussian":
            h = self.embed(x_t.flatten(2).transpose(1, 2))  # (B, N, C)
        else:
            h = self.embed(x_t.flatten(1).long())
        a = torch.as_tensor(alpha, dtype=h.dtype, device=h.device).expand(b).reshape(b, 1)
        logits = self.mlp(torch.cat([h.flatten(1), a], dim=1)).view(b, self.num_leaves, -1)
        return logits.log_softmax(-1).transpose(1, 2).reshape(b, -1, *self.leaf_shape)
