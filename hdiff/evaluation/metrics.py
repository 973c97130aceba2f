"""Sample-quality and denoiser metrics as torchmetrics ``Metric`` classes.

:class:`SampleQuality` scores generated leaves under the true GHM (DESIGN.md, "Evaluation"):
exact log-likelihood, validity, per-level validity (coherence up to scale ``s**l``, the measure of
Favero et al. 2025), memorisation of a training set, novelty, diversity, the root-class histogram
vs the prior, and the leaf-token marginals vs the exact ones. :class:`PosteriorKL` compares a
learned denoiser's leaf posteriors with the BP oracle's per noise-level bin.

Both are device-agnostic and mergeable across processes (their states are concatenated or
summed by torchmetrics' ``dist_reduce_fx``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torchmetrics import Metric

from hdiff.bp import posterior
from hdiff.ghm import GHM, ProductionKernel
from hdiff.ghm.layout import to_tree_order
from hdiff.training.data import row_keys


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
        "root_tv": None,
        "leaf_kl": leaf_marginal_kl(ghm, tokens),
    }
    if valid.any():
        bits = -log_p[valid] / (ghm.num_leaves * math.log(2))
        out["nll_bits_per_leaf"] = float(bits.mean())
        out["nll_bits_per_leaf_std"] = float(bits.std()) if bits.numel() > 1 else 0.0
        roots = posterior(ghm, ghm.hard_evidence(tokens[valid])).root_marginals.double()
        hist = roots.mean(0)
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


class PosteriorKL(Metric):
    """``KL(oracle || learned)`` of leaf posteriors, per noise-level bin, in nats per leaf.

    ``update(log_p_oracle, log_p_learned, alpha, weight)``: log-posteriors ``(B, v, *leaf_shape)``,
    the signal level ``alpha`` ``(B,)`` of each row, and ``weight`` ``(B, *leaf_shape)`` (1 for a
    leaf that counts: for masking, the masked leaves, since the others are known exactly; else
    every leaf). ``compute()`` returns ``(num_bins,)`` float64: the weighted mean KL of the leaves
    whose ``alpha`` falls in each bin of ``[0, 1]`` (``nan`` for an empty bin).

    Args:
        num_bins: equal-width bins of ``alpha``.
    """

    full_state_update = False
    higher_is_better = False

    def __init__(self, num_bins: int = 10, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 1:
            raise ValueError(f"num_bins must be a positive int, got {num_bins!r}")
        self.num_bins = num_bins
        self.add_state("kl_sum", default=torch.zeros(num_bins, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros(num_bins, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, log_p_oracle: torch.Tensor, log_p_learned: torch.Tensor, alpha: torch.Tensor,
               weight: torch.Tensor | None = None) -> None:
        """Accumulate one batch (shapes in the class docstring)."""
        if log_p_oracle.shape != log_p_learned.shape:
            raise ValueError(f"log_p_oracle {tuple(log_p_oracle.shape)} and log_p_learned "
                             f"{tuple(log_p_learned.shape)} must have the same shape")
        p = log_p_oracle.double().exp()
        # 0 log 0 = 0 where the oracle rules a token out; -inf learned log-probs give inf where it does not
        kl = torch.where(p > 0, p * (log_p_oracle.double() - log_p_learned.double()), torch.zeros_like(p)).sum(1)
        w = torch.ones_like(kl) if weight is None else weight.to(kl)
        B = kl.shape[0]
        bins = (alpha.to(kl.device).double() * self.num_bins).long().clamp(0, self.num_bins - 1)
        self.kl_sum.index_add_(0, bins, (kl * w).reshape(B, -1).sum(1).nan_to_num(nan=0.0))
        self.count.index_add_(0, bins, w.reshape(B, -1).sum(1))

    def compute(self) -> torch.Tensor:
        """``(num_bins,)`` mean KL per leaf per bin."""
        return self.kl_sum / self.count

    def bin_centres(self) -> list[float]:
        """The ``alpha`` at the centre of each bin."""
        return [(k + 0.5) / self.num_bins for k in range(self.num_bins)]


@torch.no_grad()
def posterior_kl(oracle: Any, learned: Any, x0: torch.Tensor, *, num_bins: int = 10, draws_per_bin: int = 1,
                 generator: torch.Generator | None = None, batch_limit: int = 4096) -> PosteriorKL:
    """Measure ``KL(oracle || learned)`` of leaf posteriors on clean data, per bin of ``alpha``.

    For every sample, bin and draw: ``alpha ~ U(bin)``, ``x_t ~ q(x_t | x0, alpha)``, and both
    denoisers' ``log p(x0_i | x_t)`` (:class:`PosteriorKL` does the rest).

    Args:
        oracle: the exact denoiser (:class:`~hdiff.denoisers.BPDenoiser`).
        learned: any denoiser with the same noise process.
        x0: held-out clean tokens ``(n, *leaf_shape)``.
        num_bins: equal-width bins of ``alpha`` in ``[0, 1]``.
        draws_per_bin: noisy copies of every sample per bin.
        generator: RNG for ``alpha`` and the noise.
        batch_limit: most noisy states sent to the denoisers at once.

    Returns:
        The updated :class:`PosteriorKL` (``.compute()`` gives the per-bin curve).
    """
    process = oracle.process
    if type(process) is not type(learned.process):
        raise ValueError(f"the denoisers' processes differ: {process!r} vs {learned.process!r}")
    metric = PosteriorKL(num_bins)
    n = x0.shape[0]
    bins = torch.arange(num_bins, dtype=torch.float64).repeat_interleave(n * draws_per_bin)
    u = torch.rand(bins.shape[0], generator=generator, dtype=torch.float64, device=x0.device)
    alphas = ((bins.to(x0.device) + u) / num_bins).clamp(1e-4, 1 - 1e-4)
    rows = torch.arange(n, device=x0.device).repeat(num_bins * draws_per_bin)
    for start in range(0, rows.shape[0], batch_limit):
        sl = slice(start, start + batch_limit)
        clean, alpha = x0[rows[sl]], alphas[sl].float()
        x_t = process.add_noise(clean, alpha, generator=generator)
        weight = (x_t == process.mask_token).double() if process.kind == "masking" else None
        metric.update(oracle(x_t, alpha), learned(x_t, alpha), alpha, weight)
    return metric
