"""The ConvNet root classifier: the tree U-Net's encoder alone (Mei 2024, "U-Nets as belief propagation").

Mei shows that a ConvNet whose pooling follows the tree implements the Bayes classifier of the
root symbol: its layers compute the upward BP messages, and the root belief
``b_0(a) = h_0(a) + log prior(a)`` is a softmax away from ``p(root = a | x)``
(docs/bp.md). :class:`RootClassifier` is that ConvNet, built from
the same blocks as :class:`~hdiff.models.TreeUNet`'s encoder, reading clean leaves.
"""

from __future__ import annotations

from typing import Sequence

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from hdiff.denoisers.learned import channels_per_level, check_int, check_tree
from hdiff.models.tree_unet import ResBlock, TreeEncoder, TreeOrder
from hdiff.ghm.layout import level_shape


class RootClassifier(ModelMixin, ConfigMixin):
    """Predict the root symbol of a GHM from its clean leaves.

    ``model(x) -> logits`` ``(B, num_classes)`` for tokens ``x`` ``(B, *leaf_shape)`` in
    ``[0, vocab_size)``; train with ``cross_entropy(model(x), root)``.

    Args:
        vocab_size: ``v``.
        num_classes: root symbols.
        branching: ``s`` (4 for images).
        depth: ``L`` (>= 1).
        layout: ``"sequence"`` or ``"image"``.
        channels: one width for every level, or ``depth + 1`` widths from the leaves to the root.
        dropout: in every residual block.

    Raises:
        ValueError: naming the field for an invalid config.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(self, vocab_size: int = 8, num_classes: int = 8, branching: int = 2, depth: int = 4,
                 layout: str = "sequence", channels: int | Sequence[int] = 64, dropout: float = 0.0) -> None:
        super().__init__()
        check_int(vocab_size, "vocab_size", 2)
        check_int(num_classes, "num_classes", 1)
        check_tree(branching, depth, layout)
        widths = channels_per_level(channels, depth)
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout!r}")
        self.order = TreeOrder(layout, depth)
        self.embed = nn.Embedding(vocab_size, widths[0])
        self.encoder = TreeEncoder(widths, branching, dropout, film=False)
        self.root = ResBlock(widths[-1], widths[-1], dropout, film=False)
        self.head_norm = nn.LayerNorm(widths[-1])
        self.head = nn.Linear(widths[-1], num_classes)

    @property
    def leaf_shape(self) -> tuple[int, ...]:
        """``(s**L,)`` for sequences, ``(2**L, 2**L)`` for images."""
        c = self.config
        return level_shape(c.layout, c.branching, c.depth)

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``x`` is integer tokens ``(B, *leaf_shape)`` in ``[0, vocab_size)``."""
        if not isinstance(x, torch.Tensor) or x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
            raise ValueError("x must be an integer tensor of tokens")
        if x.ndim != 1 + len(self.leaf_shape) or tuple(x.shape[1:]) != self.leaf_shape:
            raise ValueError(f"x must have shape (B, *{self.leaf_shape}), got {tuple(x.shape)}")
        v = self.config.vocab_size
        if x.numel() and (int(x.min()) < 0 or int(x.max()) >= v):
            raise ValueError(f"x: tokens must lie in [0, {v}), got range [{int(x.min())}, {int(x.max())}]")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Root logits ``(B, num_classes)`` (unnormalised; ``log_softmax`` gives the root posterior estimate)."""
        self.check_input(x)
        h, _ = self.encoder(self.embed(self.order.to_tree(x.long())))
        h = self.root(h)  # (B, 1, C_root)
        return self.head(nn.functional.silu(self.head_norm(h[:, 0])))
