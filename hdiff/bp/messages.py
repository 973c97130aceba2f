"""One level of belief propagation for each kernel family (docs/bp.md).

Messages are held in BP's internal order (:mod:`hdiff.bp._order`), a level as ``(A, N * B)``, in
one of two forms, chosen per level:

- **log form**: ``h[a, x] = log p(evidence below node | a)`` up to a per-node constant, shifted so
  that every node's largest entry is 0 (the caller keeps the shifts). ``-inf`` is an exact zero
  (hard evidence, zero weights); finite values never underflow, whatever the evidence, so BP stays
  exact when parts of the evidence contradict each other by thousands of nats;
- **probability form**: ``u = exp(h)`` (max 1 per node), used only where every positive entry is a
  normal float, so ``u`` holds exactly the same numbers and ``log(u)`` gives ``h`` back.

When the children's spread (:func:`spread_of`, :func:`prob_spread_of`) shows that no product of
their entries can leave the normal float range (soft or hard evidence of moderate strength,
typically the big bottom levels), a production level is computed in probability space: one ``exp``
per child entry (none when the children are already in probability form) rather than one per
(node, rule), and its parents stay in probability form. Otherwise it runs in log space. What is
kept for the way down are rule posteriors ``p(r | a, below)``: normalised in log space, or as the
undivided products and their sums in probability space.

Each family provides vectorised operations over (batch, nodes); the caller loops over levels:

- ``upward(kernel, x_children, prob) -> (x_parents, parents_prob, log_shift, cache)``:
  ``(C, s*M)`` -> ``(A, M)`` with ``M = N_parent * B`` and the per-column shift ``(M,)``
  (consumes ``x_children``);
- ``downward(kernel, p_parents, cache) -> p_children``: posterior marginals top-down;
- ``sample_down(kernel, parents, cache, u) -> children``: exact joint posterior sampling from the
  uniforms ``u`` (shape :func:`draw_shape`), which the caller draws from its generator.

Every data-dependent choice of a path (probability or log space, an exact log-space redo) goes
through :func:`decide`: alone it returns the level's own choice; a chunked run (:mod:`hdiff.bp.propagation`)
installs a decider that makes every chunk take the choice the whole batch would take.
"""

from __future__ import annotations

import math
import weakref
from contextvars import ContextVar
from dataclasses import dataclass
from functools import singledispatch
from typing import NamedTuple

import torch

from hdiff.ghm._random import inverse_cdf
from hdiff.ghm.kernels import FactorizedKernel, ProductionKernel

@dataclass(frozen=True)
class _ProductionConsts:
    gather: tuple[torch.Tensor, ...]  # s x (A * m,): row rules[a, r, j] * s + j of the (C * s, M) children
    weights: torch.Tensor | None  # (A, m, 1), None when all weights are equal
    log_weight: float  # log of the common weight when all are equal
    log_weights: torch.Tensor  # (A, m, 1), for the log-space path
    # -log of the smallest positive weight; log(m) when all are equal: they are factored out, so a node's sum
    # over rules can reach m, and its smallest entry relative to its largest is what bounds the range
    log_inv_min_weight: float
    rules: torch.Tensor  # (A, m, s)


class ProductionCache(NamedTuple):
    """What a production level's upward pass leaves for its downward pass and joint sampling.

    Attributes:
        rule_mass: ``(A, m, M)``: ``p(r | a, evidence below)`` when ``total`` is None (log-space
            path), else the unnormalised rule terms whose sum over ``r`` is ``total`` (fast path).
        total: ``(A, M)`` the normaliser of ``rule_mass``, or None when it is normalised already.
    """

    rule_mass: torch.Tensor
    total: torch.Tensor | None


class FactorizedCache(NamedTuple):
    """What a factorized level's upward pass leaves for its downward pass and joint sampling.

    Attributes:
        child_log: ``(s, C, M)`` the children's upward log-messages ``h_j(b)`` (max 0 per node).
        log_q: ``(s, A, M)`` the child-to-parent messages ``q_j(a) = log sum_b T_j(a, b) e^{h_j(b)}``.
        child_prob: ``(s, C, M)`` ``exp(h_j)``, kept only on the fast path (else None).
        q: ``(s, A, M)`` ``exp(q_j)``, kept only on the fast path (else None).
    """

    child_log: torch.Tensor
    log_q: torch.Tensor
    child_prob: torch.Tensor | None
    q: torch.Tensor | None


#: largest spread (nats) of a product that probability space holds exactly (normal floats only)
SAFE_RANGE = {torch.float32: 80.0, torch.float64: 700.0}

#: smallest normal float: clamping a message to it changes only its exact zeros (comparisons and
#: torch.where cost several times a clamp on CPUs, and these run over whole levels)
_TINY = {torch.float32: torch.finfo(torch.float32).tiny, torch.float64: torch.finfo(torch.float64).tiny}

#: a factorized level whose q_j(a) falls below this is recomputed as an exact log-space sum
REDO = 1e-30

_CONSTS: "weakref.WeakKeyDictionary[object, dict]" = weakref.WeakKeyDictionary()

#: set by a chunked run for the level being computed: ``(index of the choice in the level, fast path allowed
#: by this chunk's data) -> take the fast path``; None (the default) takes the level's own choice
DECIDER: ContextVar = ContextVar("hdiff_bp_decider", default=None)


def decide(index: int, fast_ok: bool) -> bool:
    """Whether to take the fast path at the level's ``index``-th data-dependent choice.

    ``fast_ok`` is what this call's data allow: the fast path (probability space, no log-space redo)
    is exact only then. The other path is exact always, so a decider may force it.
    """
    decider = DECIDER.get()
    return fast_ok if decider is None else decider(index, fast_ok)


def _cached(kernel, dtype: torch.dtype, device: torch.device, build):
    """Per-kernel constants, built once per (dtype, device); derived data only, never call state."""
    per_kernel = _CONSTS.setdefault(kernel, {})
    key = (dtype, device)
    if key not in per_kernel:
        per_kernel[key] = build()
    return per_kernel[key]


def _production_consts(k: ProductionKernel, dtype: torch.dtype, device: torch.device) -> _ProductionConsts:
    def build() -> _ProductionConsts:
        A, m, s = k.num_parents, k.num_rules, k.branching
        rules = k.rules.to(device)
        rows = rules * s + torch.arange(s, device=device)  # (A, m, s)
        w = k.weights.to(device)
        equal = bool(torch.all(w == w.flatten()[0]))
        log_w = torch.where(w > 0, w.clamp_min(1e-300).log(), -math.inf)
        return _ProductionConsts(
            gather=tuple(g.contiguous() for g in rows.permute(2, 0, 1).reshape(s, A * m)),  # a tuple: no select op per use
            weights=None if equal else w.to(dtype).unsqueeze(-1),
            log_weight=float(log_w.flatten()[0]),
            log_weights=log_w.to(dtype).unsqueeze(-1),
            log_inv_min_weight=float(-w[w > 0].min().log()),
            rules=rules,
        )

    return _cached(k, dtype, device, build)


def _transitions(k: FactorizedKernel, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return _cached(k, dtype, device, lambda: k.transitions.to(device=device, dtype=dtype))


def spread_of(h: torch.Tensor) -> float:
    """Largest distance (nats) of a finite entry of ``h`` (max 0 per column) below 0."""
    if h.numel() == 0:
        return 0.0
    low = float(h.amin())  # one pass; the masked pass is only needed when some entry is -inf
    if low > -math.inf:
        return -low
    return float(-torch.where(h > -math.inf, h, 0.0).amin())


def prob_spread_of(u: torch.Tensor) -> float:
    """:func:`spread_of` of ``log(u)`` for ``u`` in probability form (max 1 per column, exact zeros allowed)."""
    if u.numel() == 0:
        return 0.0
    low = float(u.amin())
    if low <= 0.0:  # exact zeros (hard evidence): the smallest positive entry needs the masked pass
        low = float(torch.where(u > 0, u, 1.0).amin())
    return -math.log(low)


def finite_shift(mx: torch.Tensor) -> torch.Tensor:
    """A column max ``mx`` made safe to subtract: ``-inf`` (a column without mass) becomes the lowest
    float, so that column's ``-inf`` entries stay ``-inf`` (``-inf - (-inf)`` would be NaN)."""
    return mx.clamp_min(torch.finfo(mx.dtype).min)


def shift_to_max0(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Subtract each column's max from ``h`` ``(A, M)`` in place -> (``h``, the max ``(M,)``).

    Columns that are all ``-inf`` (impossible evidence) stay ``-inf`` with shift ``-inf``.
    """
    mx = h.amax(0)
    h.sub_(finite_shift(mx))
    return h, mx


def sum_dim(x: torch.Tensor, dim: int, keepdim: bool = False) -> torch.Tensor:
    """Sum over a short ``dim`` in a fixed order (index 0, 1, 2, ...): each column's result depends on
    that column alone. ``torch.sum`` picks its summation order from the whole tensor's shape, so the
    same column can round differently in a call with fewer batch rows; chunked BP must not."""
    n = x.shape[dim]
    if n == 1:
        out = x.select(dim, 0).clone()
    else:
        out = x.select(dim, 0) + x.select(dim, 1)
        for i in range(2, n):
            out += x.select(dim, i)
    return out.unsqueeze(dim) if keepdim else out


def logsumexp_and_softmax(g: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logsumexp, softmax)`` of ``g`` along ``dim``, consuming ``g``; all-``-inf`` slices give ``(-inf, 0)``."""
    mx = g.amax(dim, keepdim=True)
    e = g.sub_(finite_shift(mx)).exp_()
    total = sum_dim(e, dim, keepdim=True)
    e.div_(total.clamp_min(1.0))  # a slice with mass has an entry exp(0) = 1: total is 0 or >= 1
    return (mx + total.log()).squeeze(dim), e


# ------------------------------------------------------------------------------ generic
@singledispatch
def upward(kernel, x: torch.Tensor, prob: bool):
    """Children ``(C, s*M)`` -> ``(parents (A, M), parents_prob, shifts (M,), cache)``.

    ``x`` is in log form (max 0 per column) or, with ``prob``, in probability form (max 1 per
    column); the parents come back in the form named by ``parents_prob``.
    """
    raise TypeError(f"no BP rule for kernel type {type(kernel).__name__}")


@singledispatch
def downward(kernel, p: torch.Tensor, cache) -> torch.Tensor:
    """Parents' posterior marginals ``(A, M)`` -> children's ``(C, s*M)``."""
    raise TypeError(f"no BP rule for kernel type {type(kernel).__name__}")


@singledispatch
def sample_down(kernel, parents: torch.Tensor, cache, u: torch.Tensor) -> torch.Tensor:
    """Parents' sampled symbols ``(M,)`` -> children ``(s*M,)`` drawn from the posterior with uniforms ``u``."""
    raise TypeError(f"no BP rule for kernel type {type(kernel).__name__}")


@singledispatch
def draw_shape(kernel, M: int) -> tuple[int, ...]:
    """Shape of the uniforms :func:`sample_down` takes for ``M`` parent columns (what
    :func:`hdiff.ghm._random.categorical` would draw): one per column and draw, in internal column order."""
    raise TypeError(f"no BP rule for kernel type {type(kernel).__name__}")


def to_log(x: torch.Tensor, prob: bool) -> torch.Tensor:
    """A message in log form; exact because probability-form entries are normal floats or 0."""
    return x.log() if prob else x


# --------------------------------------------------------------------------- production
@upward.register
def _(k: ProductionKernel, x: torch.Tensor, prob: bool):
    # Inside recursion: h(a) = logsumexp_r [log w[a, r] + sum_j h_j(rules[a, r, j])].
    if decide(0, production_prob_ok(k, x, prob)):
        return production_up_prob(k, x, prob)
    return production_up_log(k, x, prob)


def production_prob_ok(k: ProductionKernel, x: torch.Tensor, prob: bool, spread: float | None = None) -> bool:
    """Whether probability space is exact for this production level (the spread bound, docs/bp.md)."""
    c = _production_consts(k, x.dtype, x.device)
    if spread is None:
        spread = prob_spread_of(x) if prob else spread_of(x)
    return k.branching * spread + c.log_inv_min_weight <= SAFE_RANGE[x.dtype]


def production_up_prob(k: ProductionKernel, x: torch.Tensor, prob: bool):
    """The probability-space production level (only where :func:`production_prob_ok`); consumes ``x``."""
    # Every child entry is 0 or within `spread` nats of its node's max, so no product of s of them
    # (times a weight), nor a parent entry relative to its node's max, can leave the normal float
    # range: probability space is exact here. The parents stay in probability form (max 1 per
    # column), so the next level needs no exp either.
    c = _production_consts(k, x.dtype, x.device)
    C, A, m, s = k.num_children, k.num_parents, k.num_rules, k.branching
    M = x.shape[1] // s
    rows = (x if prob else x.exp_()).view(C * s, M)  # x is consumed: no new level-sized buffer
    terms = rows.index_select(0, c.gather[0])
    for j in range(1, s):
        terms.mul_(rows.index_select(0, c.gather[j]))
    terms = terms.view(A, m, M)
    if c.weights is not None:
        terms.mul_(c.weights)
    total = sum_dim(terms, 1)
    mx = total.amax(0)
    u_parent = total / mx.clamp_min(_TINY[x.dtype])  # a positive max is >= e^-SAFE_RANGE > tiny: unchanged
    shift = mx.log()  # -inf for columns without mass (impossible evidence)
    if c.weights is None:
        shift.add_(c.log_weight)  # equal weights were left out of the sums
    return u_parent, True, shift, ProductionCache(terms, total)  # p(r | a, below) = terms / total, left undivided


def production_up_log(k: ProductionKernel, x: torch.Tensor, prob: bool):
    """The log-space production level (exact for any evidence)."""
    c = _production_consts(k, x.dtype, x.device)
    C, A, m, s = k.num_children, k.num_parents, k.num_rules, k.branching
    M = x.shape[1] // s
    g_rows = to_log(x, prob).view(C * s, M)
    g = g_rows.index_select(0, c.gather[0])
    for j in range(1, s):  # sums over siblings, one gathered term at a time (s is 2 or 4)
        g.add_(g_rows.index_select(0, c.gather[j]))
    g = g.view(A, m, M)
    if c.weights is not None:
        g.add_(c.log_weights)
    h_parent, rule_post = logsumexp_and_softmax(g, 1)  # rule_post[a, r] = p(r | a, evidence below)
    h_parent, shift = shift_to_max0(h_parent)
    if c.weights is None:
        shift = shift + c.log_weight
    return h_parent, False, shift, ProductionCache(rule_post, None)


@downward.register
def _(k: ProductionKernel, p: torch.Tensor, cache: ProductionCache) -> torch.Tensor:
    # p(child j = b) = sum_{a, r: rules[a, r, j] = b} p(a) p(r | a, below). Consumes the cache.
    c = _production_consts(k, p.dtype, p.device)
    rule_mass, total = cache.rule_mass, cache.total
    if total is None:
        scale = p
    else:  # p(r | a, below) = terms / total, total >= e^-SAFE_RANGE where positive: p / total cannot overflow
        scale = p / total.clamp_min_(_TINY[p.dtype])  # p = 0 where total = 0
    joint = rule_mass.mul_(scale.unsqueeze(1)).view(k.num_parents * k.num_rules, -1)
    child = torch.zeros(k.num_children * k.branching, joint.shape[1], dtype=p.dtype, device=p.device)
    for j in range(k.branching):  # scatter-add each rule's mass onto its j-th child's symbol
        child.index_add_(0, c.gather[j], joint)
    return child.view(k.num_children, -1)


@sample_down.register
def _(k: ProductionKernel, parents: torch.Tensor, cache: ProductionCache, u: torch.Tensor) -> torch.Tensor:
    rule_mass = cache.rule_mass  # p(r | a, below), possibly unnormalised: the inverse cdf takes any scale
    c = _production_consts(k, rule_mass.dtype, rule_mass.device)
    M = parents.shape[0]
    probs = rule_mass.gather(0, parents.view(1, 1, M).expand(1, k.num_rules, M)).squeeze(0).T  # (M, m)
    rule = inverse_cdf(probs, u)
    return c.rules[parents, rule].T.reshape(-1)  # (s, M): child j of column x at j * M + x


@draw_shape.register
def _(k: ProductionKernel, M: int) -> tuple[int, ...]:
    return (M, 1)  # one rule per parent column


# --------------------------------------------------------------------------- factorized
@upward.register
def _(k: FactorizedKernel, x: torch.Tensor, prob: bool):
    # q_j(a) = log sum_b T_j(a, b) exp(h_j(b)); h(a) = sum_j q_j(a). Each child's h has max 0, so
    # exp(h) cannot overflow and a matmul gives q exactly unless a row of T meets only children
    # entries far below their max. With a small spread no q can (fast path); otherwise a q below
    # REDO sends the level to an exact log-space sum.
    h = to_log(x, prob)
    t = _transitions(k, h.dtype, h.device)
    C, s = k.num_children, k.branching
    fast = decide(0, spread_of(h) + _log_inv_min_positive(k, t) <= SAFE_RANGE[h.dtype])
    hj = h.view(C, s, -1).transpose(0, 1)  # (s, C, M)
    u = hj.exp()
    q = torch.matmul(t, u)  # (s, A, M)
    if not fast and not decide(1, not bool((q < REDO).any())):
        log_q = log_matmul(torch.where(t > 0, t.log(), -math.inf), hj)  # exact log-space sum over b
    else:
        log_q = q.log()
    h_parent, shift = shift_to_max0(sum_dim(log_q, 0))
    return h_parent, False, shift, FactorizedCache(hj, log_q, u if fast else None, q if fast else None)


@downward.register
def _(k: FactorizedKernel, p: torch.Tensor, cache: FactorizedCache) -> torch.Tensor:
    # p(child j = b) ∝ exp(h_j(b)) sum_a T_j(a, b) p(a) / exp(q_j(a))
    hj, log_q = cache.child_log, cache.log_q
    t = _transitions(k, p.dtype, p.device)
    if cache.q is not None:  # every nonzero q is a normal float: plain products are exact (p = 0 wherever q = 0)
        u, q = cache.child_prob, cache.q
        child = torch.matmul(t.transpose(1, 2), p.unsqueeze(0) / q.clamp_min(_TINY[q.dtype])).mul_(u)  # (s, C, M)
        return child.transpose(0, 1).reshape(k.num_children, -1)
    pp = p.unsqueeze(0)  # in log space with a max shift over a
    log_r = torch.where((pp > 0) & (log_q > -math.inf), pp.log() - log_q, -math.inf)  # (s, A, M); p = 0 wherever q = 0
    mx = log_r.amax(1, keepdim=True)
    w = torch.matmul(t.transpose(1, 2), (log_r - finite_shift(mx)).exp_())  # (s, C, M)
    if not decide(0, not bool((w < REDO).any())):  # some b sees only terms far below the max over a: exact
        log_w = log_matmul(torch.where(t > 0, t.log(), -math.inf).transpose(1, 2), log_r)  # log-space sum
    else:
        log_w = w.log_() + mx
    logit = hj + log_w
    _, child = logsumexp_and_softmax(logit, 1)
    return child.transpose(0, 1).reshape(k.num_children, -1)


def log_matmul(log_t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``out[j, a, x] = logsumexp_b (log_t[j, a, b] + h[j, b, x])`` exactly, for ``(s, A, C)`` and ``(s, C, M)``.

    A loop over ``b`` (this is the rare exact path): temporaries of the output's size, never
    ``(s, A, C, M)``, and a fixed summation order per column.
    """
    C = log_t.shape[-1]
    lt = log_t.unsqueeze(-1)  # (s, A, C, 1)
    mx = lt[:, :, 0] + h[:, None, 0]  # (s, A, M)
    for b in range(1, C):
        torch.maximum(mx, lt[:, :, b] + h[:, None, b], out=mx)
    shift = finite_shift(mx)
    acc = torch.zeros_like(mx)
    for b in range(C):
        acc += (lt[:, :, b] + h[:, None, b]).sub_(shift).exp_()
    return acc.log_().add_(mx)


def _log_inv_min_positive(k: FactorizedKernel, t: torch.Tensor) -> float:
    """``-log`` of the smallest positive transition: how far below its row's scale a product term can start."""
    return _cached(k, ("min", t.dtype), t.device, lambda: float(-t[t > 0].min().log()))


@sample_down.register
def _(k: FactorizedKernel, parents: torch.Tensor, cache: FactorizedCache, u: torch.Tensor) -> torch.Tensor:
    hj = cache.child_log
    t = _transitions(k, hj.dtype, hj.device)
    logit = torch.where(t > 0, t.log(), -math.inf)[:, parents] + hj.transpose(1, 2)  # (s, M, C): T_j(a, b) exp(h_j(b))
    _, probs = logsumexp_and_softmax(logit, -1)
    return inverse_cdf(probs, u).reshape(-1)


@draw_shape.register
def _(k: FactorizedKernel, M: int) -> tuple[int, ...]:
    return (k.branching, M, 1)  # one symbol per child: child j of column x at j * M + x
