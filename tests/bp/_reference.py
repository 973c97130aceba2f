"""Brute-force reference for BP: enumerate every complete tree of a tiny GHM, in float64.

Shares nothing with :mod:`hdiff.bp` but the model definition (via :func:`hdiff.ghm.enumerate_trees`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hdiff.ghm import GHM, enumerate_strings, enumerate_trees


@dataclass
class Exact:
    """Exact posterior quantities for a batch of evidence."""

    log_evidence: torch.Tensor  # (B,)
    level_marginals: list[torch.Tensor]  # level l: (B, *level_shape(l), symbols(l)); uniform where impossible

    @property
    def leaf_marginals(self) -> torch.Tensor:
        return self.level_marginals[-1]

    @property
    def root_marginals(self) -> torch.Tensor:
        return self.level_marginals[0].reshape(self.level_marginals[0].shape[0], -1)


def leaf_score(leaves: torch.Tensor, leaf_log_lik: torch.Tensor) -> torch.Tensor:
    """``sum_i leaf_log_lik[b, i, x_k,i]`` for strings ``leaves`` ``(K, *leaf_shape)`` -> ``(B, K)`` float64."""
    flat = leaves.reshape(leaves.shape[0], -1)  # (K, N)
    ev = leaf_log_lik.double().reshape(leaf_log_lik.shape[0], flat.shape[1], -1)  # (B, N, v)
    return ev[:, torch.arange(flat.shape[1])[None, :], flat].sum(-1)  # gather, never -inf * 0


def exact_posterior(ghm: GHM, leaf_log_lik: torch.Tensor) -> Exact:
    """Log-evidence and every level's marginals by summing over all complete trees."""
    trees = enumerate_trees(ghm)
    logw = leaf_score(trees.leaves, leaf_log_lik) + trees.prob.log()[None, :]  # (B, K)
    log_ev = torch.logsumexp(logw, dim=1)
    possible = torch.isfinite(log_ev)
    w = torch.where(possible[:, None], (logw - torch.where(possible, log_ev, 0.0)[:, None]).exp(), 0.0)
    marginals = []
    for level, nodes in enumerate(trees.levels):
        symbols = ghm.symbols(level)
        onehot = torch.nn.functional.one_hot(nodes, symbols).double()  # (K, *shape, A)
        m = torch.einsum("bk,k...->b...", w, onehot)
        shape = (-1,) + (1,) * (m.ndim - 1)
        marginals.append(torch.where(possible.view(shape), m, 1.0 / symbols))
    return Exact(log_ev, marginals)


def exact_string_posterior(ghm: GHM, leaf_log_lik: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct strings ``(K, *leaf_shape)`` and their posterior probabilities ``(K,)`` for one row of evidence."""
    strings, prob = enumerate_strings(ghm)
    logw = leaf_score(strings, leaf_log_lik[:1])[0] + prob.log()
    return strings, torch.softmax(logw, 0)


def hard_mask(ghm: GHM, x: torch.Tensor, frac: float, generator: torch.Generator) -> torch.Tensor:
    """``(B, *leaf_shape, v)`` bool: True = excluded symbol; a random ``frac`` of the symbols, never ``x``'s."""
    excluded = torch.rand(*x.shape, ghm.vocab_size, generator=generator, dtype=torch.float64) < frac
    return excluded & ~torch.nn.functional.one_hot(x, ghm.vocab_size).bool()


def make_evidence(ghm: GHM, kind: str, batch: int, seed: int) -> torch.Tensor:
    """float64 evidence ``(B, *leaf_shape, v)`` of ``kind``: "soft" (randn * 3), "hard" (-inf at some
    symbols, consistent with a sampled string) or "mixed" (soft plus hard)."""
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, *ghm.leaf_shape, ghm.vocab_size)
    if kind == "soft":
        return 3 * torch.randn(shape, generator=gen, dtype=torch.float64)
    x = ghm.sample(batch, generator=gen)
    excluded = hard_mask(ghm, x, 0.6, gen)
    base = torch.zeros(shape, dtype=torch.float64)
    if kind == "mixed":
        base = 3 * torch.randn(shape, generator=gen, dtype=torch.float64)
    elif kind != "hard":
        raise ValueError(kind)
    return base.masked_fill(excluded, -math.inf)


def invalid_string(ghm: GHM, seed: int = 0, tries: int = 10_000) -> torch.Tensor:
    """A token string ``(1, *leaf_shape)`` with probability zero (AssertionError if none is found)."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(tries):
        x = torch.randint(0, ghm.vocab_size, (1, *ghm.leaf_shape), generator=gen)
        if ghm.log_prob(x)[0] == -math.inf:
            return x
    raise AssertionError("no invalid string found")


def onehot_evidence(x: torch.Tensor, v: int, on: float = 0.0, off: float = -math.inf) -> torch.Tensor:
    """Evidence ``on`` at the tokens of ``x`` and ``off`` elsewhere (float64)."""
    oh = torch.nn.functional.one_hot(x, v).bool()
    return torch.where(oh, torch.tensor(on, dtype=torch.float64), torch.tensor(off, dtype=torch.float64))


def logspace_bp(ghm: GHM, leaf_log_lik: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An independent, deliberately naive BP for deep GHMs and finite evidence: the inside pass entirely in float64 log
    space (no rescaling, nothing can underflow), leaf marginals as the gradient of the log-evidence
    with respect to the leaf log-likelihoods (d log Z / d ll[i, b] = p(x_i = b | evidence)).

    Returns:
        log_evidence ``(B,)``, leaf marginals ``(B, *leaf_shape, v)``, root marginals ``(B, num_classes)``.
    """
    from hdiff.ghm import FactorizedKernel, to_tree_order

    ll = leaf_log_lik.detach().double().clone().requires_grad_(True)
    h = to_tree_order(ll, ghm.layout, ghm.depth)  # (B, N, v), children of node i at s*i + j
    B, s = h.shape[0], ghm.branching
    for kernel in reversed(ghm.kernels):
        hc = h.reshape(B, -1, s, h.shape[-1])  # (B, N_parent, s, C)
        if isinstance(kernel, FactorizedKernel):
            log_t = kernel.transitions.log()  # (s, A, C)
            q = torch.logsumexp(log_t[None, None] + hc[:, :, :, None, :], dim=-1)  # (B, Np, s, A)
            h = q.sum(2)
        else:
            rules, log_w = kernel.rules, kernel.weights.log()  # (A, m, s), (A, m)
            per_rule = sum(hc[:, :, j, rules[:, :, j]] for j in range(s))  # (B, Np, A, m)
            h = torch.logsumexp(per_rule + log_w, dim=-1)
    root = h[:, 0] + ghm.root_prior.log()  # (B, num_classes)
    log_ev = torch.logsumexp(root, dim=-1)
    (grad,) = torch.autograd.grad(log_ev.sum(), ll)
    return log_ev.detach(), grad, torch.softmax(root.detach(), dim=-1)
