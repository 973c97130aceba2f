"""Layouts: tree order <-> sequence / image (Z-order) arrangement, checked on sampled trees."""

from __future__ import annotations

import pytest
import torch

from hdiff.ghm import GHM, FactorizedKernel, from_tree_order, level_shape, to_tree_order


def test_level_shape():
    assert level_shape("sequence", 3, 0) == (1,)
    assert level_shape("sequence", 3, 4) == (81,)
    assert level_shape("image", 4, 0) == (1, 1)
    assert level_shape("image", 4, 3) == (8, 8)


@pytest.mark.parametrize("level", range(6))
@pytest.mark.parametrize("trailing", [(), (3,), (2, 5)], ids=["none", "v", "2x5"])
def test_round_trip(level, trailing):
    gen = torch.Generator().manual_seed(level)
    img = torch.randn(4, 2**level, 2**level, *trailing, generator=gen)
    tree = to_tree_order(img, "image", level)
    assert tree.shape == (4, 4**level, *trailing)
    assert torch.equal(from_tree_order(tree, "image", level), img)
    flat = torch.randn(4, 4**level, *trailing, generator=gen)
    assert torch.equal(to_tree_order(from_tree_order(flat, "image", level), "image", level), flat)
    seq = torch.randn(4, 3**level, *trailing, generator=gen)  # sequences are already in tree order
    assert torch.equal(to_tree_order(seq, "sequence", level), seq)
    assert torch.equal(from_tree_order(seq, "sequence", level), seq)


@pytest.mark.parametrize("level", range(1, 5))
def test_image_tree_order_is_the_2x2_block_recursion(level):
    """Tree index with base-4 digits d_1 .. d_L (d_1 chosen at the root) sits at row sum (d_k // 2) 2^(L-k),
    column sum (d_k % 2) 2^(L-k): child j of node (r, c) is at (2r + j // 2, 2c + j % 2)."""
    side = 2**level
    grid = torch.arange(side * side).view(1, side, side)  # value = row * side + col
    order = to_tree_order(grid, "image", level)[0]
    for i in range(4**level):
        digits = [(i >> (2 * (level - 1 - k))) & 3 for k in range(level)]  # most significant first
        row = col = 0
        for d in digits:
            row, col = 2 * row + d // 2, 2 * col + d % 2
        assert int(order[i]) == row * side + col
    # children of tree node i are tree nodes 4i + j
    parent_rc = [(int(p) // (side // 2), int(p) % (side // 2)) for p in to_tree_order(
        torch.arange(side * side // 4).view(1, side // 2, side // 2), "image", level - 1)[0]]
    for i, (r, c) in enumerate(parent_rc):
        for j in range(4):
            assert int(order[4 * i + j]) == (2 * r + j // 2) * side + (2 * c + j % 2)


def _check_blocks(ghm: GHM, levels: list[torch.Tensor], emits) -> None:
    """Each node's 2x2 (image) or s-run (sequence) block of children, in order j, is what ``emits`` allows."""
    for l, kernel in enumerate(ghm.kernels):
        parents, children = levels[l], levels[l + 1]
        n = parents.shape[0]
        if ghm.layout == "image":
            side = 2**l
            assert parents.shape == (n, side, side) and children.shape == (n, 2 * side, 2 * side)
            blocks = children.view(n, side, 2, side, 2).permute(0, 1, 3, 2, 4).reshape(n, side, side, 4)
        else:
            blocks = children.view(n, -1, ghm.branching)
        emits(kernel, parents, blocks)


def _rules_emit(kernel, parents, blocks):
    ok = (kernel.rules[parents] == blocks.unsqueeze(-2)).all(-1).any(-1)
    assert ok.all(), "a block of children is not one of its parent's rules in order j = 0..s-1"


@pytest.mark.parametrize("layout,branching", [("image", 4), ("sequence", 2), ("sequence", 3)])
def test_sampled_children_are_parent_rules_in_order(layout, branching):
    ghm = GHM.random_hierarchy(5, 3, branching, 3, num_classes=3, layout=layout, seed=0)
    x, levels = ghm.sample(200, generator=torch.Generator().manual_seed(0), return_tree=True)
    assert torch.equal(levels[-1], x) and x.shape == (200, *ghm.leaf_shape)
    assert [tuple(t.shape[1:]) for t in levels] == [ghm.level_shape(l) for l in range(ghm.depth + 1)]
    _check_blocks(ghm, levels, _rules_emit)


def test_rule_check_detects_a_transposed_block():
    """The block check above can fail: swapping the 2x2 convention (j -> row j % 2, col j // 2) breaks it."""
    ghm = GHM.random_hierarchy(5, 3, 4, 2, layout="image", seed=0)
    _, levels = ghm.sample(200, generator=torch.Generator().manual_seed(0), return_tree=True)
    with pytest.raises(AssertionError):
        _check_blocks(ghm, [levels[0], levels[1].transpose(-1, -2), levels[2]], _rules_emit)


def test_factorized_image_children_positions():
    """A deterministic factorized kernel: child j of symbol a is (a + j) mod 5, at (2r + j // 2, 2c + j % 2)."""
    v = 5
    t = torch.zeros(4, v, v, dtype=torch.float64)
    for j in range(4):
        t[j, torch.arange(v), (torch.arange(v) + j) % v] = 1.0
    ghm = GHM(torch.full((v,), 1.0 / v, dtype=torch.float64), [FactorizedKernel(t)] * 3, layout="image")
    _, levels = ghm.sample(50, generator=torch.Generator().manual_seed(0), return_tree=True)

    def emits(kernel, parents, blocks):
        expected = (parents.unsqueeze(-1) + torch.arange(4)) % v
        assert torch.equal(blocks, expected)

    _check_blocks(ghm, levels, emits)
