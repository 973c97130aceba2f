"""Leaf layouts: how the nodes of one tree level are arranged in a tensor.

Internally every level is kept in *tree order*: node ``i`` at level ``l`` has children
``branching * i + j`` at level ``l + 1`` (``j`` = sibling position). That makes one BP level a
reshape ``(B, N_l * s, v) -> (B, N_l, s, v)``. User-facing tensors follow the GHM's layout:

- ``"sequence"``: level ``l`` is a 1-D row of ``s**l`` nodes, already in tree order.
- ``"image"`` (branching 4): level ``l`` is a ``(2**l, 2**l)`` grid; a node's children are its 2x2
  block, child ``j`` at row ``j // 2``, column ``j % 2``. Tree order interleaves the row and
  column bits, most significant level first (a Z-order / Morton curve).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

LAYOUTS = ("sequence", "image")


def level_shape(layout: str, branching: int, level: int) -> tuple[int, ...]:
    """Shape of the nodes at ``level`` (0 = root): ``(s**l,)`` or ``(2**l, 2**l)``."""
    if layout == "sequence":
        return (branching**level,)
    return (2**level, 2**level)


@lru_cache(maxsize=64)
def _morton_permutation(level: int) -> np.ndarray:
    """``perm[tree_index] = row * 2**level + col`` for a ``(2**level, 2**level)`` grid."""
    n = 4**level
    tree = np.arange(n)
    row = np.zeros(n, dtype=np.int64)
    col = np.zeros(n, dtype=np.int64)
    for k in range(level):  # digit k (base 4, least significant first) holds the 2x2 child index
        digit = (tree >> (2 * k)) & 3
        row |= (digit >> 1) << k
        col |= (digit & 1) << k
    return row * (2**level) + col


def _perm(level: int, device: torch.device, inverse: bool) -> torch.Tensor:
    perm = _morton_permutation(level)
    if inverse:
        perm = np.argsort(perm)
    return torch.as_tensor(perm, device=device)


def to_tree_order(x: torch.Tensor, layout: str, level: int) -> torch.Tensor:
    """``(B, *level_shape, ...)`` -> ``(B, N_l, ...)`` in tree order."""
    if layout == "sequence":
        return x
    flat = x.flatten(1, 2)
    if level == 0:
        return flat
    return flat.index_select(1, _perm(level, x.device, inverse=False))


def from_tree_order(x: torch.Tensor, layout: str, level: int) -> torch.Tensor:
    """``(B, N_l, ...)`` in tree order -> ``(B, *level_shape, ...)``."""
    if layout == "sequence":
        return x
    side = 2**level
    if level > 0:
        x = x.index_select(1, _perm(level, x.device, inverse=True))
    return x.unflatten(1, (side, side))
