"""Opt-in compiled BP kernels (``torch.compile``): fused probability-space production levels.

Eager BP runs each level as a handful of torch ops, and every op is a pass over memory. On a
probability-space production level (the common case: soft or moderately hard evidence) this
module runs the whole level as one compiled kernel:

- leaves: the per-leaf max and shift, the spread bound and ``exp`` in one kernel;
- upward: gather the children of every rule, multiply, sum over rules, normalise per node, and
  the smallest positive parent entry (the next level's spread) in one pass. The way down keeps the
  children's messages and the sums over rules, not the ``(A, m, M)`` rule terms;
- downward: child ``j``'s marginal ``u_j(b) * sum_{(a, r): R_j(a, r) = b} w(a, r) P(a) / Z(a)
  * prod_{j' != j} u_j'(R_j'(a, r))``, with the rules of each ``(b, j)`` listed in advance.

These are the same sums as the eager path's (docs/bp.md), computed in another order, so the
results agree with the eager path to float rounding, not bit for bit. Only binary trees'
production levels are compiled (:func:`fusable`); log-space levels, factorized kernels, ``s > 2``
and sampling stay eager. The path choices (probability or log space) follow
the same spread bound.

Opt in with ``posterior(..., compiled=True)`` / ``log_evidence(..., compiled=True)`` or the
environment variable ``HDIFF_BP_COMPILE=1``. Nothing is compiled (or imported from
``torch._dynamo``) until the first compiled call; that call pays the compilation (about 5 to 60 s
on a CPU, less with inductor's on-disk cache warm), so it pays off only for long runs. If a
kernel fails to compile (no C++ compiler, no Triton for CUDA), a warning is issued and that kernel
runs eagerly, as plain torch code.
"""

from __future__ import annotations

import math
import os
import types
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from hdiff.bp.messages import _TINY, _cached, _production_consts, finite_shift
from hdiff.ghm.kernels import ProductionKernel

ENV = "HDIFF_BP_COMPILE"


def fusable(kernel) -> bool:
    """Whether a level of this kernel runs compiled (in probability space): production kernels of binary
    trees. With more children per node the fused downward kernel reads ``s`` rows per term for ``s``
    positions and is slower than the eager scatter-add (measured on B3 of ``benchmarks/bench_bp.py``),
    so those levels stay eager."""
    return isinstance(kernel, ProductionKernel) and kernel.branching == 2


def requested(flag: bool | None) -> bool:
    """``flag`` if given, else whether the environment variable ``HDIFF_BP_COMPILE`` is set to a true value."""
    if flag is not None:
        return bool(flag)
    return os.environ.get(ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


# ------------------------------------------------------------------------------ the kernels (plain torch)
def _leaf_kernel(t: torch.Tensor):
    """Leaf log-likelihoods as user rows ``(N, v, B)`` (leaf, symbol, batch) -> ``exp(h - max)`` ``(N, v, B)``,
    the per-leaf max ``(N, B)`` and the lowest finite shifted entry."""
    mx = t.amax(1)
    hs = t - finite_shift(mx).unsqueeze(1)
    low = torch.where(hs > -torch.inf, hs, 0.0).amin()
    return hs.exp(), mx, low


def _leaf_perm_kernel(x: torch.Tensor, view: tuple[int, ...], perm: tuple[int, ...]):
    """User leaf log-likelihoods ``(B, *leaf_shape, v)`` -> BP's internal order as ``(v, *digits, B)``:
    ``exp(h - max)``, the per-leaf max ``(*digits, B)`` and the lowest finite shifted entry.

    The internal order is a permutation of the axes of ``x.view(view)`` (the base-``s`` digits of the leaf
    index, reversed), so the transpose is fused with the max, the shift and the ``exp``, and runs in
    parallel (the eager blocked transpose does not). Compiled per batch size: with a dynamic batch
    size the strided reads were twice as slow. The outputs keep one axis per digit (flattening them
    outside is a view).
    """
    h = x.view(view).permute(perm)
    mx = h.amax(0)
    hs = h - finite_shift(mx)
    low = torch.where(hs > -torch.inf, hs, 0.0).amin()
    return hs.exp().contiguous(), mx.contiguous(), low


def _up_kernel(rows: torch.Tensor, gather: torch.Tensor, weights: torch.Tensor | None, A: int, P: int, m: int, s: int,
               log_scale: torch.Tensor, log_weight: float):
    """Children rows ``(R, W)`` in probability form -> parents ``u (A, P, W)``, the parents' log-scale
    ``(P*W,)`` float64, rule sums ``(A, P, W)``, smallest positive ``u``.

    ``log_scale`` ``(s*P*W,)``: the children's accumulated shifts; a parent's is theirs summed in order
    plus its own ``log(max) + log_weight`` (as :func:`hdiff.bp.propagation._upward` does eagerly).

    ``gather``: ``(s, m, A*P)`` rows of ``rows``: child ``j`` of rule ``r`` of parent symbol ``a`` at parent
    block ``p`` (BP's internal order: ``P = 1``, ``W = M``). ``weights``: ``(m, A, 1, 1)`` or None. The
    sums over children and rules are unrolled, so the compiler emits one pointwise loop over columns.
    """
    total = None
    for r in range(m):
        term = rows[gather[0, r]]
        for j in range(1, s):
            term = term * rows[gather[j, r]]
        term = term.view(A, P, -1)
        if weights is not None:
            term = term * weights[r]
        total = term if total is None else total + term
    mx = total.amax(0)
    u = total / mx.clamp_min(_TINY[rows.dtype])
    low = torch.where(u > 0, u, 1.0).amin()
    children = log_scale.view(s, -1)
    acc = children[0] + children[1]
    for j in range(2, s):
        acc = acc + children[j]
    acc = acc + (mx.view(-1).log() + log_weight).to(torch.float64)
    return u, acc, total, low


def _down_kernel(p: torch.Tensor, total: torch.Tensor, rows: torch.Tensor, scale_row: torch.Tensor,
                 sibling_rows: torch.Tensor, weight: torch.Tensor, s: int, K: int):
    """Parents' marginals ``P`` and rule sums ``Z`` ``(A, W)``, children rows ``(R, W)`` -> children's marginals,
    rows ``(R, W)`` (and ``P / Z``, returned so that it is computed once, not per use).

    ``scale_row``, ``weight``: ``(K, R)`` and ``(K, R, 1)``, ``sibling_rows``: ``(s - 1, K, R)``, unrolled
    over ``k`` (a row with fewer rules has zero weights).
    """
    scale = p / total.clamp_min(_TINY[p.dtype])  # p = 0 wherever total = 0
    acc = None
    for k in range(K):
        g = scale[scale_row[k]] * weight[k]
        for i in range(s - 1):
            g = g * rows[sibling_rows[i, k]]
        acc = g if acc is None else acc + g
    return rows * acc, scale


_PLAIN: dict[str, Callable] = {"leaf": _leaf_kernel, "leaf_perm": _leaf_perm_kernel, "up": _up_kernel,
                               "down": _down_kernel}
_COMPILED: dict[tuple, Callable] = {}
_STATIC = {"leaf_perm"}  # compiled for fixed shapes (its key holds the batch size): twice as fast as dynamic
_FAILED: list[str] = []  # why a kernel signature could not be compiled (it then runs eagerly)


def _kernel(name: str, key: tuple) -> Callable:
    """The compiled kernel for one static signature ``key`` (dtype, device, sizes other than the column count;
    the identity of a per-kernel table stands for the GHM kernel's sizes, dtype and device).

    Each signature gets its own copy of the function's code: dynamo keeps its compiled graphs (and its
    recompile limit) per code object, so a process that meets many GHMs or dtypes does not exhaust
    one shared limit. Within a signature only the column count changes: the first call compiles
    for its shape, the next shape once more with the column count dynamic.
    """
    fn = _COMPILED.get((name, key))
    if fn is None:
        plain = _PLAIN[name]
        copy = types.FunctionType(plain.__code__.replace(), plain.__globals__, plain.__name__, plain.__defaults__,
                                  plain.__closure__)
        fn = _COMPILED[(name, key)] = torch.compile(copy, dynamic=name not in _STATIC and None)
    return fn


def _call(name: str, key: tuple, *args):
    """Run kernel ``name``; ``key`` names its static signature (what fixes sizes other than the column count)."""
    key = (name, key)
    if key in _BROKEN:
        return _PLAIN[name](*args)
    try:
        return _kernel(*key)(*args)
    except Exception as err:  # noqa: BLE001  (no compiler, no Triton, an inductor bug: this kernel runs eagerly)
        out = _PLAIN[name](*args)  # an error of the arguments themselves raises here, as on the eager path
        _BROKEN.add(key)
        _FAILED.append(f"{name}: {type(err).__name__}: {err}")
        warnings.warn(f"hdiff.bp: torch.compile failed for the {name} kernel ({_FAILED[-1][:300]}); "
                      "running it eagerly", RuntimeWarning, stacklevel=3)
        return out


_BROKEN: set[tuple] = set()


# ------------------------------------------------------------------------------ per-kernel tables
@dataclass(frozen=True)
class _DownTables:
    scale_row: torch.Tensor  # (K, R): the row of P/Z (parent symbol a, parent block p) of the k-th rule of row rho
    sibling_rows: torch.Tensor  # (s - 1, K, R): rows of the other children of that rule
    weight: torch.Tensor  # (K, R, 1): the rule's weight (1 when weights are equal and left out), 0 for padding
    K: int
    key: tuple  # what the compiled kernel depends on besides the column count: shapes, dtype, device


def _rule_lists(k: ProductionKernel):
    """Per child row ``c*s + j`` (BP's internal order): the rules ``(a, r)`` that put ``c`` at position ``j``, as
    padded arrays ``a (C*s, K)``, sibling symbols ``(s - 1, C*s, K)`` and positions, weights ``(C*s, K)``."""
    import numpy as np

    A, m, s, C = k.num_parents, k.num_rules, k.branching, k.num_children
    rules = k.rules.cpu().numpy()
    w = k.weights.cpu().double().numpy()
    equal = bool((w == w.flat[0]).all())
    lists: list[list[tuple[int, int]]] = [[] for _ in range(C * s)]
    for a in range(A):
        for r in range(m):
            if w[a, r] > 0:
                for j in range(s):
                    lists[rules[a, r, j] * s + j].append((a, r))
    K = max(1, max(len(x) for x in lists))
    par = np.zeros((C * s, K), dtype=np.int64)
    sib_sym = np.zeros((max(s - 1, 1), C * s, K), dtype=np.int64)
    sib_pos = np.zeros((max(s - 1, 1), C * s, K), dtype=np.int64)
    wt = np.zeros((C * s, K))
    for row, entries in enumerate(lists):
        j = row % s
        for i, (a, r) in enumerate(entries):
            par[row, i] = a
            wt[row, i] = 1.0 if equal else w[a, r]
            for q, jj in enumerate(x for x in range(s) if x != j):
                sib_sym[q, row, i], sib_pos[q, row, i] = rules[a, r, jj], jj
    return par, sib_sym[: s - 1], sib_pos[: s - 1], wt, K


def _down_tables(k: ProductionKernel, dtype: torch.dtype, device: torch.device) -> _DownTables:
    """Tables of :func:`_down_kernel` for the children rows ``c*s + j`` of BP's internal order."""

    def build() -> _DownTables:
        s = k.branching
        par, sib_sym, sib_pos, wt, K = _rule_lists(k)
        sib = sib_sym * s + sib_pos
        return _DownTables(torch.as_tensor(par.T.copy(), device=device),
                           torch.as_tensor(sib.transpose(0, 2, 1).copy(), device=device),
                           torch.as_tensor(wt.T.copy(), device=device, dtype=dtype).unsqueeze(-1), K,
                           (par.shape, sib.shape, dtype, device, k.num_parents, s))

    return _cached(k, ("compiled-down", dtype), device, build)


def _up_tables(k: ProductionKernel, dtype: torch.dtype, device: torch.device
               ) -> tuple[torch.Tensor, torch.Tensor | None, tuple]:
    """``(s, m, A)`` gather rows (row ``c*s + j`` of the children), ``(m, A, 1, 1)`` weights (None when
    equal) for :func:`_up_kernel`, and the compiled kernel's signature (what it depends on besides the
    column count; levels with the same sizes share a kernel)."""
    import numpy as np

    c = _production_consts(k, dtype, device)
    A, m, s = k.num_parents, k.num_rules, k.branching

    def build():
        rules = k.rules.cpu().numpy()  # (A, m, s)
        gather = (rules * s + np.arange(s)).transpose(2, 1, 0)  # (s, m, A): row c*s + j
        weights = None if c.weights is None else c.weights.view(A, m).T.contiguous().view(m, A, 1, 1)
        log_weight = c.log_weight if c.weights is None else 0.0  # equal weights were left out of the sums
        key = (A, m, s, k.num_children, weights is None, log_weight, dtype, device)
        return torch.as_tensor(np.ascontiguousarray(gather), device=device), weights, key

    return _cached(k, ("compiled-up", dtype), device, build)


# ------------------------------------------------------------------------------ what propagation calls
class CompiledCache:
    """A compiled production level's cache: the children rows ``(C*s, M)`` in probability form and the sums
    over rules ``(A, M)``."""

    __slots__ = ("children", "total")

    def __init__(self, children: torch.Tensor, total: torch.Tensor) -> None:
        self.children, self.total = children, total


def leaves(x: torch.Tensor, layout: str, s: int, depth: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """User leaf evidence ``(B, *leaf_shape, v)`` -> (``exp`` of the shifted leaves ``(v, N*B)`` and the per-leaf
    max ``(N*B,)``, both in BP's internal order, and their spread in nats).

    Sequence layouts: one compiled kernel that also transposes into BP's order (an axis permutation).
    Otherwise a blocked transpose to rows ``(leaf, symbol)`` over the batch (eager), one compiled pass
    (max, shift, spread, ``exp``), then a row gather into BP's order. (Reading the user's rows straight
    from the first level's kernel, and writing the last level's marginals in them, measured no faster:
    the kernels' short per-row gathers lose what the skipped conversions save.)
    """
    from hdiff.bp._order import _rows

    B, v = x.shape[0], x.shape[-1]
    N = s**depth
    if layout == "sequence":  # BP's order is the leaf index's digits reversed: an axis permutation
        view, perm = (B, *[s] * depth, v), (depth + 1, *range(depth, 0, -1), 0)
        u, mx, low = _call("leaf_perm", (B, s, depth, v, x.dtype, x.device), x, view, perm)
        return u.view(v, -1), mx.view(-1), -float(low)
    t = x.reshape(B, N * v).T.contiguous().view(N, v, B)
    u, mx, low = _call("leaf", (t.shape[:-1], t.dtype, t.device), t)
    u = u.view(N * v, B).index_select(0, _rows(layout, s, depth, v, x.device, False)).view(v, -1)
    mx = mx.index_select(0, _rows(layout, s, depth, 1, x.device, False)).view(-1)
    return u, mx, -float(low)


def spread_of_prob_low(low: torch.Tensor) -> float:
    """Spread (nats) of a probability-form level whose smallest positive entry is ``low``."""
    low = float(low)
    return -math.log(low) if low > 0 else 0.0


def up(k: ProductionKernel, x: torch.Tensor, log_scale: torch.Tensor):
    """A probability-space production level (the caller checked the spread bound), ``x`` ``(C, s*M)`` in
    probability form, ``log_scale`` ``(s*M,)`` the children's accumulated shifts (float64). Returns
    ``(u_parent (A, M), the parents' log_scale (M,), cache, spread of u_parent)``."""
    c = _production_consts(k, x.dtype, x.device)
    gather, weights, key = _up_tables(k, x.dtype, x.device)
    A = k.num_parents
    rows = x.view(k.num_children * k.branching, -1)
    log_weight = c.log_weight if c.weights is None else 0.0  # equal weights were left out of the sums
    u, log_scale, total, low = _call("up", key, rows, gather, weights, A, 1, k.num_rules, k.branching, log_scale,
                                     log_weight)
    return u.view(A, -1), log_scale, CompiledCache(rows, total.view(A, -1)), spread_of_prob_low(low)


def down(k: ProductionKernel, p: torch.Tensor, cache: CompiledCache) -> torch.Tensor:
    """Parents' marginals ``(A, M)`` -> children's ``(C, s*M)``."""
    t = _down_tables(k, p.dtype, p.device)
    out, _ = _call("down", t.key, p, cache.total, cache.children, t.scale_row, t.sibling_rows, t.weight, k.branching,
                   t.K)
    return out.view(k.num_children, -1)
