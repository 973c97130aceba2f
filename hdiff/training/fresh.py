"""Unlimited data: a fresh batch from the GHM at every step (``[data] fresh = true``, "n = inf").

Training on fresh samples for the same number of steps as a fixed-set run separates what a finite
training set costs (estimation) from what the model and the optimiser cannot reach at that budget
anyway (docs/experiments.md, "Diagnostics"). The stream is a pure function of ``(seed, batch index)``,
so an interrupted run resumes bit-identically and several processes draw disjoint batches, as with
:class:`~hdiff.training.data.StepBatchSampler` on a fixed set.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Dataset, Sampler

from hdiff.ghm import GHM
from hdiff.training.data import stream_seed

_FRESH_STREAM = 2024


class FreshGHMDataset(Dataset):
    """An endless dataset: the batch starting at global sample index ``i`` is drawn with seed ``(seed, i)``.

    ``DataLoader`` fetches a whole batch through :meth:`__getitems__` (one vectorised
    ``ghm.sample`` call), never one sample at a time.

    Args:
        ghm: the model to sample.
        seed: the stream's seed (disjoint from the fixed training and held-out streams).
    """

    def __init__(self, ghm: GHM, seed: int) -> None:
        self.ghm, self.seed = ghm, seed

    def __len__(self) -> int:
        return 2**62  # endless; the batch sampler decides how many are drawn

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> torch.Tensor:
        """``(len(indices), *leaf_shape)`` tokens, a function of ``indices[0]`` and the batch size only."""
        gen = torch.Generator().manual_seed(stream_seed(self.seed, _FRESH_STREAM + int(indices[0])))
        return self.ghm.sample(len(indices), generator=gen)


class FreshBatchSampler(Sampler[list[int]]):
    """Batches of consecutive global sample indices: batch ``k`` is ``[k B, (k + 1) B)``.

    Args:
        batch_size: ``B``.
        start: the first batch index (a resumed run starts where it stopped).
        count: how many batches to yield.
    """

    def __init__(self, batch_size: int, *, start: int = 0, count: int) -> None:
        self.batch_size, self.start, self.count = batch_size, start, count

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[list[int]]:
        b = self.batch_size
        for k in range(self.start, self.start + self.count):
            yield list(range(k * b, (k + 1) * b))


def stack_collate(batch: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
    """The collate of a fresh batch: it already is one tensor."""
    return batch if isinstance(batch, torch.Tensor) else torch.stack(batch)
