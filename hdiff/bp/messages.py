"""One level of belief propagation for each kernel family (BACKGROUND.md, "BP on a ... GHM").

Messages are held in BP's internal order (:mod:`hdiff.bp._order`): a level is ``(A, N * B)``,
``u[a, x] = p(evidence below node | a)`` up to a per-node constant, rescaled so that every node's
largest entry is 1 (the caller keeps the log of each scale). Products over children are then
taken in probability space, which needs no ``exp``/``log`` on the big tensors. When a product
would leave a node with no representable entry (all below ``UNDERFLOW`` of the scale, e.g.
evidence that contradicts the grammar by more than ~70 nats), that level is recomputed in log
space, so float32 BP never turns a possible observation into an impossible one.

Each family provides vectorised operations over (batch, nodes); the caller loops over levels:

- ``upward(kernel, u_children) -> (h_parents, log_scale, cache)``: ``(C, s*M)`` -> ``(A, M)``
  with ``M = N_parent * B``, the per-column log-scale ``(M,)`` and what the way down needs;
- ``downward(kernel, p_parents, cache) -> p_children``: posterior marginals top-down;
- ``sample_down(kernel, parents, cache, generator) -> children``: exact joint posterior sampling.

The cache holds each node's unnormalised conditional of its children given its symbol and the
evidence below (per rule for productions, per child for factorized kernels), so the top-down
passes divide only by quantities that are zero exactly where the parent's posterior is zero.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from functools import singledispatch

import torch

from hdiff.ghm._random import categorical
from hdiff.ghm.kernels import FactorizedKernel, ProductionKernel

#: a node whose best entry falls below this (relative to 1) is recomputed in log space
UNDERFLOW = 1e-30


@dataclass(frozen=True)
class _ProductionConsts:
    gather: torch.Tensor  # (s, A * m): row rules[a, r, j] * s + j of the (C * s, M) children
    weights: torch.Tensor | None  # (A, m, 1), None when all weights are equal
    log_weight: float  # log of the common weight when all are equal
    log_weights: torch.Tensor  # (A, m, 1), for the log-space path
    rules: torch.Tensor  # (A, m, s)


_CONSTS: "weakref.WeakKeyDictionary[object, dict]" = weakref.WeakKeyDictionary()


def _cached(kernel, dtype: torch.dtype, device: torch.device, build):
    """Per-kernel constants, built once per (dtype, device); derived data only, never call state."""
    per_kernel = _CONSTS.setdefault(kernel, {})
    key = (dtype, device)
    if key not in per_kernel:
        per_kernel[key] = build()
    return per_kernel[key]


def _production_consts(k: ProductionKernel, dtype: torch.dtype, device: torch.device) -> _ProductionConsts:
    def build() -> _ProductionConsts:
        A, m, s, C = k.num_parents, k.num_rules, k.branching, k.num_children
        rules = k.rules.to(device)
        rows = rules * s + torch.arange(s, device=device)  # (A, m, s)
        w = k.weights.to(device)
        equal = bool(torch.all(w == w.flatten()[0]))
        log_w = torch.where(w > 0, w.clamp_min(1e-300).log(), -math.inf)
        return _ProductionConsts(
            gather=rows.permute(2, 0, 1).reshape(s, A * m).contiguous(),
            weights=None if equal else w.to(dtype).unsqueeze(-1),
            log_weight=float(log_w.flatten()[0]),
            log_weights=log_w.to(dtype).unsqueeze(-1),
            rules=rules,
        )

    return _cached(k, dtype, device, build)


def _transitions(k: FactorizedKernel, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return _cached(k, dtype, device, lambda: k.transitions.to(device=device, dtype=dtype))


def rescale(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Divide each column of ``h`` ``(A, M)`` by its max -> (rescaled, log of the max ``(M,)``).

    Columns of zeros (impossible evidence) stay zero with log-scale ``-inf``.
    """
    mx = h.amax(0)
    return h / mx.clamp_min(torch.finfo(h.dtype).tiny), mx.log()


def rescale_log(h_log: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-space twin of :func:`rescale`: ``exp(h_log - max)`` and the max ``(M,)``."""
    mx = h_log.amax(0)
    return (h_log - torch.where(torch.isfinite(mx), mx, 0.0)).exp(), mx


def _needs_log_space(scale: torch.Tensor) -> bool:
    # Zero scales are either impossible evidence or underflow: recomputing in log space tells them apart.
    return bool((scale < math.log(UNDERFLOW)).any())


# ------------------------------------------------------------------------------ generic
@singledispatch
def upward(kernel, u: torch.Tensor):
    """Children ``(C, s*M)`` -> parents ``(A, M)`` (max 1 per column), log-scale ``(M,)``, cache."""
    raise TypeError(f"no BP rule for kernel type {type(kernel).__name__}")


@singledispatch
def downward(kernel, p: torch.Tensor, cache) -> torch.Tensor:
    """Parents' posterior marginals ``(A, M)`` -> children's ``(C, s*M)``."""
    raise TypeError(f"no BP rule for kernel type {type(kernel).__name__}")


@singledispatch
def sample_down(kernel, parents: torch.Tensor, cache, generator: torch.Generator | None) -> torch.Tensor:
    """Parents' sampled symbols ``(M,)`` -> children ``(s*M,)`` drawn from the posterior."""
    raise TypeError(f"no BP rule for kernel type {type(kernel).__name__}")


# --------------------------------------------------------------------------- production
@upward.register
def _(k: ProductionKernel, u: torch.Tensor):
    # Inside recursion: h(a) = sum_r w[a, r] prod_j u_j(rules[a, r, j]).
    c = _production_consts(k, u.dtype, u.device)
    C, A, m, s = k.num_children, k.num_parents, k.num_rules, k.branching
    M = u.shape[1] // s
    rows = u.view(C * s, M)
    terms = rows.index_select(0, c.gather[0])
    for j in range(1, s):  # products over siblings, one gathered factor at a time (s is 2 or 4)
        terms.mul_(rows.index_select(0, c.gather[j]))
    terms = terms.view(A, m, M)
    if c.weights is not None:
        terms.mul_(c.weights)
    h_raw = terms.sum(1)
    h, scale = rescale(h_raw)
    if _needs_log_space(scale):
        log_terms = u.log().view(C * s, M).index_select(0, c.gather.flatten()).view(s, A, m, M).sum(0) + c.log_weights
        h_log = torch.logsumexp(log_terms, 1)
        h, scale = rescale_log(h_log)
        terms = (log_terms - torch.where(torch.isfinite(scale), scale, 0.0)).exp()
        h_raw = terms.sum(1)  # == exp(h_log - scale), consistent with terms for the way down
        h = h_raw
    elif c.weights is None:
        scale = scale + c.log_weight  # equal weights were left out of the products
    return h, scale, (terms, h_raw)


@downward.register
def _(k: ProductionKernel, p: torch.Tensor, cache) -> torch.Tensor:
    # p(child j = b) = sum_{a, r: rules[a, r, j] = b} p(a) * terms[a, r] / sum_r' terms[a, r'].
    # p(a) = 0 wherever h(a) = 0, so clamping h only turns 0/0 into 0. Consumes the cache.
    terms, h = cache
    c = _production_consts(k, p.dtype, p.device)
    joint = terms.mul_((p / h.clamp_min(torch.finfo(h.dtype).tiny)).unsqueeze(1)).view(k.num_parents * k.num_rules, -1)
    child = torch.zeros(k.num_children * k.branching, joint.shape[1], dtype=p.dtype, device=p.device)
    for j in range(k.branching):  # scatter-add each rule's mass onto its j-th child's symbol
        child.index_add_(0, c.gather[j], joint)
    return child.view(k.num_children, -1)


@sample_down.register
def _(k: ProductionKernel, parents: torch.Tensor, cache, generator) -> torch.Tensor:
    terms, _ = cache
    c = _production_consts(k, terms.dtype, terms.device)
    M = parents.shape[0]
    probs = terms.gather(0, parents.view(1, 1, M).expand(1, k.num_rules, M)).squeeze(0).T  # (M, m)
    rule = categorical(probs, generator=generator)
    return c.rules[parents, rule].T.reshape(-1)  # (s, M): child j of column x at j * M + x


# --------------------------------------------------------------------------- factorized
@upward.register
def _(k: FactorizedKernel, u: torch.Tensor):
    # q_j(a) = sum_b T_j(a, b) u_j(b);  h(a) = prod_j q_j(a)
    t = _transitions(k, u.dtype, u.device)
    C, s = k.num_children, k.branching
    uj = u.view(C, s, -1).transpose(0, 1)  # (s, C, M)
    q = torch.matmul(t, uj)  # (s, A, M)
    h = q.prod(0)
    h, scale = rescale(h)
    if _needs_log_space(scale):
        h, scale = rescale_log(q.log().sum(0))
    return h, scale, (uj, q)


@downward.register
def _(k: FactorizedKernel, p: torch.Tensor, cache) -> torch.Tensor:
    # p(child j = b) = u_j(b) sum_a T_j(a, b) p(a) / q_j(a)
    uj, q = cache
    t = _transitions(k, p.dtype, p.device)
    ratio = p / q.clamp_min(torch.finfo(q.dtype).tiny)  # (s, A, M); p(a) = 0 wherever q_j(a) = 0
    child = torch.matmul(t.transpose(1, 2), ratio).mul_(uj)  # (s, C, M)
    return child.transpose(0, 1).reshape(k.num_children, -1)


@sample_down.register
def _(k: FactorizedKernel, parents: torch.Tensor, cache, generator) -> torch.Tensor:
    uj, _ = cache
    t = _transitions(k, uj.dtype, uj.device)
    probs = t[:, parents] * uj.transpose(1, 2)  # (s, M, C) ∝ T_j(a, b) u_j(b)
    return categorical(probs, generator=generator).reshape(-1)
