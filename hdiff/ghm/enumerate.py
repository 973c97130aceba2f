"""Brute-force enumeration of every complete tree of a tiny GHM, in float64.

The reference that BP, ``log_prob`` and the samplers are tested against: it shares no message
passing with :mod:`hdiff.bp`, only the definition of the model (root prior, then each node
independently draws its children through its level's kernel).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from hdiff.ghm.kernels import ProductionKernel
from hdiff.ghm.layout import from_tree_order
from hdiff.ghm.model import GHM

#: refuse to enumerate more complete trees than this
MAX_TREES = 2_000_000


@dataclass(frozen=True)
class Enumeration:
    """Every complete tree with positive probability.

    Attributes:
        levels: ``depth + 1`` long tensors, root first, level ``l`` of shape ``(K, *level_shape(l))``.
        prob: ``(K,)`` float64 probabilities of the trees (they sum to one).
    """

    levels: list[torch.Tensor]
    prob: torch.Tensor

    @property
    def leaves(self) -> torch.Tensor:
        """``(K, *leaf_shape)`` leaf strings of the trees (with repeats when latents differ)."""
        return self.levels[-1]


def _children_options(kernel, parent: int) -> list[tuple[tuple[int, ...], float]]:
    """All (children tuple, probability) a parent symbol can emit, merged over equal tuples."""
    out: dict[tuple[int, ...], float] = {}
    if isinstance(kernel, ProductionKernel):
        for r in range(kernel.num_rules):
            w = float(kernel.weights[parent, r])
            if w > 0:
                key = tuple(int(c) for c in kernel.rules[parent, r])
                out[key] = out.get(key, 0.0) + w
    else:
        per_child = [[(c, float(kernel.transitions[j, parent, c])) for c in range(kernel.num_children)
                      if kernel.transitions[j, parent, c] > 0] for j in range(kernel.branching)]
        for combo in itertools.product(*per_child):
            p = 1.0
            for _, pc in combo:
                p *= pc
            out[tuple(c for c, _ in combo)] = p
    return list(out.items())


def count_trees(ghm: GHM) -> int:
    """Number of complete trees with positive probability (an upper bound when rules repeat), by a
    bottom-up count: ``N(a) = sum_r prod_j N(rules[a, r, j])`` or ``prod_j sum_{b: T_j(a, b) > 0} N(b)``."""
    counts = [1] * ghm.vocab_size
    for kernel in reversed(ghm.kernels):
        if isinstance(kernel, ProductionKernel):
            rules, positive = kernel.rules.tolist(), (kernel.weights > 0).tolist()
            new = []
            for a in range(kernel.num_parents):
                total = 0
                for r, tup in enumerate(rules[a]):
                    if positive[a][r]:
                        prod = 1
                        for c in tup:
                            prod *= counts[c]
                        total += prod
                new.append(total)
        else:
            support = (kernel.transitions > 0).tolist()
            new = []
            for a in range(kernel.num_parents):
                prod = 1
                for j in range(kernel.branching):
                    prod *= sum(counts[b] for b, ok in enumerate(support[j][a]) if ok)
                new.append(prod)
        counts = new
    return sum(c for c, p in zip(counts, ghm.root_prior.tolist()) if p > 0)


def enumerate_trees(ghm: GHM, *, max_trees: int = MAX_TREES) -> Enumeration:
    """Enumerate every complete tree (all levels' symbols) of a tiny GHM with its probability.

    Raises:
        ValueError: when the GHM has more than ``max_trees`` trees (counted before any is built).
    """
    total = count_trees(ghm)
    if total > max_trees:
        raise ValueError(f"ghm is too large to enumerate ({total} trees > max_trees={max_trees})")
    ghm = ghm.to("cpu")
    trees: list[tuple[list[tuple[int, ...]], float]] = [
        ([(a,)], float(p)) for a, p in enumerate(ghm.root_prior.tolist()) if p > 0]
    for kernel in ghm.kernels:
        options = {a: _children_options(kernel, a) for a in range(kernel.num_parents)}
        new = []
        for levels, p in trees:
            per_node = [options[a] for a in levels[-1]]
            count = 1
            for o in per_node:
                count *= len(o)
            if len(new) + count > max_trees:
                raise ValueError(f"ghm is too large to enumerate (more than max_trees={max_trees} trees)")
            for combo in itertools.product(*per_node):
                q = p
                children: list[int] = []
                for tup, pc in combo:
                    q *= pc
                    children.extend(tup)
                new.append((levels + [tuple(children)], q))
        trees = new
    prob = torch.tensor([p for _, p in trees], dtype=torch.float64)
    levels = [from_tree_order(torch.tensor([t[l] for t, _ in trees], dtype=torch.int64), ghm.layout, l)
              for l in range(ghm.depth + 1)]
    return Enumeration(levels, prob)


def enumerate_strings(ghm: GHM, *, max_trees: int = MAX_TREES) -> tuple[torch.Tensor, torch.Tensor]:
    """Every leaf string with positive probability, latents summed out.

    Returns:
        tokens ``(K, *leaf_shape)`` (distinct, lexicographic) and their probabilities ``(K,)`` float64.
    """
    trees = enumerate_trees(ghm, max_trees=max_trees)
    flat = trees.leaves.flatten(1)
    strings, inverse = torch.unique(flat, dim=0, return_inverse=True)
    prob = torch.zeros(strings.shape[0], dtype=torch.float64).index_add_(0, inverse, trees.prob)
    return strings.reshape(-1, *ghm.leaf_shape), prob
