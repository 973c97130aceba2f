"""Linear probes of a tree U-Net's activations against BP's messages: does the network compute BP?

Mei (2024) shows that a U-Net aligned with the tree *can* implement belief propagation: the
encoder level ``l`` would hold the upward messages ``U_l(a) = log p(evidence below | node = a)``
and the decoder level ``l`` the node posteriors ``log p(node = a | x_t)``. Whether a *trained*
network does is an empirical question; a linear probe answers it level by level (docs/metrics.md,
"Message probes"):

1. noise held-out clean samples to a signal level drawn in each bin of ``alpha``;
2. read every level's activations (``model.tree_features(x_t, alpha)``) and BP's exact targets
   (:func:`hdiff.bp.upward_messages` for the encoder, the node marginals for the decoder);
3. fit a ridge regression ``activations -> targets`` on half of the samples, per level and bin;
4. report on the other half: ``R^2`` (the fraction of the targets' variance the probe explains)
   and, for the decoder, ``KL(BP posterior || softmax(probe))`` in nats per node.

Log-targets are clamped at ``-LOG_FLOOR`` (a symbol BP rules out is "very unlikely" to a linear
probe) and centred per node (messages are defined up to a per-node constant).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from hdiff.bp import posterior, upward_messages
from hdiff.ghm import GHM
from hdiff.ghm.layout import to_tree_order

LOG_FLOOR = 30.0


def _tree_rows(x: torch.Tensor, ghm: GHM, level: int) -> torch.Tensor:
    """``(B, *level_shape(l), A)`` -> ``(B * s**l, A)`` in tree order (as the network's features)."""
    if ghm.layout == "image" and level > 0:
        x = to_tree_order(x, ghm.layout, level)
    return x.reshape(-1, x.shape[-1])


def _centred_log(x: torch.Tensor) -> torch.Tensor:
    x = x.double().clamp_min(-LOG_FLOOR)
    return x - x.mean(-1, keepdim=True)


def ridge_fit(x: torch.Tensor, y: torch.Tensor, ridge: float) -> torch.Tensor:
    """Weights ``W`` ``(C + 1, A)`` of ``[x, 1] W ~ y`` minimising ``|| . ||^2 + ridge ||W||^2`` (bias unpenalised).

    Inputs are standardised first (so ``ridge`` is scale-free); the returned ``W`` acts on the raw ``x``.
    """
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    z = torch.cat([(x - mu) / sd, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)
    reg = ridge * z.shape[0] * torch.eye(z.shape[1], dtype=x.dtype)
    reg[-1, -1] = 0.0
    w = torch.linalg.solve(z.T @ z + reg, z.T @ y)
    # fold the standardisation into the weights
    w_x = w[:-1] / sd.unsqueeze(1)
    return torch.cat([w_x, (w[-1] - mu @ w_x).unsqueeze(0)], 0)


def _predict(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return x @ w[:-1] + w[-1]


def r_squared(pred: torch.Tensor, y: torch.Tensor) -> float:
    """``1 - SS_res / SS_tot`` summed over every output dimension (1 = perfect, 0 = the mean)."""
    ss_tot = (y - y.mean(0)).pow(2).sum()
    return float(1 - (pred - y).pow(2).sum() / ss_tot.clamp_min(1e-12))


@torch.no_grad()
def message_probes(model: Any, ghm: GHM, x0: torch.Tensor, *, num_bins: int = 4, ridge: float = 1e-3,
                   generator: torch.Generator | None = None, batch_limit: int = 2048) -> list[dict[str, Any]]:
    """Probe every encoder and decoder level of ``model`` against BP, per noise bin.

    Args:
        model: a learned denoiser with ``tree_features(x_t, alpha)`` (:class:`~hdiff.models.TreeUNet`)
            and ``process``.
        ghm: the true model (BP's targets).
        x0: ``(n, *leaf_shape)`` held-out clean samples; the first half fits the probes, the second
            half scores them (``n >= 4``).
        num_bins: equal-width bins of ``alpha`` in ``(0, 1)``.
        ridge: the ridge penalty on standardised features.
        generator: RNG for ``alpha`` and the noise.
        batch_limit: most samples through the model at once.

    Returns:
        One dict per (side, level, bin): ``side`` (``"encoder"`` / ``"decoder"``), ``level``
        (0 = root), ``bin``, ``alpha`` (bin centre), ``r2`` and, for the decoder, ``kl`` (nats per
        node, ``KL(BP || softmax(probe))``).

    Raises:
        ValueError: the model has no ``tree_features``, or fewer than 4 samples.
    """
    if not hasattr(model, "tree_features"):
        raise ValueError(f"{type(model).__name__} exposes no tree_features(x_t, alpha): nothing to probe")
    n = x0.shape[0]
    if n < 4:
        raise ValueError(f"x0: need at least 4 samples (half to fit, half to score), got {n}")
    process, half = model.process, n // 2
    rows = []
    for k in range(num_bins):
        lo, hi = k / num_bins, (k + 1) / num_bins
        alpha = (lo + (hi - lo) * torch.rand(n, generator=generator, dtype=torch.float64)).clamp(1e-3, 1 - 1e-3)
        x_t = process.add_noise(x0, alpha.float(), generator=generator)
        feats: dict[str, list[list[torch.Tensor]]] = {"encoder": [], "decoder": []}
        for start in range(0, n, batch_limit):
            sl = slice(start, start + batch_limit)
            f = model.tree_features(x_t[sl], alpha[sl].float())
            for side in feats:
                feats[side].append([t.double().cpu() for t in f[side]])
        evidence = process.leaf_log_likelihood(x_t, alpha.float()).to(torch.float64)
        up = upward_messages(ghm, evidence)
        marg = posterior(ghm, evidence, levels=True).level_marginals
        for side, targets in (("encoder", up), ("decoder", marg)):
            per_level = [torch.cat(parts) for parts in zip(*feats[side])]
            for level, act in enumerate(per_level):
                x = act.reshape(-1, act.shape[-1]).clamp_min(-LOG_FLOOR)  # a "log 0" feature reads as very unlikely, as the targets do
                t = targets[level]
                y = _centred_log(_tree_rows(t.log() if side == "decoder" else t, ghm, level))
                per = y.shape[0] // n  # nodes per sample at this level
                fit, test = slice(0, half * per), slice(half * per, None)
                w = ridge_fit(x[fit], y[fit], ridge)
                pred = _predict(w, x[test])
                row = {"side": side, "level": level, "bin": k, "alpha": (lo + hi) / 2, "r2": r_squared(pred, y[test])}
                if side == "decoder":
                    p = _tree_rows(t, ghm, level)[test].double()
                    q = torch.log_softmax(pred, -1)
                    kl = torch.where(p > 0, p * (p.clamp_min(1e-300).log() - q), torch.zeros_like(p)).sum(-1)
                    row["kl"] = float(kl.mean())
                rows.append(row)
    return rows


def summarise_probes(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean ``r2`` (and decoder ``kl``) per (side, level) over the noise bins: the per-level curve."""
    out: dict[str, Any] = {}
    for side in ("encoder", "decoder"):
        levels = sorted({r["level"] for r in rows if r["side"] == side})
        sel = {l: [r for r in rows if r["side"] == side and r["level"] == l] for l in levels}
        out[f"{side}_r2"] = [sum(r["r2"] for r in sel[l]) / len(sel[l]) for l in levels]
        if side == "decoder":
            out["decoder_kl"] = [sum(r["kl"] for r in sel[l]) / len(sel[l]) for l in levels]
    out["finite"] = all(math.isfinite(r["r2"]) for r in rows)
    return out
