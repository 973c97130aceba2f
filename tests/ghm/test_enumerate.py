"""Brute-force enumeration: hand-computed cases, normalisation, shapes, and the size guard."""

from __future__ import annotations

import pytest
import torch

from hdiff.ghm import GHM, FactorizedKernel, ProductionKernel, enumerate_strings, enumerate_trees
from hdiff.ghm.enumerate import MAX_TREES

F64 = torch.float64


def _hand_production() -> GHM:
    """Root 0 (p=.25): (0,1) w.5, (1,1) w.5.  Root 1 (p=.75): (1,0) w.2, (0,1) w.8."""
    rules = torch.tensor([[[0, 1], [1, 1]], [[1, 0], [0, 1]]])
    weights = torch.tensor([[0.5, 0.5], [0.2, 0.8]], dtype=F64)
    return GHM(torch.tensor([0.25, 0.75], dtype=F64), [ProductionKernel(rules, weights)])


def test_hand_computed_production_depth_1():
    ghm = _hand_production()
    strings, prob = enumerate_strings(ghm)
    assert strings.tolist() == [[0, 1], [1, 0], [1, 1]]  # distinct, lexicographic
    torch.testing.assert_close(prob, torch.tensor([0.25 * 0.5 + 0.75 * 0.8, 0.75 * 0.2, 0.25 * 0.5], dtype=F64),
                               rtol=0, atol=1e-15)
    trees = enumerate_trees(ghm)
    got = sorted(zip(trees.levels[0].flatten().tolist(), map(tuple, trees.leaves.tolist()), trees.prob.tolist()))
    want = [(0, (0, 1), 0.125), (0, (1, 1), 0.125), (1, (0, 1), 0.6), (1, (1, 0), 0.15)]
    assert [g[:2] for g in got] == [w[:2] for w in want]
    assert [g[2] for g in got] == pytest.approx([w[2] for w in want], abs=1e-15)
    torch.testing.assert_close(ghm.log_prob(strings), prob.log(), rtol=0, atol=1e-12)
    assert ghm.log_prob(torch.tensor([[0, 0]])).item() == float("-inf")


def test_repeated_rule_is_merged_into_one_tree():
    rules = torch.tensor([[[0, 1], [0, 1], [1, 1]]])
    ghm = GHM(torch.ones(1, dtype=F64), [ProductionKernel(rules, torch.tensor([[0.3, 0.3, 0.4]], dtype=F64))])
    trees = enumerate_trees(ghm)
    assert trees.leaves.tolist() == [[0, 1], [1, 1]]
    torch.testing.assert_close(trees.prob, torch.tensor([0.6, 0.4], dtype=F64), rtol=0, atol=1e-15)


def test_zero_weight_rules_are_left_out():
    rules = torch.tensor([[[0, 1], [1, 1]]])
    ghm = GHM(torch.ones(1, dtype=F64), [ProductionKernel(rules, torch.tensor([[1.0, 0.0]], dtype=F64))])
    strings, prob = enumerate_strings(ghm)
    assert strings.tolist() == [[0, 1]] and prob.tolist() == [1.0]


def test_hand_computed_factorized_depth_1():
    t = torch.tensor([[[0.3, 0.7]], [[0.6, 0.4]]], dtype=F64)  # (s=2, 1 parent, 2 children)
    ghm = GHM(torch.ones(1, dtype=F64), [FactorizedKernel(t)])
    strings, prob = enumerate_strings(ghm)
    assert strings.tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]
    torch.testing.assert_close(prob, torch.tensor([0.18, 0.12, 0.42, 0.28], dtype=F64), rtol=0, atol=1e-15)


def test_hand_computed_depth_2_chain():
    """Root 0 -> (0, 1) surely; then 0 -> (1, 1) | (0, 0) (w .9/.1) and 1 -> (1, 0) surely."""
    k0 = ProductionKernel(torch.tensor([[[0, 1]]]), torch.ones(1, 1, dtype=F64), num_children=2)
    k1 = ProductionKernel(torch.tensor([[[1, 1], [0, 0]], [[1, 0], [1, 0]]]),
                          torch.tensor([[0.9, 0.1], [0.5, 0.5]], dtype=F64))
    ghm = GHM(torch.ones(1, dtype=F64), [k0, k1])
    strings, prob = enumerate_strings(ghm)
    assert strings.tolist() == [[0, 0, 1, 0], [1, 1, 1, 0]]
    torch.testing.assert_close(prob, torch.tensor([0.1, 0.9], dtype=F64), rtol=0, atol=1e-15)
    trees = enumerate_trees(ghm)
    assert [t.tolist() for t in trees.levels[:2]] == [[[0], [0]], [[0, 1], [0, 1]]]


def test_probabilities_sum_to_one_and_strings_are_distinct(tiny_ghm):
    trees = enumerate_trees(tiny_ghm)
    assert trees.prob.dtype == F64 and (trees.prob > 0).all()
    torch.testing.assert_close(trees.prob.sum(), torch.ones((), dtype=F64), rtol=0, atol=1e-12)
    assert len(trees.levels) == tiny_ghm.depth + 1
    for level, nodes in enumerate(trees.levels):
        assert nodes.shape == (trees.prob.shape[0], *tiny_ghm.level_shape(level)) and nodes.dtype == torch.int64
    flat = torch.cat([lvl.flatten(1) for lvl in trees.levels], 1)
    assert torch.unique(flat, dim=0).shape[0] == flat.shape[0], "a tree is listed twice"
    strings, prob = enumerate_strings(tiny_ghm)
    assert strings.shape[1:] == tiny_ghm.leaf_shape and (prob > 0).all()
    torch.testing.assert_close(prob.sum(), torch.ones((), dtype=F64), rtol=0, atol=1e-12)
    codes = strings.flatten(1)
    assert torch.unique(codes, dim=0).shape[0] == codes.shape[0]
    assert codes.tolist() == sorted(codes.tolist())


def test_uniform_rhm_enumerates_p_max_equiprobable_strings():
    v, m, s, L, nc = 3, 2, 2, 3, 2
    ghm = GHM.random_hierarchy(v, m, s, L, num_classes=nc, seed=0)
    strings, prob = enumerate_strings(ghm)
    p_max = nc * m ** ((s**L - 1) // (s - 1))
    assert strings.shape == (p_max, s**L)  # unambiguous: every tree gives a different string
    torch.testing.assert_close(prob, torch.full((p_max,), 1.0 / p_max, dtype=F64), rtol=1e-12, atol=0)


def test_image_layout_enumeration_matches_sequence_up_to_tree_order():
    from hdiff.ghm import to_tree_order

    img = GHM.random_hierarchy(3, 2, 4, 2, num_classes=2, layout="image", seed=8)
    seq = GHM(img.root_prior, img.kernels)
    ti, ts = enumerate_trees(img), enumerate_trees(seq)
    assert ti.leaves.shape[1:] == (4, 4)
    torch.testing.assert_close(ti.prob, ts.prob, rtol=0, atol=0)
    for level in range(3):
        assert torch.equal(to_tree_order(ti.levels[level], "image", level).flatten(1), ts.levels[level])


def test_refuses_when_too_large():
    with pytest.raises(ValueError, match="max_trees"):
        enumerate_trees(GHM.random_hierarchy(3, 2, 2, 3, seed=0), max_trees=100)  # 3 * 2**7 = 384 trees
    enumerate_trees(GHM.random_hierarchy(3, 2, 2, 3, seed=0), max_trees=384)  # exactly at the limit
    with pytest.raises(ValueError, match="too large"):
        enumerate_strings(GHM.random_hierarchy(3, 2, 2, 3, seed=0), max_trees=383)
    with pytest.raises(ValueError, match="max_trees"):  # the default guard: 64**4 trees below each level-1 tree
        enumerate_strings(GHM.random_hierarchy(4, 64, 4, 2, layout="image", seed=0))
    assert MAX_TREES >= 10_000


def test_refuses_large_factorized_kernels_quickly():
    import time

    ghm = GHM.random_factorized(16, 4, 1, seed=0)  # 16 * 16**4 = 1M trees; ~1.5 s to build the options
    start = time.perf_counter()
    with pytest.raises(ValueError, match="max_trees"):
        enumerate_trees(ghm, max_trees=1000)
    assert time.perf_counter() - start < 0.2
