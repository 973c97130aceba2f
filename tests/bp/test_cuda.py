"""BP on CUDA tensors equals BP on the CPU (skipped without a GPU)."""

from __future__ import annotations

import math

import pytest
import torch

from hdiff.bp import log_evidence, posterior, sample_posterior
from hdiff.ghm import GHM

from ._reference import exact_posterior, make_evidence

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

GHMS = {
    "rhm-zipf": lambda: GHM.random_hierarchy(4, 3, 2, 8, rule_probs="zipf", seed=0),
    "fac": lambda: GHM.random_factorized(3, 2, 8, seed=1),
    "img-rhm": lambda: GHM.random_hierarchy(4, 3, 4, 4, num_classes=2, layout="image", seed=2),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", list(GHMS))
def test_posterior_on_cuda_equals_cpu(name, dtype):
    ghm = GHMS[name]()
    gen = torch.Generator().manual_seed(0)
    x = ghm.sample(8, generator=gen)
    ev = (4 * torch.nn.functional.one_hot(x, ghm.vocab_size) + torch.randn(*x.shape, ghm.vocab_size, generator=gen))
    ev = ev.to(dtype)
    ev[0].view(-1, ghm.vocab_size)[:3, 0] = -math.inf  # some hard evidence
    ev[1].view(-1, ghm.vocab_size)[5] = -math.inf  # an impossible row
    cpu = posterior(ghm, ev, levels=True)
    for g in (ghm, ghm.to("cuda")):  # evidence on the GPU, model on either device
        gpu = posterior(g, ev.cuda(), levels=True)
        assert gpu.leaf_marginals.is_cuda and gpu.log_evidence.is_cuda
        torch.testing.assert_close(gpu.log_evidence.cpu(), cpu.log_evidence, rtol=1e-5, atol=0)
        for a, b in zip(gpu.level_marginals, cpu.level_marginals):
            torch.testing.assert_close(a.cpu(), b, rtol=0, atol=1e-5)
        torch.testing.assert_close(log_evidence(g, ev.cuda()).cpu(), cpu.log_evidence, rtol=1e-5, atol=0)
    assert cpu.log_evidence[1] == -math.inf


def test_cuda_matches_enumeration():
    ghm = GHM.random_hierarchy(3, 2, 4, 2, num_classes=2, layout="image", seed=8).to("cuda")
    ev = make_evidence(ghm.to("cpu"), "mixed", batch=4, seed=0)
    res = posterior(ghm, ev.float().cuda(), levels=True)
    ex = exact_posterior(ghm.to("cpu"), ev)
    torch.testing.assert_close(res.leaf_marginals.cpu().double(), ex.leaf_marginals, rtol=0, atol=1e-5)
    torch.testing.assert_close(res.log_evidence.cpu().double(), ex.log_evidence, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(GHMS))
def test_sampling_on_cuda(name, tree_consistent):
    ghm = GHMS[name]().to("cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = ghm.sample(16, generator=gen)
    assert x.is_cuda and torch.isfinite(ghm.log_prob(x)).all()
    ev = 2 * torch.nn.functional.one_hot(x, ghm.vocab_size).float() + torch.randn(
        *x.shape, ghm.vocab_size, device="cuda", generator=gen)
    leaves, tree = sample_posterior(ghm, ev, generator=gen, return_tree=True)
    assert leaves.is_cuda
    tree_consistent(ghm.to("cpu"), [t.cpu() for t in tree])
    again = sample_posterior(ghm, ev, generator=torch.Generator(device="cuda").manual_seed(1))
    assert torch.equal(again, sample_posterior(ghm, ev, generator=torch.Generator(device="cuda").manual_seed(1)))
    torch.testing.assert_close(ghm.log_prob(x).cpu(), ghm.to("cpu").log_prob(x.cpu()), rtol=1e-12, atol=0)
