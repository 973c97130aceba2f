"""Fixed training sets of ``n`` GHM samples, a disjoint held-out set, and a resumable batch order.

The experiments vary ``n`` (docs/experiments.md: oracle vs learned as the training set grows), so sets are
drawn in fixed-size chunks from one seeded generator: the training set of ``n`` is the first ``n``
samples of the training set of any ``n' > n`` with the same seed (nested sets, one seed per curve).
The held-out set comes from a different stream and drops every exact copy of a training sample,
so held-out loss measures generalisation, not recall.
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from hdiff.ghm import GHM
from hdiff.tokens import row_keys

#: samples per draw from the generator; fixed so that sets of different ``n`` are nested
CHUNK = 4096
#: a held-out set gives up after this many chunks without enough unseen samples,
MAX_HELDOUT_CHUNKS = 256
#: or after this many chunks in a row that bring nothing new (the excluded set covers the support)
MAX_EMPTY_CHUNKS = 4


def stream_seed(seed: int, stream: int) -> int:
    """A 63-bit seed for sub-stream ``stream`` of ``seed`` (numpy's SeedSequence: streams don't overlap)."""
    return int(np.random.SeedSequence([seed, stream]).generate_state(2, np.uint64)[0] >> np.uint64(1))


class GHMDataset(Dataset):
    """``n`` samples of a GHM drawn with ``torch.Generator().manual_seed(seed)``, held in memory.

    Args:
        ghm: the model to sample.
        n: number of samples.
        seed: the generator seed; the set is a deterministic function of ``(ghm, n, seed)``.
        exclude: tokens ``(m, *leaf_shape)`` that must not appear (exact copies are dropped and
            replaced by further draws), e.g. the training set for a held-out set.

    Attributes:
        tokens: ``(n, *leaf_shape)`` long, on the CPU.
        seed: the seed it was drawn with.

    Raises:
        ValueError: ``n`` is not a positive int, or the GHM has too few distinct samples outside
            ``exclude`` to fill the set.
    """

    def __init__(self, ghm: GHM, n: int, *, seed: int, exclude: torch.Tensor | None = None) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        gen = torch.Generator(device=ghm.device).manual_seed(seed)
        banned = set(row_keys(exclude)) if exclude is not None and len(exclude) else set()
        kept: list[torch.Tensor] = []
        have = empty = drawn = 0
        for _ in range(math.ceil(n / CHUNK) if not banned else MAX_HELDOUT_CHUNKS):
            chunk = ghm.sample(CHUNK, generator=gen).cpu()
            drawn += CHUNK
            if banned:
                chunk = chunk[torch.tensor([k not in banned for k in row_keys(chunk)], dtype=torch.bool)]
            kept.append(chunk)
            have += len(chunk)
            empty = empty + 1 if len(chunk) == 0 else 0
            if have >= n or empty == MAX_EMPTY_CHUNKS:
                break
        if have < n:
            raise ValueError(f"could draw only {have} of {n} samples outside the {len(banned)} excluded ones "
                             f"in {drawn} draws: the GHM has too few distinct samples")
        self.tokens = torch.cat(kept)[:n].contiguous()
        self.seed = seed
        self.leaf_shape = ghm.leaf_shape

    @classmethod
    def split(cls, ghm: GHM, n_train: int, n_heldout: int, *, seed: int) -> tuple["GHMDataset", "GHMDataset"]:
        """The training set (stream ``seed`` itself) and a disjoint held-out set (a sub-stream of ``seed``)."""
        train = cls(ghm, n_train, seed=seed)
        heldout = cls(ghm, n_heldout, seed=stream_seed(seed, 1), exclude=train.tokens)
        return train, heldout

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.tokens[index]

    def __getitems__(self, indices: list[int]) -> torch.Tensor:
        # one gather per batch instead of a Python loop over samples plus a collate
        return self.tokens[torch.as_tensor(indices, dtype=torch.long)]

    def contains(self, x: torch.Tensor) -> torch.Tensor:
        """``(B,)`` bool: which rows of ``x`` ``(B, *leaf_shape)`` are exact copies of a sample in this set."""
        keys = set(row_keys(self.tokens))
        return torch.tensor([k in keys for k in row_keys(x)], dtype=torch.bool)


def identity_collate(batch: torch.Tensor) -> torch.Tensor:
    """Collate for :meth:`GHMDataset.__getitems__`, which already returns the stacked batch."""
    return batch


class StepBatchSampler(Sampler[list[int]]):
    """Batches for global batch indices ``start, start + 1, ..., start + count - 1``.

    Batch ``k`` lies in epoch ``e = k // (n // batch_size)`` whose order is
    ``randperm(n)`` from a generator seeded with ``stream_seed(seed, 2 + e)``; the ``n % batch_size``
    samples left over in an epoch wait for the next (a different permutation). The order is a pure
    function of ``(seed, k)``, so a resumed run only needs its step, never a saved sampler state, and
    under ``accelerate launch`` each process takes every ``num_processes``-th batch of the same order.

    Args:
        n: dataset size.
        batch_size: samples per batch (``<= n``).
        seed: the data-order seed.
        start: the first global batch index.
        count: how many batches to yield.
    """

    def __init__(self, n: int, batch_size: int, *, seed: int, start: int = 0, count: int) -> None:
        if not 1 <= batch_size <= n:
            raise ValueError(f"batch_size must lie in [1, n={n}], got {batch_size}")
        self.n, self.batch_size, self.seed, self.start, self.count = n, batch_size, seed, start, count
        self.drop_last = True  # read by accelerate's BatchSamplerShard
        self._epoch: tuple[int, torch.Tensor] | None = None

    def _perm(self, epoch: int) -> torch.Tensor:
        if self._epoch is None or self._epoch[0] != epoch:
            gen = torch.Generator().manual_seed(stream_seed(self.seed, 2 + epoch))
            self._epoch = (epoch, torch.randperm(self.n, generator=gen))
        return self._epoch[1]

    def batch(self, k: int) -> list[int]:
        """The indices of global batch ``k``."""
        per_epoch = self.n // self.batch_size
        epoch, pos = divmod(k, per_epoch)
        return self._perm(epoch)[pos * self.batch_size:(pos + 1) * self.batch_size].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        for k in range(self.start, self.start + self.count):
            yield self.batch(k)

    def __len__(self) -> int:
        return self.count
