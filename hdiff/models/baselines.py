"""Generic diffusers U-Nets behind the Denoiser protocol: the baselines for the tree U-Net.

Each wraps a diffusers model between an input projection (tokens: ``nn.Embedding(v + 1, C)``,
row ``v`` = MASK; Gaussian states: a 1x1 conv from ``k`` channels) and a 1x1-conv logit head
(SiLU, then ``C -> v``), so it reads the same ``x_t`` and returns the same
``log p(x0_i = b | x_t)`` ``(B, v, *leaf_shape)`` as :class:`~hdiff.models.TreeUNet`.

Noise conditioning: the diffusers U-Net gets a *continuous* timestep computed from the signal
level ``u`` in [0, 1] of :meth:`LearnedDenoiser.signal_level` (discrete noise: ``u = alpha``;
Gaussian: the clamped log-SNR mapped to [0, 1]), never a schedule index:
``timestep = 1000 (1 - u)`` for diffusers' sinusoidal ("positional") embeddings, which expect the
range [0, 1000]; ``timestep = 1 - u`` for the Fourier embedding of the "dance" 1-D blocks, whose
frequencies are unit-scale. For discrete noise this is ``1000 (1 - alpha)``.

Length constraints (found by running every length 1..80; a violation is a ``ValueError`` at
construction, and every forward checks the output shape because some of these U-Nets silently
return a wrong length instead of failing):

- :class:`UNet1DBaseline`, ``block_style="resnet"`` (the ResNet / temporal blocks of diffusers'
  RL configs, conditioned through an MLP): ``n`` a multiple of ``2**(len(block_out_channels) - 1)``
  (odd lengths silently come back one longer); channels multiples of 8 (GroupNorm(8)).
- :class:`UNet1DBaseline`, ``block_style="dance"`` (UNet1DModel's default blocks): ``n`` a
  multiple of 8 and >= 24; exactly 3 ``block_out_channels``. The demo GHM's 16 leaves fail.
- :class:`UNet2DBaseline`: side ``2**L`` with ``L >= len(block_out_channels) - 1``; every width
  divisible by ``norm_num_groups``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from diffusers import UNet1DModel, UNet2DModel
from diffusers.configuration_utils import register_to_config
from torch import nn
from torch.nn import functional as F

from hdiff.denoisers.learned import LearnedDenoiser, check_int, check_tree

BLOCK_STYLES = ("resnet", "dance")


def _check_widths(block_out_channels: Sequence[int], multiple: int, what: str) -> list[int]:
    widths = list(block_out_channels)
    if not widths or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in widths):
        raise ValueError(f"block_out_channels must be a non-empty list of positive ints, got {block_out_channels!r}")
    if any(c % multiple for c in widths):
        raise ValueError(f"block_out_channels {widths} must be multiples of {multiple} ({what})")
    return widths


class _ProjectedUNet(LearnedDenoiser):
    """Input projection + a diffusers U-Net + 1x1 logit head; subclasses build ``self.unet``."""

    def _build_io(self, vocab_size: int, width: int, conv: type[nn.Module]) -> None:
        if self.process.discrete:
            self.embed = nn.Embedding(vocab_size + 1, width)  # + 1: MASK
        else:
            self.embed = conv(self.process.embedding_dim, width, 1)
        self.head = conv(width, vocab_size, 1)

    def _project(self, x_t: torch.Tensor) -> torch.Tensor:
        """``x_t`` -> ``(B, C, *leaf_shape)``."""
        if self.process.discrete:
            return self.embed(x_t.long()).movedim(-1, 1)
        return self.embed(x_t.float())

    def _timestep(self, u: torch.Tensor) -> torch.Tensor:
        return 1000.0 * (1.0 - u)

    def logits(self, x_t: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Leaf logits ``(B, v, *leaf_shape)`` (see :meth:`LearnedDenoiser.forward`)."""
        h = self.unet(self._project(x_t), self._timestep(u)).sample
        out = self.head(F.silu(h))
        expected = (x_t.shape[0], self.vocab_size, *self.leaf_shape)
        if tuple(out.shape) != expected:  # diffusers' 1-D U-Net can silently change the length
            raise RuntimeError(f"{type(self.unet).__name__} returned shape {tuple(out.shape)}, expected {expected}")
        return out


class UNet1DBaseline(_ProjectedUNet):
    """diffusers ``UNet1DModel`` on sequence leaves ``(s**L,)``, as a :class:`~hdiff.denoisers.Denoiser`.

    Args:
        vocab_size: ``v``.
        process: ``"gaussian"``, ``"masking"`` or ``"uniform"``.
        branching: ``s``.
        depth: ``L``; the length is ``n = s**L``.
        block_out_channels: U-Net widths per resolution; the first is also the input projection's.
        block_style: ``"resnet"`` (DownResnetBlock1D / UpResnetBlock1D / MidResTemporalBlock1D /
            OutConv1DBlock, sinusoidal timestep + MLP) or ``"dance"`` (UNet1DModel's default blocks,
            Fourier timestep features concatenated as channels).
        layers_per_block: residual layers per block (``"resnet"`` only).

    Raises:
        ValueError: for a length or widths the chosen blocks cannot handle (module docstring).
    """

    @register_to_config
    def __init__(self, vocab_size: int = 8, process: str = "masking", branching: int = 2, depth: int = 4,
                 block_out_channels: Sequence[int] = (32, 32, 64), block_style: str = "resnet",
                 layers_per_block: int = 1) -> None:
        super().__init__()
        self._init_process(process, vocab_size)
        check_tree(branching, depth, "sequence")
        check_int(layers_per_block, "layers_per_block", 1)
        n = branching**depth
        if block_style == "resnet":
            widths = _check_widths(block_out_channels, 8, "the ResNet blocks use GroupNorm(8)")
            factor = 2 ** (len(widths) - 1)
            if n % factor:
                raise ValueError(f"UNet1DModel with {len(widths)} ResNet blocks needs a length divisible by {factor}, "
                                 f"got {n} = {branching}**{depth}; use fewer block_out_channels")
            self.unet = UNet1DModel(
                sample_size=n, in_channels=widths[0], out_channels=widths[0], block_out_channels=tuple(widths),
                down_block_types=("DownResnetBlock1D",) * len(widths), up_block_types=("UpResnetBlock1D",) * (len(widths) - 1),
                mid_block_type="MidResTemporalBlock1D", out_block_type="OutConv1DBlock", act_fn="silu",
                time_embedding_type="positional", use_timestep_embedding=True, flip_sin_to_cos=True,
                norm_num_groups=8, layers_per_block=layers_per_block)
        elif block_style == "dance":
            widths = _check_widths(block_out_channels, 8, "UNet1DModel's default blocks use GroupNorm(8)")
            if len(widths) != 3:
                raise ValueError(f"block_style 'dance' uses UNet1DModel's 3 default blocks: give 3 block_out_channels, got {widths}")
            if n % 8 or n < 24:
                raise ValueError(f"UNet1DModel's default blocks need a length that is a multiple of 8 and >= 24, "
                                 f"got {n} = {branching}**{depth}; use block_style='resnet'")
            temb = 2 * widths[0]  # Fourier features, concatenated to the input as extra channels
            self.unet = UNet1DModel(sample_size=n, in_channels=widths[0], out_channels=widths[0], extra_in_channels=temb,
                                    block_out_channels=tuple(widths), time_embedding_type="fourier",
                                    time_embedding_dim=temb, flip_sin_to_cos=True, use_timestep_embedding=False)
        else:
            raise ValueError(f"block_style must be one of {BLOCK_STYLES}, got {block_style!r}")
        self._build_io(vocab_size, widths[0], nn.Conv1d)

    @property
    def leaf_shape(self) -> tuple[int, ...]:
        """``(s**L,)``."""
        return (self.config.branching**self.config.depth,)

    def _timestep(self, u: torch.Tensor) -> torch.Tensor:
        # Fourier features with unit-scale frequencies want t in [0, 1]; sinusoids want [0, 1000].
        return 1.0 - u if self.config.block_style == "dance" else 1000.0 * (1.0 - u)


class UNet2DBaseline(_ProjectedUNet):
    """diffusers ``UNet2DModel`` on image leaves ``(2**L, 2**L)``, as a :class:`~hdiff.denoisers.Denoiser`.

    Args:
        vocab_size: ``v``.
        process: ``"gaussian"``, ``"masking"`` or ``"uniform"``.
        depth: ``L`` (branching 4); the image side is ``2**L``.
        block_out_channels: widths per resolution (DownBlock2D / UpBlock2D); the first is also
            the input projection's.
        layers_per_block: ResNet layers per block.
        norm_num_groups: GroupNorm groups; must divide every width.
        add_attention: self-attention in the mid block.
        dropout: in the ResNet layers.

    Raises:
        ValueError: for a side or widths the U-Net cannot handle (module docstring).
    """

    @register_to_config
    def __init__(self, vocab_size: int = 8, process: str = "masking", depth: int = 3,
                 block_out_channels: Sequence[int] = (32, 48), layers_per_block: int = 1, norm_num_groups: int = 8,
                 add_attention: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        self._init_process(process, vocab_size)
        check_tree(4, depth, "image")
        check_int(layers_per_block, "layers_per_block", 1)
        check_int(norm_num_groups, "norm_num_groups", 1)
        widths = _check_widths(block_out_channels, norm_num_groups, f"norm_num_groups = {norm_num_groups}")
        if depth < len(widths) - 1:
            raise ValueError(f"UNet2DModel with {len(widths)} blocks halves the side {len(widths) - 1} times: it needs "
                             f"depth >= {len(widths) - 1}, got side {2**depth} (depth {depth})")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout!r}")
        self.unet = UNet2DModel(
            sample_size=2**depth, in_channels=widths[0], out_channels=widths[0], block_out_channels=tuple(widths),
            down_block_types=("DownBlock2D",) * len(widths), up_block_types=("UpBlock2D",) * len(widths),
            layers_per_block=layers_per_block, norm_num_groups=norm_num_groups, add_attention=add_attention,
            dropout=dropout, resnet_time_scale_shift="scale_shift")  # FiLM, as in the tree U-Net
        self._build_io(vocab_size, widths[0], nn.Conv2d)

    @property
    def leaf_shape(self) -> tuple[int, ...]:
        """``(2**L, 2**L)``."""
        side = 2**self.config.depth
        return (side, side)
