"""GHMDataset (fixed, nested, disjoint held-out) and the resumable batch order."""

from __future__ import annotations

import pytest
import torch

from hdiff.ghm import GHM
from hdiff.training import GHMDataset, StepBatchSampler


@pytest.fixture(scope="module")
def ghm() -> GHM:
    return GHM.random_hierarchy(8, 2, 2, 3, seed=0)  # 1024 distinct strings of 8 leaves


def test_sizes_determinism_and_nesting(ghm: GHM) -> None:
    train, heldout = GHMDataset.split(ghm, 300, 100, seed=3)
    assert train.tokens.shape == (300, 8) and heldout.tokens.shape == (100, 8) and len(train) == 300
    assert torch.equal(train.tokens, GHMDataset(ghm, 300, seed=3).tokens)
    assert not torch.equal(train.tokens, GHMDataset(ghm, 300, seed=4).tokens)
    # the training set of n is the prefix of that of any larger n: one seed gives one nested family
    assert torch.equal(GHMDataset(ghm, 5000, seed=3).tokens[:300], train.tokens)
    assert torch.isfinite(ghm.log_prob(train.tokens)).all()


def test_heldout_is_disjoint_from_train(ghm: GHM) -> None:
    train, heldout = GHMDataset.split(ghm, 800, 400, seed=0)
    assert not train.contains(heldout.tokens).any()
    assert train.contains(train.tokens[:10]).all()
    again = GHMDataset.split(ghm, 800, 400, seed=0)[1]
    assert torch.equal(again.tokens, heldout.tokens)


def test_heldout_impossible_when_train_covers_the_support() -> None:
    tiny = GHM.random_hierarchy(2, 2, 2, 1, seed=0)  # 4 distinct strings
    with pytest.raises(ValueError, match="too few distinct samples"):
        GHMDataset.split(tiny, 2000, 10, seed=0)
    with pytest.raises(ValueError, match="n must be"):
        GHMDataset(tiny, 0, seed=0)


def test_batch_order_epochs_and_resume() -> None:
    full = list(StepBatchSampler(10, 3, seed=1, count=9))
    assert all(len(b) == 3 for b in full)
    for epoch in range(3):  # 3 batches per epoch, each index at most once; the leftover one waits
        seen = sum(full[3 * epoch:3 * epoch + 3], [])
        assert len(set(seen)) == 9
    assert full[:3] != full[3:6]  # a new permutation each epoch
    # a sampler started at batch k yields exactly what the uninterrupted one yields from k on
    assert list(StepBatchSampler(10, 3, seed=1, start=4, count=5)) == full[4:]
    assert len(StepBatchSampler(10, 3, seed=1, start=4, count=5)) == 5
