"""The training objective: the process's loss reduction and the BP oracle as its minimiser (schedules: tests/noise)."""

from __future__ import annotations

import math

import pytest
import torch

from hdiff.denoisers import BPDenoiser
from hdiff.ghm import GHM
from hdiff.noise import MaskingProcess, UniformProcess
from hdiff.training import diffusion_loss, evaluation_loss


def test_masked_loss_counts_only_masked_leaves() -> None:
    p = MaskingProcess(4)
    x0 = torch.randint(0, 4, (64, 8), generator=torch.Generator().manual_seed(0))

    def uniform_model(x_t: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        # uniform where masked, certain of the observed token where kept
        known = torch.nn.functional.one_hot(x_t.clamp(max=3), 4).movedim(-1, 1).float().log()
        return torch.where((x_t == 4).unsqueeze(1), math.log(1 / 4), known)

    loss = diffusion_loss(uniform_model, x0, p, schedule="linear", t_min=1e-3, elbo=False,
                          generator=torch.Generator().manual_seed(1))
    assert loss.item() == pytest.approx(math.log(4), rel=1e-6)


def test_oracle_elbo_is_the_entropy_per_leaf() -> None:
    """With the exact BP posterior the MDLM bound is tight: its mean is H(x) / num_leaves."""
    ghm = GHM.random_hierarchy(4, 2, 2, 2, seed=0)
    p = MaskingProcess(4)
    x = ghm.sample(4096, generator=torch.Generator().manual_seed(0))
    est = evaluation_loss(BPDenoiser(ghm, p), x, p, schedule="linear", t_min=1e-4, elbo=True,
                          batch_size=4096, seed=0, device=torch.device("cpu"))
    exact = ghm.entropy().nats / ghm.num_leaves
    assert est == pytest.approx(exact, abs=0.03)


def test_uniform_loss_is_the_mean_over_all_leaves() -> None:
    p = UniformProcess(4)
    x0 = torch.zeros(8, 4, dtype=torch.long)
    flat = lambda x_t, alpha: torch.full((x_t.shape[0], 4, *x_t.shape[1:]), math.log(1 / 4))  # noqa: E731
    loss = diffusion_loss(flat, x0, p, schedule="linear", t_min=0.0, elbo=False, generator=torch.Generator())
    assert loss.item() == pytest.approx(math.log(4))


def test_rao_blackwellised_loss_has_the_same_expectation_and_less_variance() -> None:
    """Soft targets from the oracle: E[loss] equals the cross-entropy's (both are E[H(p(x0_i | x_t))] for
    the oracle itself), and the per-batch spread is smaller (no label noise)."""
    ghm = GHM.random_hierarchy(4, 2, 2, 2, seed=0)
    p = MaskingProcess(4)
    oracle = BPDenoiser(ghm, p)
    hard, soft = [], []
    for seed in range(40):
        x = ghm.sample(256, generator=torch.Generator().manual_seed(seed))
        kw = dict(schedule="linear", t_min=1e-3, elbo=False)
        hard.append(float(diffusion_loss(oracle, x, p, generator=torch.Generator().manual_seed(100 + seed), **kw)))
        soft.append(float(diffusion_loss(oracle, x, p, generator=torch.Generator().manual_seed(100 + seed),
                                         oracle=oracle, **kw)))
    hard_t, soft_t = torch.tensor(hard), torch.tensor(soft)
    se = (hard_t.var() / 40 + soft_t.var() / 40).sqrt()
    assert abs(hard_t.mean() - soft_t.mean()) < 4 * se
    assert soft_t.std() < hard_t.std()
    flat = lambda x_t, alpha: torch.full((x_t.shape[0], 4, *x_t.shape[1:]), math.log(1 / 4))  # noqa: E731
    x = ghm.sample(64, generator=torch.Generator().manual_seed(0))
    loss = diffusion_loss(flat, x, p, schedule="linear", t_min=1e-3, elbo=False, generator=torch.Generator(), oracle=oracle)
    assert loss.item() == pytest.approx(math.log(4), rel=1e-6)
