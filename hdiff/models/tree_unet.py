"""The tree U-Net: a U-Net whose pooling follows the GHM's tree (Mei 2024, "U-Nets as belief propagation").

Mei's construction (docs/bp.md, docs/bp_unet.md): the encoder computes the upward
messages level by level (each node's log-evidence ``h`` from its children's messages ``q``,
i.e. a pooling over exactly the node's ``s`` children), the root block forms the root belief,
the decoder sends the downward messages (up-sampling a parent's belief to its ``s`` children),
and the long skip connections carry each level's ``(h, q)`` that the cavity update needs. So:

- one encoder level per tree level: a position-wise residual block (acting on each node alone,
  conditioned on the noise level by FiLM), then pooling over each node's children, a conv with
  kernel = stride = ``s`` (2x2 stride 2 for images);
- a root bottleneck (a residual block on the single root node);
- a decoder level per tree level: a transposed conv with kernel = stride = ``s``, concatenation
  of the same level's encoder activation (long skip), a residual block;
- a position-wise logit head.

Implementation (why it is fast on CPU): every level is kept channels-last in *tree order*
(``(B, N_l, C)``, node ``i``'s children at ``s*i + j``, :mod:`hdiff.ghm.layout`). Then a
kernel-1 conv is one ``nn.Linear`` on ``(B*N, C)``, the pooling conv (kernel = stride = ``s``) is a
reshape ``(B, N, C) -> (B, N/s, s*C)`` plus one ``nn.Linear(s*C, C')``, and the transposed conv
is ``nn.Linear(C', s*C)`` plus a reshape: mathematically the Conv1d / Conv2d(2x2, stride 2) /
ConvTranspose of the design (the latter with a bias per kernel tap), as single GEMMs with no
im2col or layout conversions (tests/models/test_tree_unet.py checks the equivalence). Images are
permuted to tree order (Morton order, which makes a node's 2x2 block contiguous) once at the
input and back once at the output. LayerNorm normalises each node over its channels, so every
block is position-wise as in Mei's construction (no statistics shared across positions).
"""

from __future__ import annotations

from typing import Sequence

import torch
from diffusers.configuration_utils import register_to_config
from torch import nn
from torch.nn import functional as F

from hdiff.denoisers.learned import LearnedDenoiser, channels_per_level, check_int, check_tree, fourier_features
from hdiff.ghm.layout import to_tree_order


class ResBlock(nn.Module):
    """Position-wise residual block: ``r + Linear(Dropout(SiLU(Linear(FiLM(LayerNorm(x))))))``.

    The adaLN-style MLP of DiT (FiLM on the normalised input); one SiLU per block, since on CPU a
    transcendental activation costs as much as a small GEMM.

    Args:
        c_in, c_out: channels in and out.
        dropout: dropout probability before the second linear layer.
        mlp_ratio: the MLP's hidden width as a multiple of ``c_out`` (at least one unit).
        film: whether ``forward`` takes a per-sample scale/shift (then LayerNorm has no affine of its own).
        shortcut: False when every call passes ``residual`` (no projection of ``x`` is built).

    Shapes: ``x`` ``(B, N, c_in)``, ``film`` ``(B, 1, 2*c_in)``, ``residual`` ``(B, N, c_out)``
    -> ``(B, N, c_out)``. The residual ``r`` is ``residual`` when given (the decoder passes its
    up-sampled stream, which saves a ``2C x C`` shortcut GEMM per position), else ``x`` itself
    (``c_in == c_out``) or a bias-free linear projection of it.
    """

    def __init__(self, c_in: int, c_out: int, dropout: float = 0.0, film: bool = True, shortcut: bool = True,
                 mlp_ratio: float = 1.0) -> None:
        super().__init__()
        hidden = max(1, round(mlp_ratio * c_out))
        self.norm = nn.LayerNorm(c_in, elementwise_affine=not film)
        self.fc1 = nn.Linear(c_in, hidden)
        self.fc2 = nn.Linear(hidden, c_out)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.skip = (nn.Linear(c_in, c_out, bias=False) if c_in != c_out else nn.Identity()) if shortcut else None
        nn.init.zeros_(self.fc2.weight)  # each block starts as (a projection of) the identity
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor, film: torch.Tensor | None = None,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        """Applies the block to every node independently.

        Args:
            x: ``(B, N, c_in)`` node features.
            film: ``(B, 1, 2*c_in)`` per-sample FiLM scale and shift (noise conditioning), or None.
            residual: ``(B, N, c_out)`` stream to add the block's output to, or None to use ``x``
                (or its projection).

        Returns:
            ``(B, N, c_out)``: ``residual + Linear(Dropout(SiLU(Linear(FiLM(LayerNorm(x))))))``.
        """
        h = self.norm(x)
        if film is not None:
            scale, shift = film.chunk(2, dim=-1)
            h = torch.addcmul(shift, h, 1 + scale)
        h = self.fc2(self.drop(F.silu(self.fc1(h))))
        return (self.skip(x) if residual is None else residual) + h


class TreeEncoder(nn.Module):
    """The upward pass: per level a residual block then pooling over each node's ``s`` children.

    Args:
        widths: ``depth + 1`` channel counts, leaves first.
        branching: ``s``.
        dropout: residual-block dropout.
        film: whether the blocks take FiLM parameters (noise conditioning).
        mlp_ratio: hidden width of each block's MLP over its channels.

    ``forward(h, films)``: ``h`` ``(B, s**L, widths[0])`` in tree order, ``films`` one
    ``(B, 1, 2*widths[i])`` per level or None -> the root ``(B, 1, widths[-1])`` and the
    activations before each pooling (the long skips), leaves first.
    """

    def __init__(self, widths: Sequence[int], branching: int, dropout: float = 0.0, film: bool = True,
                 mlp_ratio: float = 1.0) -> None:
        super().__init__()
        self.branching = branching
        depth = len(widths) - 1
        self.blocks = nn.ModuleList(ResBlock(widths[i], widths[i], dropout, film, mlp_ratio=mlp_ratio)
                                    for i in range(depth))
        # Conv with kernel = stride = s over tree order == Linear over each node's concatenated children.
        self.pools = nn.ModuleList(nn.Linear(branching * widths[i], widths[i + 1]) for i in range(depth))

    def film_sizes(self) -> list[int]:
        """FiLM parameters each block takes (``2 * c_in``)."""
        return [2 * b.fc1.in_features for b in self.blocks]

    def forward(self, h: torch.Tensor, films: Sequence[torch.Tensor] | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Runs the upward pass from the leaves to the root.

        Args:
            h: ``(B, s**L, widths[0])`` leaf features in tree order.
            films: one ``(B, 1, 2*widths[i])`` FiLM tensor per level (leaves first), or None.

        Returns:
            The root features ``(B, 1, widths[-1])`` and the ``depth`` activations before each
            pooling, leaves first (level ``i``: ``(B, s**(L-i), widths[i])``), for the long skips.
        """
        skips = []
        for i, (block, pool) in enumerate(zip(self.blocks, self.pools)):
            h = block(h, None if films is None else films[i])
            skips.append(h)
            b, n, c = h.shape
            h = pool(h.reshape(b, n // self.branching, self.branching * c))
        return h, skips


class TreeOrder(nn.Module):
    """Permutes leaves between the GHM layout and tree order (identity for sequences).

    ``to_tree(x)``: ``(B, *leaf_shape, ...)`` -> ``(B, N, ...)``; ``from_tree(x)``: the inverse.
    """

    def __init__(self, layout: str, depth: int) -> None:
        super().__init__()
        self.image = layout == "image"
        if self.image:
            side = 2**depth
            perm = to_tree_order(torch.arange(side * side).view(1, side, side), layout, depth)[0]
            self.register_buffer("perm", perm, persistent=False)  # perm[tree index] = flat index
            self.register_buffer("inverse", torch.argsort(perm), persistent=False)

    def to_tree(self, x: torch.Tensor) -> torch.Tensor:
        """Layout to tree order: ``(B, *leaf_shape, ...)`` -> ``(B, N, ...)`` (Morton order for images)."""
        return x.flatten(1, 2).index_select(1, self.perm) if self.image else x

    def from_tree(self, x: torch.Tensor) -> torch.Tensor:
        """Tree order to layout, the inverse of :meth:`to_tree`: ``(B, N, ...)`` -> ``(B, *leaf_shape, ...)``."""
        if not self.image:
            return x
        side = int(round(x.shape[1] ** 0.5))
        return x.index_select(1, self.inverse).unflatten(1, (side, side))


class TreeUNet(LearnedDenoiser):
    """The U-Net aligned with the tree (Mei 2024), as a :class:`~hdiff.denoisers.Denoiser`.

    ``model(x_t, alpha) -> log p(x0_i = b | x_t)`` ``(B, v, *leaf_shape)``.

    Args:
        vocab_size: ``v``.
        process: ``"gaussian"``, ``"masking"`` or ``"uniform"``: which states ``x_t`` it reads
            (discrete: tokens ``(B, *leaf_shape)``, embedded by ``nn.Embedding(v + 1, C)``, row
            ``v`` = MASK; Gaussian: ``(B, v, *leaf_shape)`` floats, a 1x1 conv from ``k = v`` channels).
        branching: ``s``, children per node (4 for images).
        depth: ``L``, levels below the root (>= 1).
        layout: ``"sequence"`` (leaves ``(s**L,)``) or ``"image"`` (``(2**L, 2**L)``).
        channels: one width for every level, or ``depth + 1`` widths from the leaves to the root.
        noise_embedding_dim: Fourier features of the noise level and the width of the MLP that
            maps them to every block's FiLM scale and shift.
        dropout: in every residual block.
        mlp_ratio: hidden width of every residual block's MLP as a multiple of its channels
            (1 = as wide as the block; transformers use 4).
        noise_conditioning: False drops the noise-level input (no FiLM; LayerNorm gets its own
            affine). Right for masking noise, where ``p(x0 | x_t)`` does not depend on ``alpha``
            (the visible leaves are the whole evidence, MDLM, Sahoo et al. 2024); the other
            processes need it and refuse False.

    Raises:
        ValueError: naming the field for an invalid config.
    """

    @register_to_config
    def __init__(self, vocab_size: int = 8, process: str = "masking", branching: int = 2, depth: int = 4,
                 layout: str = "sequence", channels: int | Sequence[int] = 64, noise_embedding_dim: int = 64,
                 dropout: float = 0.0, mlp_ratio: float = 1.0, noise_conditioning: bool = True) -> None:
        super().__init__()
        self._init_process(process, vocab_size)
        if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, (int, float)) or not 0 < mlp_ratio <= 16:
            raise ValueError(f"mlp_ratio must be a number in (0, 16], got {mlp_ratio!r}")
        if not isinstance(noise_conditioning, bool):
            raise TypeError(f"noise_conditioning must be a bool, got {noise_conditioning!r}")
        if not noise_conditioning and self.process.posterior_needs_alpha:
            raise ValueError(f"noise_conditioning = false needs masking noise: the posterior under {process!r} "
                             "noise depends on the noise level")
        check_tree(branching, depth, layout)
        widths = channels_per_level(channels, depth)
        check_int(noise_embedding_dim, "noise_embedding_dim", 2)
        if noise_embedding_dim % 2:
            raise ValueError(f"noise_embedding_dim must be even, got {noise_embedding_dim}")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout!r}")
        self.order = TreeOrder(layout, depth)
        if self.process.discrete:
            self.embed = nn.Embedding(vocab_size + 1, widths[0])  # + 1: MASK (unused by uniform noise)
        else:
            self.embed = nn.Linear(self.process.embedding_dim, widths[0])  # the 1x1 conv from k channels
        film = noise_conditioning
        self.encoder = TreeEncoder(widths, branching, dropout, film, mlp_ratio)
        self.root = ResBlock(widths[-1], widths[-1], dropout, film, mlp_ratio=mlp_ratio)
        # Transposed conv with kernel = stride = s: each parent's features to its s children.
        self.ups = nn.ModuleList(nn.Linear(widths[i + 1], branching * widths[i]) for i in reversed(range(depth)))
        self.decoder = nn.ModuleList(ResBlock(2 * widths[i], widths[i], dropout, film, shortcut=False, mlp_ratio=mlp_ratio)
                                     for i in reversed(range(depth)))
        self.head_norm = nn.LayerNorm(widths[0])
        self.head = nn.Linear(widths[0], vocab_size)
        e = noise_embedding_dim
        if not film:
            return
        self.noise_mlp = nn.Sequential(nn.Linear(e, e), nn.SiLU(), nn.Linear(e, e), nn.SiLU())
        self._film_sizes = [*self.encoder.film_sizes(), 2 * widths[-1], *(2 * b.fc1.in_features for b in self.decoder)]
        # One linear layer for every block's FiLM: one GEMM instead of 2L + 1 small ones.
        self.film = nn.Linear(e, sum(self._film_sizes))
        nn.init.zeros_(self.film.weight)  # start unconditioned (scale 1, shift 0)
        nn.init.zeros_(self.film.bias)

    def _films(self, u: torch.Tensor) -> list[torch.Tensor] | list[None]:
        if not self.config.noise_conditioning:
            return [None] * (2 * self.config.depth + 1)
        e = self.noise_mlp(fourier_features(u, self.config.noise_embedding_dim))
        return [f.unsqueeze(1) for f in self.film(e).split(self._film_sizes, dim=-1)]

    def _embed(self, x_t: torch.Tensor) -> torch.Tensor:
        """``x_t`` -> leaf features ``(B, N, C_0)`` in tree order."""
        if self.process.discrete:
            return self.embed(self.order.to_tree(x_t.long()))
        return self.embed(self.order.to_tree(x_t.movedim(1, -1)))

    def logits(self, x_t: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Leaf logits ``(B, v, *leaf_shape)`` (see :meth:`LearnedDenoiser.forward`)."""
        return self._run(x_t, u, None)

    def _run(self, x_t: torch.Tensor, u: torch.Tensor, features: dict | None) -> torch.Tensor:
        films = self._films(u)
        depth = self.config.depth
        h, skips = self.encoder(self._embed(x_t), films[:depth])
        if features is not None:  # encoder level l < L: the block output there (after pooling from below)
            features["encoder"] = [h, *skips[:0:-1]]
        h = self.root(h, films[depth])
        decoded = [h]
        s = self.config.branching
        for j, (up, block) in enumerate(zip(self.ups, self.decoder)):
            b, n, _ = h.shape
            skip = skips[depth - 1 - j]
            h = up(h).reshape(b, n * s, skip.shape[-1])
            h = block(torch.cat([h, skip], dim=-1), films[depth + 1 + j], residual=h)
            decoded.append(h)
        if features is not None:
            features["decoder"] = decoded
        out = self.head(F.silu(self.head_norm(h)))  # (B, N, v)
        return self.order.from_tree(out).movedim(-1, 1)

    @torch.no_grad()
    def tree_features(self, x_t: torch.Tensor, alpha) -> dict[str, list[torch.Tensor]]:
        """Every level's activations, for probing them against BP's messages (Mei 2024).

        Args:
            x_t: a state of :attr:`process` (as :meth:`forward`).
            alpha: the signal level, a float or ``(B,)``.

        Returns:
            ``{"encoder": [...], "decoder": [...]}``, each root first and in tree order: encoder
            level ``l`` (``l = 0 .. L-1``) is ``(B, s**l, C_l)``, what the encoder holds about the
            subtree below each node (the root: the pooled input of the bottleneck); decoder level
            ``l`` (``l = 0 .. L``) is ``(B, s**l, C_l)``, the decoder's state there (the root: the
            bottleneck's output), which sees the whole input.
        """
        self.check_input(x_t)
        u = self.signal_level(alpha, x_t.shape[0], x_t.device)
        features: dict[str, list[torch.Tensor]] = {}
        self._run(x_t, u, features)
        return features
