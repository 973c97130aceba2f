"""Exact batched belief propagation on a GHM: marginals, log-evidence, joint posterior samples.

Evidence is a per-leaf log-likelihood ``log p(obs_i | x0_i = b)``, shape ``(B, *leaf_shape, v)``
(``-inf`` = hard evidence that excludes ``b``). The upward pass (leaves to root) computes every
node's inside message ``log p(evidence below | symbol)``, shifted to max 0 per node with the
shifts summed (in float64) into the log-evidence; the downward pass turns the root posterior into every
node's posterior marginal (docs/bp.md). The only Python loop is
over levels; everything is vectorised over batch and nodes (see :mod:`hdiff.bp._order` for the
memory layout) and runs on whatever device the evidence is on.

Impossible evidence (probability 0 under the GHM) gives ``log_evidence = -inf``; the marginals
of such a row are then defined as **uniform** (they are 0/0 mathematically), never NaN, and
:func:`sample_posterior` raises. Cost: ``O(B * nodes * A * m * s)`` for production kernels,
``O(B * nodes * s * A * C)`` for factorized ones.

Memory is bounded: a batch whose estimated working memory (:func:`row_bytes` per row, from the
level sizes) exceeds ``max_bytes`` (default :data:`DEFAULT_MAX_BYTES`, 1 GiB) runs in chunks of
rows, with results bit-identical to one unchunked call (docs/bp.md, "Memory: chunking").
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch

from hdiff.bp import compiled as fused
from hdiff.bp import messages
from hdiff.bp._order import from_internal, to_internal, tokens_from_internal
from hdiff.bp.messages import (decide, downward, draw_shape, finite_shift, logsumexp_and_softmax,
                                production_prob_ok, production_up_log, sample_down, sum_dim, to_log, upward)
from hdiff.ghm._random import inverse_cdf
from hdiff.ghm.kernels import ProductionKernel
from hdiff.ghm.model import GHM

#: working-memory budget of one BP call (bytes) when the caller passes ``max_bytes=None``; a batch
#: whose estimate (:func:`row_bytes` times its rows) exceeds it runs in chunks of rows. The
#: environment variable ``HDIFF_BP_MAX_BYTES`` overrides it at import.
DEFAULT_MAX_BYTES: int = int(float(os.environ.get("HDIFF_BP_MAX_BYTES", 1 << 30)))


@dataclass
class BPResult:
    """Output of :func:`posterior`.

    Attributes:
        leaf_marginals: ``(B, *leaf_shape, v)``, ``p(x0_i = b | evidence)``.
        log_evidence: ``(B,)``, ``log p(evidence) = log sum_x p(x) prod_i lik_i(x_i)``.
        root_marginals: ``(B, num_classes)``, ``p(root = c | evidence)``.
        level_marginals: with ``levels=True``, ``depth + 1`` tensors, root first, level ``l`` of
            shape ``(B, *level_shape(l), symbols(l))``; else ``None``.
    """

    leaf_marginals: torch.Tensor
    log_evidence: torch.Tensor
    root_marginals: torch.Tensor
    level_marginals: list[torch.Tensor] | None = None


def _check_evidence(ghm: GHM, leaf_log_lik: torch.Tensor) -> torch.Tensor:
    if not isinstance(leaf_log_lik, torch.Tensor) or not leaf_log_lik.is_floating_point():
        raise ValueError(f"leaf_log_lik must be a floating-point tensor of shape (B, *{ghm.leaf_shape}, {ghm.vocab_size})")
    expected = (*ghm.leaf_shape, ghm.vocab_size)
    if leaf_log_lik.ndim != len(expected) + 1 or tuple(leaf_log_lik.shape[1:]) != expected:
        raise ValueError(f"leaf_log_lik must have shape (B, *{expected}), got {tuple(leaf_log_lik.shape)}")
    if leaf_log_lik.device.type == "meta":
        raise ValueError("leaf_log_lik is on the meta device (a shape without data); BP needs its values: "
                         "pass a CPU or CUDA tensor")
    if leaf_log_lik.dtype not in (torch.float32, torch.float64):
        leaf_log_lik = leaf_log_lik.float()  # half precision cannot hold the message scales
    return leaf_log_lik


# ------------------------------------------------------------------------------ memory and chunks
def row_bytes(ghm: GHM, dtype: torch.dtype = torch.float32, *, levels: bool = False) -> int:
    """Estimated working memory (bytes) of one batch row in a BP call, from the level sizes alone.

    Counts what a call holds at its peak: every level's cache for the way down (the larger of the
    eager and the compiled form), the largest level's temporaries (gathered rule terms, parents,
    children; for factorized levels the matmul operands and the blocked log-space sums), the
    evidence in BP's order, and with ``levels`` every level's marginals (or upward messages).
    The caller's input and the returned tensors are not counted.
    """
    item = torch.empty((), dtype=dtype).element_size()
    s = ghm.branching
    leaves = ghm.num_leaves * ghm.vocab_size
    cache, peak, kept = 0, 3 * leaves, leaves  # evidence transposed + internal copy + leaf marginals
    for level, k in enumerate(ghm.kernels):
        n = s**level  # parents at this level
        A, C = k.num_parents, k.num_children
        if isinstance(k, ProductionKernel):
            m = k.num_rules
            cache += max(A * m + A, s * C + A) * n
            work = (2 * A * m + 2 * A + 2 * s * C) * n
        else:
            cache += s * (2 * C + 2 * A) * n
            work = s * (4 * A + 4 * C) * n
        peak = max(peak, work)
        kept += s * C * n
    return item * (cache + peak + (kept if levels else 0))


def _rows_per_chunk(per_row: int, max_bytes: int | float | None) -> int:
    budget = DEFAULT_MAX_BYTES if max_bytes is None else max_bytes
    if not budget > 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    if budget == float("inf"):
        return 1 << 62
    return max(1, int(budget // max(per_row, 1)))


class _Restart(Exception):
    """A chunk needs the exact path where earlier chunks took the fast one: every chunk runs again."""


class _Plan:
    """Makes every chunk take the path choices (messages.decide) one unchunked call would take.

    Unchunked, a level takes its fast path iff the whole batch allows it. A chunk knows only its own
    rows, so the plan records each choice (keyed by pass, level and index, in processing order) as
    the chunks make it: a chunk that cannot take a fast path the earlier chunks took forces the exact
    path there, forgets the later choices (they were made on messages that change) and restarts
    the chunks; a chunk that could take a fast path the earlier ones could not follows them. Each
    restart moves the forced set up in lexicographic order, so this ends; with homogeneous
    evidence there is no restart. Since every operation acts on each batch column alone, every
    chunk then computes exactly the numbers of the unchunked call.
    """

    def __init__(self) -> None:
        self.forced: set[tuple[int, int, int]] = set()
        self.agreed: dict[tuple[int, int, int], bool] = {}
        self.where = (0, 0)

    def take(self, index: int, fast_ok: bool) -> bool:
        key = (*self.where, index)
        if key in self.forced:
            return False
        prev = self.agreed.setdefault(key, fast_ok)
        if prev and not fast_ok:
            self.forced = {k for k in self.forced if k < key} | {key}
            self.agreed = {}
            raise _Restart
        if fast_ok and not prev:
            self.forced.add(key)
            return False
        return fast_ok


def _at(plan: _Plan | None, phase: int, step: int) -> None:
    if plan is not None:
        plan.where = (phase, step)


def _chunked(ll: torch.Tensor, per_row: int, max_bytes, run: Callable[[int, int, _Plan | None], list[torch.Tensor]]
             ) -> list[torch.Tensor]:
    """``run(start, stop, plan)`` on row chunks whose estimated memory fits ``max_bytes``, outputs batch-first."""
    B = ll.shape[0]
    rows = _rows_per_chunk(per_row, max_bytes)
    if rows >= B:
        return run(0, B, None)
    plan = _Plan()
    token = messages.DECIDER.set(plan.take)
    try:
        while True:
            out: list[torch.Tensor] | None = None
            try:
                for start in range(0, B, rows):
                    stop = min(B, start + rows)
                    part = run(start, stop, plan)
                    if out is None:
                        out = [t.new_empty((B, *t.shape[1:])) for t in part]
                    for o, t in zip(out, part):
                        o[start:stop].copy_(t)
                    del part  # not alive while the next chunk runs
                return out  # type: ignore[return-value]
            except _Restart:
                continue
    finally:
        messages.DECIDER.reset(token)


# ------------------------------------------------------------------------------ passes
def _upward(ghm: GHM, leaf_log_lik: torch.Tensor, keep: list | None = None, plan: _Plan | None = None,
            compiled: bool = False):
    """Inside pass on checked evidence. Returns the root posterior ``(num_classes, B)``, log-evidence ``(B,)``
    and caches.

    With ``keep`` (a list), appends every level's inside log-messages in internal order, leaves first.
    With ``compiled``, probability-space production levels run as fused compiled kernels
    (:mod:`hdiff.bp.compiled`).
    """
    B = leaf_log_lik.shape[0]
    # nothing to fuse in an empty batch (reductions over it have no identity); keep wants the log messages
    compiled = compiled and B > 0 and keep is None
    fused_leaves = None
    if compiled and fused.fusable(ghm.kernels[-1]):
        fused_leaves = fused.leaves(leaf_log_lik, ghm.layout, ghm.branching, ghm.depth)
    spread = None  # the spread of h when a compiled kernel measured it on the way
    if fused_leaves is not None:  # exp of the shifted leaves, in internal order; h only if log space needs it
        leaf_u, mx, spread = fused_leaves
        h = leaf_log_lik  # placeholder with the right dtype and device until a level needs the log form
    else:
        # to internal order first: the per-leaf max is then a reduction over rows (fast), not over a short last dim
        h = to_internal(leaf_log_lik, ghm.layout, ghm.branching, ghm.depth)  # (v, leaves * B)
        mx = h.amax(0)  # NaN and +inf propagate into the max: one pass checks both
    top = mx.max() if mx.numel() else mx.new_zeros(())  # B = 0 runs through with empty tensors
    if torch.isnan(top):
        raise ValueError("leaf_log_lik contains NaN")
    if top == torch.inf:
        raise ValueError("leaf_log_lik contains +inf (log-likelihoods must be < +inf)")
    # The shifts are summed per batch row in float64 (they can be large and of both signs), up the tree:
    # each node's total is its own shift plus its children's totals, in a fixed order, so a row's sum
    # never depends on the other rows (torch.sum's order depends on the shape: chunks must not change it).
    log_scale = mx.to(torch.float64)
    leaf_pending = fused_leaves is not None  # the leaves' log form is not built yet; leaf_u holds their exp

    def leaf_log() -> torch.Tensor:
        return to_internal(leaf_log_lik, ghm.layout, ghm.branching, ghm.depth).sub_(finite_shift(mx))

    if not leaf_pending:
        h.sub_(finite_shift(mx))  # each leaf's largest entry becomes 0
    caches = [None] * ghm.depth
    prob = False  # h's form: log (max 0 per node) or probability (max 1 per node), as each level chooses
    for step, level in enumerate(reversed(range(ghm.depth))):
        k = ghm.kernels[level]
        _at(plan, 0, step)
        if compiled and fused.fusable(k):
            if decide(0, production_prob_ok(k, h, prob, spread)):
                x = leaf_u if leaf_pending else (h if prob else h.exp_())
                h, log_scale, caches[level], spread = fused.up(k, x, log_scale)  # log_scale updated inside
                prob, leaf_pending = True, False
                continue
            h, prob, shift, caches[level] = production_up_log(k, leaf_log() if leaf_pending else h, prob)
            spread, leaf_pending = None, False
        else:
            if leaf_pending:
                h, leaf_pending = leaf_log(), False
            if keep is not None:
                keep.append(to_log(h, prob).clone())
            h, prob, shift, caches[level] = upward(k, h, prob)
            spread = None
        log_scale = sum_dim(log_scale.view(ghm.branching, -1), 0).add_(shift)
    h = to_log(h, prob)
    if keep is not None:
        keep.append(h.clone())
    prior = ghm.root_prior.to(device=h.device, dtype=h.dtype)
    logits = h + torch.where(prior > 0, prior.log(), -torch.inf).unsqueeze(1)  # (num_classes, B)
    lse, root = logsumexp_and_softmax(logits, 0)
    return root, (log_scale + lse).to(h.dtype), caches


def upward_messages(ghm: GHM, leaf_log_lik: torch.Tensor, *, max_bytes: int | None = None) -> list[torch.Tensor]:
    """Every node's inside message ``log p(evidence below the node | symbol)``, shifted to max 0 per node.

    These are the upward (leaf-to-root) messages of BP, the quantities an encoder level of a U-Net
    would compute (Mei 2024); used by the message probes of :mod:`hdiff.metrics.message_probes`.

    Args:
        ghm: the model.
        leaf_log_lik: ``(B, *leaf_shape, v)`` leaf log-likelihoods.
        max_bytes: working-memory budget (see :func:`posterior`).

    Returns:
        ``depth + 1`` tensors, root first: level ``l`` is ``(B, *level_shape(l), symbols(l))``
        (``-inf`` for a symbol the evidence below rules out; a row whose evidence is impossible
        may be all ``-inf``).
    """
    leaf_log_lik = _check_evidence(ghm, leaf_log_lik)

    def run(start: int, stop: int, plan: _Plan | None) -> list[torch.Tensor]:
        keep: list[torch.Tensor] = []
        _upward(ghm, leaf_log_lik[start:stop], keep, plan)
        out = [from_internal(h, ghm.level_shape(level), ghm.layout, ghm.branching, level)
               for level, h in zip(range(ghm.depth, -1, -1), keep)]
        return out[::-1]

    return _chunked(leaf_log_lik, row_bytes(ghm, leaf_log_lik.dtype, levels=True), max_bytes, run)


def log_evidence(ghm: GHM, leaf_log_lik: torch.Tensor, *, max_bytes: int | None = None,
                 compiled: bool | None = None) -> torch.Tensor:
    """``log p(evidence)`` ``(B,)`` from the upward pass alone (cheaper than :func:`posterior`).

    ``max_bytes`` and ``compiled``: as in :func:`posterior`.
    """
    leaf_log_lik = _check_evidence(ghm, leaf_log_lik)
    use_compiled = fused.requested(compiled)

    def run(start: int, stop: int, plan: _Plan | None) -> list[torch.Tensor]:
        return [_upward(ghm, leaf_log_lik[start:stop], plan=plan, compiled=use_compiled)[1]]

    return _chunked(leaf_log_lik, row_bytes(ghm, leaf_log_lik.dtype), max_bytes, run)[0]


def _posterior_rows(ghm: GHM, leaf_log_lik: torch.Tensor, levels: bool, plan: _Plan | None,
                    compiled: bool = False) -> list[torch.Tensor]:
    """[leaf marginals, log-evidence, root marginals, *level marginals] of checked evidence (one chunk)."""
    root, log_ev, caches = _upward(ghm, leaf_log_lik, plan=plan, compiled=compiled)
    B = root.shape[1]
    possible = torch.isfinite(log_ev)
    p = root
    per_level = [p]
    for level in range(ghm.depth):
        _at(plan, 1, level)
        cache = caches[level]
        if isinstance(cache, fused.CompiledCache):
            p = fused.down(ghm.kernels[level], p, cache)
        else:
            p = downward(ghm.kernels[level], p, cache)
        del cache
        caches[level] = None  # consumed: free it as soon as possible
        if levels or level == ghm.depth - 1:
            per_level.append(p)

    all_possible = bool(possible.all())

    def user(q: torch.Tensor, level: int) -> torch.Tensor:
        out = from_internal(q, ghm.level_shape(level), ghm.layout, ghm.branching, level)
        if all_possible:
            return out
        return torch.where(possible.view(-1, *[1] * (out.ndim - 1)), out, 1.0 / out.shape[-1])

    leaf = user(per_level[-1], ghm.depth)
    level_marginals = [user(q, l) for l, q in enumerate(per_level)] if levels else []
    root_marginals = user(root, 0).view(B, ghm.num_classes)
    return [leaf, log_ev, root_marginals, *level_marginals]


def posterior(ghm: GHM, leaf_log_lik: torch.Tensor, *, levels: bool = False, max_bytes: int | None = None,
              compiled: bool | None = None) -> BPResult:
    """Exact posterior marginals and log-evidence by belief propagation.

    Args:
        ghm: the model.
        leaf_log_lik: ``(B, *leaf_shape, v)`` float32/float64 leaf log-likelihoods
            ``log p(obs_i | x0_i = b)`` (any per-leaf constant is allowed; ``-inf`` excludes ``b``).
        levels: also return every level's marginals.
        max_bytes: working-memory budget in bytes (None: :data:`DEFAULT_MAX_BYTES`, 1 GiB). A batch
            whose estimate (:func:`row_bytes` per row) exceeds it runs in chunks of rows; the results
            are those of an unchunked call (bit-identical for production kernels; see docs/bp.md).
            Pass ``float("inf")`` never to chunk.
        compiled: run probability-space production levels as fused ``torch.compile`` kernels
            (:mod:`hdiff.bp.compiled`; None: the environment variable ``HDIFF_BP_COMPILE``). The
            first call compiles (seconds to a minute), so this pays off only in long runs; the
            results agree with the eager path to float rounding.

    Returns:
        :class:`BPResult`, in the evidence's dtype and device. Rows with impossible evidence have
        ``log_evidence = -inf`` and uniform marginals.

    Raises:
        ValueError: wrong shape or dtype, NaN or ``+inf`` in ``leaf_log_lik``.
    """
    leaf_log_lik = _check_evidence(ghm, leaf_log_lik)
    use_compiled = fused.requested(compiled)

    def run(start: int, stop: int, plan: _Plan | None) -> list[torch.Tensor]:
        return _posterior_rows(ghm, leaf_log_lik[start:stop], levels, plan, use_compiled)

    out = _chunked(leaf_log_lik, row_bytes(ghm, leaf_log_lik.dtype, levels=levels), max_bytes, run)
    return BPResult(out[0], out[1], out[2], out[3:] if levels else None)


def sample_posterior(ghm: GHM, leaf_log_lik: torch.Tensor, *, generator: torch.Generator | None = None,
                     return_tree: bool = False, max_bytes: int | None = None
                     ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
    """Draw ``x0`` jointly from ``p(x0 | evidence)``, one sample per batch row.

    Top-down from the upward messages (docs/bp.md, "Exact joint posterior sampling"): the root from its
    posterior, then each node's rule (or each child) given its drawn symbol and the evidence below.

    Args:
        ghm: the model.
        leaf_log_lik: ``(B, *leaf_shape, v)`` as in :func:`posterior`.
        generator: torch RNG on the evidence's device.
        return_tree: also return every level's sampled symbols (root first).
        max_bytes: working-memory budget (see :func:`posterior`). Chunking does not change the
            samples: the generator is consumed as by an unchunked call (one uniform per draw, level
            by level from the root, each level's draws in BP's node order for the whole batch), so
            a chunked call draws every level's uniforms up front (about ``2 * leaves * B`` numbers)
            and gives each chunk its rows.

    Returns:
        tokens ``(B, *leaf_shape)`` long (and the levels, as in :meth:`GHM.sample`).

    Raises:
        ValueError: for invalid evidence, or a row whose evidence is impossible (a chunked call may
            have advanced the generator when it raises).
    """
    leaf_log_lik = _check_evidence(ghm, leaf_log_lik)
    B, dtype, device = leaf_log_lik.shape[0], leaf_log_lik.dtype, leaf_log_lik.device
    s = ghm.branching
    per_row = row_bytes(ghm, dtype, levels=return_tree)
    pre: list[torch.Tensor] | None = None
    if _rows_per_chunk(per_row, max_bytes) < B:  # the whole batch's uniforms, in the unchunked call's order
        pre = [torch.rand((B, 1), generator=generator, dtype=dtype, device=device)]
        pre += [torch.rand(draw_shape(k, s**level * B), generator=generator, dtype=dtype, device=device)
                for level, k in enumerate(ghm.kernels)]

    def uniforms(i: int, shape: tuple[int, ...], start: int, stop: int) -> torch.Tensor:
        if pre is None:
            return torch.rand(shape, generator=generator, dtype=dtype, device=device)
        u = pre[i]  # (*lead, nodes * B, 1) -> this chunk's columns (*lead, nodes * rows, 1)
        nodes = u.shape[-2] // B
        return u.view(*u.shape[:-2], nodes, B, 1)[..., start:stop, :].reshape(shape)

    def run(start: int, stop: int, plan: _Plan | None) -> list[torch.Tensor]:
        root, log_ev, caches = _upward(ghm, leaf_log_lik[start:stop], plan=plan)
        if not bool(torch.isfinite(log_ev).all()):
            bad = (start + torch.nonzero(~torch.isfinite(log_ev)).flatten()[:5]).tolist()
            raise ValueError(f"leaf_log_lik: evidence is impossible under the GHM for rows {bad} (log_evidence = -inf)")
        rows = stop - start
        nodes = inverse_cdf(root.T, uniforms(0, (rows, 1), start, stop))  # (rows,)
        tree = [nodes]
        for level in range(ghm.depth):
            k = ghm.kernels[level]
            u = uniforms(level + 1, draw_shape(k, nodes.shape[0]), start, stop)
            nodes = sample_down(k, nodes, caches[level], u)
            caches[level] = None
            tree.append(nodes)
        if not return_tree:
            return [tokens_from_internal(nodes, ghm.leaf_shape, ghm.layout, ghm.branching, ghm.depth)]
        return [tokens_from_internal(x, ghm.level_shape(l), ghm.layout, ghm.branching, l) for l, x in enumerate(tree)]

    out = _chunked(leaf_log_lik, per_row, max_bytes, run)
    if not return_tree:
        return out[0]
    return out[-1], out
