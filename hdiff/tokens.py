"""The one token checker, and the exact-copy key of a token row (used by memorisation metrics)."""

from __future__ import annotations

import torch


def check_tokens(x: torch.Tensor, name: str, high: int, *, shape: tuple[int, ...] | None = None,
                 leaf_shape: tuple[int, ...] | None = None) -> None:
    """Raise ``ValueError`` unless ``x`` is an integer tensor ``(B, *leaf_shape)`` with values in ``[0, high)``.

    Args:
        x: the tensor to check.
        name: what to call it in the error (the field or argument).
        high: one past the largest allowed token (``v``, or ``v + 1`` when ``MASK = v`` is allowed).
        shape: the exact shape required, if any.
        leaf_shape: the exact leaf shape required (any batch size), if any.
    """
    if not isinstance(x, torch.Tensor) or x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor of tokens, got {type(x).__name__}"
                         + (f" of dtype {x.dtype}" if isinstance(x, torch.Tensor) else ""))
    if x.is_meta:
        raise ValueError(f"{name} is on the meta device (it has no values); move it to a real device")
    if x.ndim < 2:
        raise ValueError(f"{name} must have shape (B, *leaf_shape), got {tuple(x.shape)}")
    if shape is not None and tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")
    if leaf_shape is not None and tuple(x.shape[1:]) != tuple(leaf_shape):
        raise ValueError(f"{name} must have shape (B, *{tuple(leaf_shape)}), got {tuple(x.shape)}")
    if x.numel() and (int(x.min()) < 0 or int(x.max()) >= high):
        raise ValueError(f"{name}: tokens must lie in [0, {high}), got range [{int(x.min())}, {int(x.max())}]")


def row_keys(x: torch.Tensor) -> list[bytes]:
    """One hashable key per row of ``x`` ``(B, ...)``: its int64 bytes (for exact-copy checks)."""
    flat = x.reshape(x.shape[0], -1).to(torch.int64).cpu().numpy()
    return [row.tobytes() for row in flat]
