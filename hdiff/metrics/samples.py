"""Sample-quality metrics as a torchmetrics ``Metric``.

:class:`SampleQuality` scores generated leaves under the true GHM (docs/metrics.md):
exact log-likelihood, validity, per-level validity (coherence up to scale ``s**l``, the measure of
Favero et al. 2025), memorisation of a training set, novelty, diversity, the root-class histogram
vs the prior, and the leaf-token marginals vs the exact ones. It is device-agnostic and mergeable
across processes (its state is concatenated by torchmetrics' ``dist_reduce_fx``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torchmetrics import Metric

from hdiff.bp import posterior
from hdiff.ghm import GHM, ProductionKernel
from hdiff.ghm.layout import to_tree_order
from hdiff.tokens import row_keys


def derivable_symbols(ghm: GHM, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Which symbols each node could hold, given only the leaves below it.

    A boolean upward pass (BP with hard evidence, reduced to supports): a node can be ``a`` iff
    some rule of ``a`` with positive weight (production kernels) / some child symbol with positive
    transition probability for every child (factorized kernels) is consistent with its subtree.

    Args:
        ghm: the model.
        tokens: ``(B, *leaf_shape)`` leaves in ``[0, v)``.

    Returns:
        One bool tensor per level, root first: level ``l`` is ``(B, s**l, symbols(l))`` in tree
        order. The root level also requires ``root_prior[a] > 0``, so ``out[0].any(-1)`` is
        exactly ``ghm.log_prob(tokens) > -inf``.
    """
    ghm.check_tokens(tokens, "tokens")
    leaves = to_tree_order(tokens.to(ghm.device), ghm.layout, ghm.depth).reshape(tokens.shape[0], -1)
    can = torch.nn.functional.one_hot(leaves.long(), ghm.vocab_size).bool()  # (B, N_L, v)
    levels = [can]
    s = ghm.branching
    for kernel in reversed(ghm.kernels):
        B, n = can.shape[:2]
        kids = can.view(B, n // s, s, -1)  # (B, N_p, s, V_child)
        if isinstance(kernel, ProductionKernel):
            ok = kernel.weights > 0  # (P, R)
            for j in range(s):  # the rule's j-th child must be possible at child j
                ok = ok & kids[:, :, j][:, :, kernel.rules[:, :, j]]  # (B, N_p, P, R)
            can = ok.any(-1)
        else:
            support = (kernel.transitions > 0).to(torch.float32)  # (s, P, C)
            hits = torch.einsum("bnjc,jpc->bnjp", kids.to(torch.float32), support)
            can = (hits > 0).all(2)
        levels.append(can)
    levels[-1] = levels[-1] & (ghm.root_prior > 0)
    return levels[::-1]


def level_validity(ghm: GHM, tokens: torch.Tensor) -> torch.Tensor:
    """Per-sample coherence at every scale.

    Args:
        ghm: the model.
        tokens: ``(B, *leaf_shape)``.

    Returns:
        ``(B, depth)`` bool; column ``l - 1`` (``l = 1..L``) says whether every block of
        ``s**l`` consecutive leaves in tree order (a ``2**l x 2**l`` tile for images) is derivable
        from some symbol at level ``L - l``. Column ``L - 1`` (the whole string, root prior
        included) is exact validity.
    """
    levels = derivable_symbols(ghm, tokens)  # root first
    cols = [levels[ghm.depth - l].any(-1).all(-1) for l in range(1, ghm.depth + 1)]
    return torch.stack(cols, dim=1)


class SampleQuality(Metric):
    """Exact quality of generated samples under the true GHM.

    ``update(tokens)`` with ``(B, *leaf_shape)`` samples; ``compute()`` returns a dict:

    - ``num_samples``;
    - ``validity``: fraction with ``log p(x) > -inf`` (exact, by BP);
    - ``level_validity``: list over ``l = 1..L`` of the fraction coherent at scale ``s**l``
      (:func:`level_validity`; its last entry equals ``validity``);
    - ``nll_bits_per_leaf``, ``nll_bits_per_leaf_std``: mean and spread of
      ``-log2 p(x) / num_leaves`` over the valid samples (None if none is valid);
    - ``memorisation``: fraction that exactly copy a sample of ``train_tokens`` (None without it);
    - ``novelty``: fraction valid and not copied (valid fraction without a training set);
    - ``diversity``: distinct samples / samples;
    - ``root_histogram``: the root-class histogram of the valid samples (``p(root | x)`` averaged;
      None if none is valid), beside ``root_prior``;
    - ``root_tv``: total variation ``1/2 sum_a |h(a) - prior(a)|`` between the root-class histogram
      of the valid samples (``p(root | x)`` averaged, exact for ambiguous grammars too) and the prior;
    - ``leaf_kl``: ``KL(empirical || exact)`` of the per-position leaf-token marginals, averaged over
      positions, in nats (``inf`` if a sample puts a token where the model cannot).

    Args:
        ghm: the true model.
        train_tokens: ``(n, *leaf_shape)`` the training set, for memorisation and novelty.
    """

    full_state_update = False
    higher_is_better = None

    def __init__(self, ghm: GHM, train_tokens: torch.Tensor | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ghm = ghm.to("cpu")
        self._train_keys = set(row_keys(train_tokens)) if train_tokens is not None else None
        self.add_state("tokens", default=[], dist_reduce_fx="cat")

    def update(self, tokens: torch.Tensor) -> None:
        """Add samples ``(B, *leaf_shape)``."""
        self.ghm.check_tokens(tokens.cpu(), "tokens")
        self.tokens.append(tokens.detach().to(self.device, torch.int64))

    def compute(self) -> dict[str, Any]:
        """The metrics of every sample added so far (see the class docstring)."""
        tokens = self.tokens if isinstance(self.tokens, torch.Tensor) else torch.cat(self.tokens)
        return sample_quality(self.ghm, tokens.cpu(), self._train_keys)


def sample_quality(ghm: GHM, tokens: torch.Tensor, train_keys: set[bytes] | None = None) -> dict[str, Any]:
    """The dict of :class:`SampleQuality` for ``tokens`` ``(B, *leaf_shape)``; ``train_keys`` from :func:`row_keys`."""
    B = tokens.shape[0]
    if B == 0:
        raise ValueError("tokens: no samples to evaluate")
    log_p = ghm.log_prob(tokens)
    valid = torch.isfinite(log_p)
    keys = row_keys(tokens)
    copied = (torch.tensor([k in train_keys for k in keys], dtype=torch.bool) if train_keys is not None
              else torch.zeros(B, dtype=torch.bool))
    out: dict[str, Any] = {
        "num_samples": B,
        "validity": float(valid.double().mean()),
        "level_validity": level_validity(ghm, tokens).double().mean(0).tolist(),
        "nll_bits_per_leaf": None,
        "nll_bits_per_leaf_std": None,
        "memorisation": float(copied.double().mean()) if train_keys is not None else None,
        "novelty": float((valid & ~copied).double().mean()),
        "diversity": len(set(keys)) / B,
        "root_histogram": None,
        "root_prior": ghm.root_prior.tolist(),
        "root_tv": None,
        "leaf_kl": leaf_marginal_kl(ghm, tokens),
    }
    if valid.any():
        bits = -log_p[valid] / (ghm.num_leaves * math.log(2))
        out["nll_bits_per_leaf"] = float(bits.mean())
        out["nll_bits_per_leaf_std"] = float(bits.std()) if bits.numel() > 1 else 0.0
        roots = posterior(ghm, ghm.hard_evidence(tokens[valid])).root_marginals.double()
        hist = roots.mean(0)
        out["root_histogram"] = hist.tolist()
        out["root_tv"] = float(0.5 * (hist - ghm.root_prior.double()).abs().sum())
    return out


def exact_leaf_marginals(ghm: GHM) -> torch.Tensor:
    """``p(x_i = b)`` for every leaf, ``(*leaf_shape, v)`` float64 (BP with no evidence)."""
    none = torch.zeros(1, *ghm.leaf_shape, ghm.vocab_size, dtype=torch.float64, device=ghm.device)
    return posterior(ghm, none).leaf_marginals[0].double()


def leaf_marginal_kl(ghm: GHM, tokens: torch.Tensor) -> float:
    """``KL(empirical || exact)`` of the leaf-token marginals, mean over positions, in nats."""
    exact = exact_leaf_marginals(ghm).reshape(-1, ghm.vocab_size).cpu()
    counts = torch.nn.functional.one_hot(tokens.reshape(tokens.shape[0], -1).long(), ghm.vocab_size).double()
    emp = counts.mean(0)  # (n, v)
    terms = torch.where(emp > 0, emp * (emp.log() - exact.log()), torch.zeros_like(emp))
    return float(terms.sum(-1).mean())
