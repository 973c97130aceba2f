"""BP's upward messages: node n's message at level l is the root log-posterior of the subtree below n."""

import pytest
import torch

from hdiff.bp import posterior, upward_messages
from hdiff.ghm import GHM

from tests.conftest import TINY_GHMS


@pytest.mark.parametrize("name", [k for k in TINY_GHMS if not k.startswith("img")])
def test_upward_messages_are_subtree_root_posteriors(name: str) -> None:
    ghm = TINY_GHMS[name]()
    g = torch.Generator().manual_seed(0)
    ev = torch.randn(5, *ghm.leaf_shape, ghm.vocab_size, generator=g, dtype=torch.float64)
    ev[0, 0, :] = -torch.inf  # a leaf with hard evidence for one symbol
    ev[0, 0, 1] = 0.0
    msgs = upward_messages(ghm, ev)
    assert len(msgs) == ghm.depth + 1
    s, L = ghm.branching, ghm.depth
    for level in range(L + 1):
        symbols = ghm.root_prior.shape[0] if level == 0 else ghm.kernels[level - 1].num_children
        assert msgs[level].shape == (5, s**level, symbols)
        if level == L:
            want = ev - ev.amax(-1, keepdim=True)
            assert torch.allclose(msgs[level], want)
            continue
        # the subtree below node n: a GHM with a uniform root prior over this level's symbols
        sub = GHM(torch.full((symbols,), 1.0 / symbols, dtype=torch.float64), ghm.kernels[level:])
        width = s ** (L - level)
        for n in range(s**level):
            root = posterior(sub, ev[:, n * width:(n + 1) * width]).root_marginals.log()
            got = torch.log_softmax(msgs[level][:, n], -1)
            ok = torch.isfinite(root)
            assert torch.equal(ok, torch.isfinite(got))
            assert torch.allclose(got[ok], root[ok], atol=1e-9)


def test_image_layout_shapes() -> None:
    ghm = TINY_GHMS["img-rhm-v3m2L2"]()
    ev = torch.randn(2, *ghm.leaf_shape, ghm.vocab_size)
    msgs = upward_messages(ghm, ev)
    assert [tuple(m.shape[1:-1]) for m in msgs] == [ghm.level_shape(l) for l in range(ghm.depth + 1)]
    assert torch.allclose(msgs[-1], ev - ev.amax(-1, keepdim=True))
