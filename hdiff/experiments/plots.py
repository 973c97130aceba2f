"""Pictures of GHM samples: a coloured strip per sequence, a coloured grid per image."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

from hdiff.io import atomic_write  # noqa: E402


def save_figure(fig: plt.Figure, path: str | os.PathLike, *, dpi: int = 100) -> None:
    """``tight_layout``, save to a temporary file, rename onto ``path`` (never half a PNG), close ``fig``."""
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi))
    finally:
        plt.close(fig)


def symbol_colormap(vocab_size: int) -> ListedColormap:
    """A fixed palette: symbol ``b`` always gets the same colour for a given ``vocab_size``."""
    base = plt.get_cmap("tab20" if vocab_size > 10 else "tab10")
    return ListedColormap([base(i % base.N) for i in range(vocab_size)])


def plot_tokens(tokens: torch.Tensor, vocab_size: int, path: str | os.PathLike, *, title: str = "",
                max_items: int = 16) -> None:
    """Save a picture of token samples.

    Args:
        tokens: ``(B, n)`` sequences (one coloured row each) or ``(B, H, W)`` images (a grid of tiles).
        vocab_size: palette size.
        path: output file (PNG).
        title: figure title.
        max_items: at most this many samples are drawn.
    """
    x = tokens[:max_items].detach().cpu().numpy()
    cmap = symbol_colormap(vocab_size)
    if x.ndim == 2:
        fig, ax = plt.subplots(figsize=(min(12, 2 + 0.35 * x.shape[1]), 0.6 + 0.3 * x.shape[0]))
        ax.imshow(x, cmap=cmap, vmin=-0.5, vmax=vocab_size - 0.5, aspect="auto", interpolation="nearest")
        if x.shape[1] <= 64:
            for (i, j), value in np.ndenumerate(x):
                ax.text(j, i, str(value), ha="center", va="center", fontsize=7, color="white")
        ax.set_xlabel("leaf")
        ax.set_ylabel("sample")
    else:
        cols = int(np.ceil(np.sqrt(len(x))))
        rows = int(np.ceil(len(x) / cols))
        fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.6 * rows + 0.4), squeeze=False)
        for k, ax in enumerate(axes.flat):
            ax.axis("off")
            if k < len(x):
                ax.imshow(x[k], cmap=cmap, vmin=-0.5, vmax=vocab_size - 0.5, interpolation="nearest")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
