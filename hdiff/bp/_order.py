"""BP's internal node order: channels first, nodes digit-reversed, batch last.

A level with ``N`` nodes and alphabet ``A`` is held as ``(A, N * B)``: row ``a`` is contiguous over
(node, batch). Nodes are stored at the base-``s`` digit reversal of their tree index, so the
``s`` children of a parent at stored position ``p`` sit at ``j * N_parent + p``: splitting a
level's rows as ``(A, s, N_parent * B)`` lines every child up with its parent's column, and the
parents' output ``(A, N_parent * B)`` is already in the next level's order. Gathers are then row
copies (``index_select`` on dim 0) and reductions run over contiguous rows, which is what makes
BP memory-bound rather than gather-bound on CPUs.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from hdiff.ghm.layout import _morton_permutation


@lru_cache(maxsize=128)
def _user_index(layout: str, branching: int, level: int) -> np.ndarray:
    """``idx[p]`` = the user-layout flat index of the node stored at internal position ``p``."""
    n = branching**level
    pos = np.arange(n)
    rev = np.zeros(n, dtype=np.int64)
    for _ in range(level):  # reverse the base-s digits of p: internal p <-> tree index rev(p)
        rev = rev * branching + pos % branching
        pos //= branching
    if layout == "sequence":
        return rev
    return _morton_permutation(level)[rev]


@lru_cache(maxsize=256)
def _rows(layout: str, branching: int, level: int, symbols: int, device: torch.device, inverse: bool) -> torch.Tensor:
    # cached: building it costs numpy work and a host-to-device copy on every call otherwise (read-only use)
    idx = _user_index(layout, branching, level)
    if inverse:
        idx = np.argsort(idx)
    a = np.arange(symbols)
    if inverse:  # user (node, symbol) rows of internal (symbol, node) rows
        rows = a[None, :] * len(idx) + idx[:, None]
    else:  # internal (symbol, node) rows of user (node, symbol) rows
        rows = idx[None, :] * symbols + a[:, None]
    return torch.as_tensor(rows.reshape(-1), device=device)


def to_internal(x: torch.Tensor, layout: str, branching: int, level: int) -> torch.Tensor:
    """User ``(B, *level_shape, A)`` -> internal ``(A, N * B)`` (contiguous).

    One transpose to ``(N * A, B)`` and one row gather: both move contiguous blocks.
    """
    B, A = x.shape[0], x.shape[-1]
    t = x.reshape(B, branching**level * A).T.contiguous()
    return t.index_select(0, _rows(layout, branching, level, A, x.device, False)).view(A, -1)


def from_internal(x: torch.Tensor, shape: tuple[int, ...], layout: str, branching: int, level: int) -> torch.Tensor:
    """Internal ``(A, N * B)`` -> user ``(B, *shape, A)`` with ``shape`` the level's node shape."""
    A = x.shape[0]
    B = x.shape[1] // branching**level
    rows = x.reshape(A * branching**level, B).index_select(0, _rows(layout, branching, level, A, x.device, True))
    return rows.T.reshape(B, *shape, A)


def tokens_from_internal(x: torch.Tensor, shape: tuple[int, ...], layout: str, branching: int, level: int) -> torch.Tensor:
    """Internal symbols ``(N * B,)`` -> user ``(B, *shape)``."""
    return from_internal(x.view(1, -1), shape, layout, branching, level).squeeze(-1)
