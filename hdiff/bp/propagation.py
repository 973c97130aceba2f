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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hdiff.bp._order import from_internal, to_internal, tokens_from_internal
from hdiff.bp.messages import downward, finite_shift, logsumexp_and_softmax, sample_down, to_log, upward
from hdiff.ghm._random import categorical
from hdiff.ghm.model import GHM


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


def _upward(ghm: GHM, leaf_log_lik: torch.Tensor, keep: list | None = None):
    """Inside pass. Returns the root posterior ``(B, num_classes)``, log-evidence ``(B,)`` and caches.

    With ``keep`` (a list), appends every level's inside log-messages in internal order, leaves first.
    """
    leaf_log_lik = _check_evidence(ghm, leaf_log_lik)
    B = leaf_log_lik.shape[0]
    # to internal order first: the per-leaf max is then a reduction over rows (fast), not over a short last dim
    h = to_internal(leaf_log_lik, ghm.layout, ghm.branching, ghm.depth)  # (v, leaves * B)
    mx = h.amax(0)  # NaN and +inf propagate into the max: one pass checks both
    top = mx.max() if mx.numel() else mx.new_zeros(())  # B = 0 runs through with empty tensors
    if torch.isnan(top):
        raise ValueError("leaf_log_lik contains NaN")
    if top == torch.inf:
        raise ValueError("leaf_log_lik contains +inf (log-likelihoods must be < +inf)")
    log_scale = mx.view(ghm.num_leaves, B).sum(0, dtype=torch.float64)  # float64: the shifts can be large and of both signs
    h.sub_(finite_shift(mx))  # each leaf's largest entry becomes 0
    caches = [None] * ghm.depth
    prob = False  # h's form: log (max 0 per node) or probability (max 1 per node), as each level chooses
    for level in reversed(range(ghm.depth)):
        if keep is not None:
            keep.append(to_log(h, prob).clone())
        h, prob, shift, caches[level] = upward(ghm.kernels[level], h, prob)
        log_scale += shift.view(ghm.branching**level, B).sum(0, dtype=torch.float64)
    h = to_log(h, prob)
    if keep is not None:
        keep.append(h.clone())
    prior = ghm.root_prior.to(device=h.device, dtype=h.dtype)
    logits = h + torch.where(prior > 0, prior.log(), -torch.inf).unsqueeze(1)  # (num_classes, B)
    lse, root = logsumexp_and_softmax(logits, 0)
    return root, (log_scale + lse).to(h.dtype), caches


def upward_messages(ghm: GHM, leaf_log_lik: torch.Tensor) -> list[torch.Tensor]:
    """Every node's inside message ``log p(evidence below the node | symbol)``, shifted to max 0 per node.

    These are the upward (leaf-to-root) messages of BP, the quantities an encoder level of a U-Net
    would compute (Mei 2024); used by the message probes of :mod:`hdiff.metrics.message_probes`.

    Args:
        ghm: the model.
        leaf_log_lik: ``(B, *leaf_shape, v)`` leaf log-likelihoods.

    Returns:
        ``depth + 1`` tensors, root first: level ``l`` is ``(B, *level_shape(l), symbols(l))``
        (``-inf`` for a symbol the evidence below rules out; a row whose evidence is impossible
        may be all ``-inf``).
    """
    keep: list[torch.Tensor] = []
    _upward(ghm, leaf_log_lik, keep)
    out = []
    for level, h in zip(range(ghm.depth, -1, -1), keep):
        out.append(from_internal(h, ghm.level_shape(level), ghm.layout, ghm.branching, level))
    return out[::-1]


def log_evidence(ghm: GHM, leaf_log_lik: torch.Tensor) -> torch.Tensor:
    """``log p(evidence)`` ``(B,)`` from the upward pass alone (cheaper than :func:`posterior`)."""
    return _upward(ghm, leaf_log_lik)[1]


def posterior(ghm: GHM, leaf_log_lik: torch.Tensor, *, levels: bool = False) -> BPResult:
    """Exact posterior marginals and log-evidence by belief propagation.

    Args:
        ghm: the model.
        leaf_log_lik: ``(B, *leaf_shape, v)`` float32/float64 leaf log-likelihoods
            ``log p(obs_i | x0_i = b)`` (any per-leaf constant is allowed; ``-inf`` excludes ``b``).
        levels: also return every level's marginals.

    Returns:
        :class:`BPResult`, in the evidence's dtype and device. Rows with impossible evidence have
        ``log_evidence = -inf`` and uniform marginals.

    Raises:
        ValueError: wrong shape or dtype, NaN or ``+inf`` in ``leaf_log_lik``.
    """
    root, log_ev, caches = _upward(ghm, leaf_log_lik)
    B = root.shape[1]
    possible = torch.isfinite(log_ev)
    p = root
    per_level = [p]
    for level in range(ghm.depth):
        p = downward(ghm.kernels[level], p, caches[level])
        if levels or level == ghm.depth - 1:
            per_level.append(p)

    all_possible = bool(possible.all())

    def user(q: torch.Tensor, level: int) -> torch.Tensor:
        out = from_internal(q, ghm.level_shape(level), ghm.layout, ghm.branching, level)
        if all_possible:
            return out
        return torch.where(possible.view(-1, *[1] * (out.ndim - 1)), out, 1.0 / out.shape[-1])

    leaf = user(per_level[-1], ghm.depth)
    level_marginals = [user(q, l) for l, q in enumerate(per_level)] if levels else None
    root_marginals = user(root, 0).view(B, ghm.num_classes)
    return BPResult(leaf, log_ev, root_marginals, level_marginals)


def sample_posterior(ghm: GHM, leaf_log_lik: torch.Tensor, *, generator: torch.Generator | None = None,
                     return_tree: bool = False) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
    """Draw ``x0`` jointly from ``p(x0 | evidence)``, one sample per batch row.

    Top-down from the upward messages (docs/bp.md, "Exact joint posterior sampling"): the root from its
    posterior, then each node's rule (or each child) given its drawn symbol and the evidence below.

    Args:
        ghm: the model.
        leaf_log_lik: ``(B, *leaf_shape, v)`` as in :func:`posterior`.
        generator: torch RNG on the evidence's device.
        return_tree: also return every level's sampled symbols (root first).

    Returns:
        tokens ``(B, *leaf_shape)`` long (and the levels, as in :meth:`GHM.sample`).

    Raises:
        ValueError: for invalid evidence, or a row whose evidence is impossible.
    """
    root, log_ev, caches = _upward(ghm, leaf_log_lik)
    if not bool(torch.isfinite(log_ev).all()):
        bad = torch.nonzero(~torch.isfinite(log_ev)).flatten()[:5].tolist()
        raise ValueError(f"leaf_log_lik: evidence is impossible under the GHM for rows {bad} (log_evidence = -inf)")
    nodes = categorical(root.T, generator=generator)  # (B,)
    tree = [nodes]
    for level in range(ghm.depth):
        nodes = sample_down(ghm.kernels[level], nodes, caches[level], generator)
        tree.append(nodes)
    if not return_tree:
        return tokens_from_internal(nodes, ghm.leaf_shape, ghm.layout, ghm.branching, ghm.depth)
    tree = [tokens_from_internal(x, ghm.level_shape(l), ghm.layout, ghm.branching, l) for l, x in enumerate(tree)]
    return tree[-1], tree
