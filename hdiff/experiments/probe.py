"""Forward-backward probe of a GHM (Sclocchi, Favero, Wyart, PNAS 2025; Sclocchi, Favero, Levi, Wyart, ICLR 2025).

Take exact samples ``x0`` (with their latent trees), noise them to signal level ``alpha``, and
regenerate ``x0_hat`` with the exact reverse process. Running the exact reverse diffusion from
``x_t`` to 0 (the oracle's ``x0_mode="joint"``, exact at any step count) yields exactly a draw from
``p(x0 | x_t)``, so one call of :func:`~hdiff.bp.sample_posterior` on the noise process's leaf
evidence replaces the whole reverse loop here; it returns the regenerated latent tree as well.
Measured against ``alpha``:

- ``class_kept``: ``P(root_hat = root)``; 1 at ``alpha = 1`` for an unambiguous grammar (the leaves
  fix the root), and the prior's collision probability ``sum_c prior(c)^2`` at ``alpha = 0``
  (``x0_hat`` is then an independent draw from the GHM);
- ``changed_leaves``: the mean fraction of leaves with ``x0_hat_i != x0_i``;
- ``level_kept[l]``: the mean over level-``l`` nodes of ``P(z_hat_l,i = z_l,i)`` (level 0 = root);
- correlations of the change indicators ``c_i = 1[x0_hat_i != x0_i]`` (leaves in tree order,
  covariances over samples): for tree distance ``d`` (the number of levels up to the lowest common
  ancestor, 1..L) ``covariance_by_distance[d-1] = mean_{pairs at d} Cov(c_i, c_j)`` and
  ``correlation_by_distance[d-1]`` = that divided by ``mean_i Var(c_i)``; the susceptibility
  ``chi = (1/N) sum_{i,j} Cov(c_i, c_j) = Var(sum_i c_i) / N``, and ``chunk_size = chi / mean_i Var(c_i)``:
  the number of leaves that change together with a changed leaf (1 when changes are independent).
  The papers find the chunks largest at the class transition.

The transition: with the normalised retention ``r = (class_kept - q) / (1 - q)`` (``q`` the collision
probability), ``transition_alpha`` is where ``r`` crosses 1/2 and ``transition_width`` the distance
between its 1/4 and 3/4 crossings (linear interpolation on the alpha grid). Learned denoisers are not
probed here (only the exact oracle).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

from hdiff.bp import sample_posterior
from hdiff.config import GHMConfig, load_toml, to_toml
from hdiff.ghm import GHM, to_tree_order
from hdiff.noise import get_process
from hdiff.noise.base import NoiseProcess
from hdiff.experiments.plots import save_figure
from hdiff.io import write_csv_atomic, write_json_atomic, write_text_atomic

ProcessName = Literal["masking", "gaussian", "uniform"]


def _grid(n: int) -> list[float]:
    return [round(i / n, 6) for i in range(n + 1)]


@dataclass
class ProbeAlphas:
    """The signal levels probed for each process (Gaussian: ``alpha_bar``; masking / uniform: keep probability)."""

    masking: list[float] = field(default_factory=lambda: _grid(40))
    gaussian: list[float] = field(default_factory=lambda: _grid(40))
    uniform: list[float] = field(default_factory=lambda: _grid(40))


@dataclass
class ProbeConfig:
    """``hdiff probe``: a GHM, the depths to sweep, the noise processes and their alpha grids."""

    ghm: GHMConfig = field(default_factory=lambda: GHMConfig(vocab_size=32, num_rules=8, branching=2, depth=6))
    depths: list[int] = field(default_factory=lambda: [3, 4, 5, 6])  # each replaces ghm.depth; [] = ghm.depth only
    processes: list[ProcessName] = field(default_factory=lambda: ["masking", "gaussian"])
    alphas: ProbeAlphas = field(default_factory=ProbeAlphas)
    num_samples: int = 1024
    batch_size: int = 1024
    seed: int = 0
    threads: int = 0  # torch intra-op threads; 0 keeps torch's default

    def __post_init__(self) -> None:
        if self.num_samples < 2:
            raise ValueError(f"num_samples must be >= 2 (covariances), got {self.num_samples}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.processes:
            raise ValueError("processes must name at least one of 'masking', 'gaussian', 'uniform'")
        if any(d < 1 for d in self.depths):
            raise ValueError(f"depths must be >= 1, got {self.depths}")
        for depth in self.depths:  # each depth builds its own GHM: refuse one too large before the sweep starts
            dataclasses.replace(self.ghm, depth=depth)
        for name in ("seed", "threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in self.processes:
            grid = getattr(self.alphas, name)
            if not grid or any(not 0 <= a <= 1 for a in grid):
                raise ValueError(f"alphas.{name} must be a non-empty list of values in [0, 1], got {grid}")


def load_probe_config(path: str | os.PathLike) -> ProbeConfig:
    """Read a :class:`ProbeConfig` from TOML (unknown keys and wrong types raise, naming the field)."""
    return load_toml(ProbeConfig, path)


def tree_distance(num_leaves: int, branching: int) -> torch.Tensor:
    """``(N, N)`` long: levels up to the lowest common ancestor of leaves ``i, j`` in tree order (0 on the diagonal)."""
    i = torch.arange(num_leaves)
    d = torch.zeros(num_leaves, num_leaves, dtype=torch.long)
    a, b = i[:, None].clone(), i[None, :].clone()
    while bool((a != b).any()):
        d += (a != b).long()
        a, b = a // branching, b // branching
    return d


def change_statistics(changed: torch.Tensor, distance: torch.Tensor, depth: int) -> dict[str, object]:
    """Covariance structure of the change indicators.

    Args:
        changed: ``(B, N)`` 0/1 floats, leaves in tree order.
        distance: ``(N, N)`` tree distances (:func:`tree_distance`).
        depth: ``L``; distances run over 1..L.

    Returns:
        ``covariance_by_distance`` and ``correlation_by_distance`` (lists of length ``L``),
        ``susceptibility`` (``Var(sum_i c_i) / N``) and ``chunk_size`` (it over ``mean_i Var(c_i)``);
        see the module docstring. The normalised entries are ``None`` when no leaf ever changes (``Var = 0``).
    """
    c = changed.double()
    dev = c - c.mean(0)
    cov = dev.T @ dev / max(c.shape[0] - 1, 1)  # (N, N)
    var = float(cov.diagonal().mean())
    by_d = [float(cov[distance == d].mean()) for d in range(1, depth + 1)]
    chi = float(cov.sum()) / c.shape[1]
    return {"covariance_by_distance": by_d,
            "correlation_by_distance": [x / var if var > 0 else None for x in by_d],
            "susceptibility": chi, "chunk_size": chi / var if var > 0 else None}


@torch.no_grad()
def forward_backward(ghm: GHM, process: NoiseProcess, x0: torch.Tensor, tree: list[torch.Tensor], alpha: float, *,
                     generator: torch.Generator, batch_size: int = 1024) -> dict[str, object]:
    """Noise ``x0`` to ``alpha``, regenerate exactly from ``p(x0 | x_t)``, and compare.

    Args:
        ghm: the data distribution.
        process: the noise process (``vocab_size`` as the GHM's).
        x0: clean samples ``(B, *leaf_shape)``.
        tree: their latents, ``depth + 1`` tensors root first (``ghm.sample(..., return_tree=True)``).
        alpha: signal level in ``[0, 1]``.
        generator: the RNG for the noise and the regeneration.
        batch_size: rows per BP call.

    Returns:
        ``class_kept``, ``class_kept_stderr``, ``changed_leaves``, ``level_kept`` (``depth + 1``
        values, root first) and the entries of :func:`change_statistics`.
    """
    kept = [torch.zeros(()) for _ in tree]
    changed = []
    for i in range(0, len(x0), batch_size):
        x = x0[i:i + batch_size]
        x_t = process.add_noise(x, alpha, generator=generator)
        _, tree_hat = sample_posterior(ghm, process.leaf_log_likelihood(x_t, alpha), generator=generator,
                                       return_tree=True)
        for level, (z, z_hat) in enumerate(zip(tree, tree_hat)):
            kept[level] += (z_hat == z[i:i + batch_size]).flatten(1).double().mean(1).sum()
        changed.append(to_tree_order(tree_hat[-1] != x, ghm.layout, ghm.depth).flatten(1))
    n = len(x0)
    class_kept = float(kept[0]) / n
    changed_t = torch.cat(changed).double()
    return {"class_kept": class_kept, "class_kept_stderr": math.sqrt(max(class_kept * (1 - class_kept), 0.0) / n),
            "changed_leaves": float(changed_t.mean()), "level_kept": [float(k) / n for k in kept],
            **change_statistics(changed_t, tree_distance(ghm.num_leaves, ghm.branching), ghm.depth)}


def crossing(alphas: list[float], values: list[float], level: float) -> float | None:
    """The ``alpha`` at which ``values`` (increasing in alpha, up to noise) first reaches ``level`` (linear interpolation)."""
    pairs = sorted(zip(alphas, values))
    for k, (a, v) in enumerate(pairs):
        if v >= level:
            if k == 0:
                return a
            a0, v0 = pairs[k - 1]
            return a0 + (level - v0) * (a - a0) / (v - v0)
    return None


def transition(alphas: list[float], class_kept: list[float], collision: float) -> dict[str, float | None]:
    """``transition_alpha`` (normalised retention = 1/2) and ``transition_width`` (between 1/4 and 3/4)."""
    r = [(p - collision) / (1 - collision) if collision < 1 else 1.0 for p in class_kept]
    mid, low, high = (crossing(alphas, r, x) for x in (0.5, 0.25, 0.75))
    return {"transition_alpha": mid, "transition_width": None if low is None or high is None else high - low}


def plot_probe(curves: list[dict], path: str | os.PathLike) -> None:
    """One row per process: class kept and changed leaves vs alpha (one colour per depth), per-level kept
    at the largest depth, and the chunk size."""
    from hdiff.experiments.plots import plt

    processes = list(dict.fromkeys(c["process"] for c in curves))
    fig, axes = plt.subplots(len(processes), 3, figsize=(14, 3.8 * len(processes)), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for row, name in zip(axes, processes):
        mine = [c for c in curves if c["process"] == name]
        depths = sorted(c["depth"] for c in mine)
        for c in mine:
            colour = cmap(depths.index(c["depth"]) / max(len(depths) - 1, 1))
            row[0].plot(c["alpha"], c["class_kept"], "o-", ms=3, color=colour, label=f"class kept, L={c['depth']}")
            row[0].plot(c["alpha"], c["changed_leaves"], "--", color=colour, label=f"leaves changed, L={c['depth']}")
            chunk = [math.nan if x is None else x for x in c["chunk_size"]]
            row[2].plot(c["alpha"], chunk, "o-", ms=3, color=colour, label=f"L={c['depth']}")
        deepest = max(mine, key=lambda c: c["depth"])
        levels = list(zip(*deepest["level_kept"]))
        for level, values in enumerate(levels):
            row[1].plot(deepest["alpha"], values, color=cmap(level / max(len(levels) - 1, 1)), label=f"level {level}")
        row[0].set_title(f"{name}: class kept (solid), leaves changed (dashed)", fontsize=9)
        row[1].set_title(f"{name}: P(latent kept) per level, L={deepest['depth']} (0 = root)", fontsize=9)
        row[2].set_title(f"{name}: chunk size = susceptibility / Var(change)", fontsize=9)
        for ax in row:
            ax.set_xlabel("alpha (signal level)")
            ax.legend(fontsize=6)
    save_figure(fig, path, dpi=100)


def run_probe(cfg: ProbeConfig, out: str | os.PathLike, *, progress: bool = True) -> dict:
    """Sweep depths x processes x alphas; write ``config.toml``, ``metrics.json``, ``metrics.csv``, ``probe.png``.

    Args:
        cfg: the experiment.
        out: output directory (created; files are replaced atomically, a rerun recomputes).
        progress: show a tqdm bar over the sweep.

    Returns:
        ``{"curves": [...], "wall_seconds", "config"}``; each curve (one per process and depth) holds
        lists over ``alpha`` of every quantity of :func:`forward_backward`, the collision probability
        and the :func:`transition` summary.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "config.toml", to_toml(cfg))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    start = time.perf_counter()
    depths = cfg.depths or [cfg.ghm.depth]
    jobs = [(d, p, a) for d in depths for p in cfg.processes for a in getattr(cfg.alphas, p)]
    bar = tqdm(total=len(jobs), desc="probe", disable=not progress)
    curves, rows = [], []
    for depth in depths:
        ghm = dataclasses.replace(cfg.ghm, depth=depth).build()
        gen = torch.Generator().manual_seed(cfg.seed + depth)
        x0, tree = ghm.sample(cfg.num_samples, generator=gen, return_tree=True)
        collision = float((ghm.root_prior.double() ** 2).sum())
        for name in cfg.processes:
            process = get_process(name, ghm.vocab_size)
            curve: dict = {"process": name, "depth": depth, "ghm": repr(ghm), "collision_probability": collision,
                           "alpha": []}
            for alpha in getattr(cfg.alphas, name):
                bar.set_postfix(L=depth, process=name, alpha=alpha)
                res = forward_backward(ghm, process, x0, tree, alpha, generator=gen, batch_size=cfg.batch_size)
                curve["alpha"].append(alpha)
                for k, v in res.items():
                    curve.setdefault(k, []).append(v)
                rows.append({"process": name, "depth": depth, "alpha": alpha,
                             **{k: v for k, v in res.items() if not isinstance(v, list)},
                             **{f"level_{l}_kept": v for l, v in enumerate(res["level_kept"])},
                             **{f"corr_d{d + 1}": v for d, v in enumerate(res["correlation_by_distance"])}})
                bar.update()
            curve.update(transition(curve["alpha"], curve["class_kept"], collision))
            curves.append(curve)
    bar.close()
    metrics = {"curves": curves, "wall_seconds": time.perf_counter() - start, "config": dataclasses.asdict(cfg)}
    write_csv_atomic(out / "metrics.csv", rows)
    write_json_atomic(out / "metrics.json", metrics)
    plot_probe(curves, out / "probe.png")
    return metrics


def format_probe(metrics: dict) -> str:
    """One line per curve: process, depth, transition alpha and width."""
    lines = []
    for c in metrics["curves"]:
        a, w = c["transition_alpha"], c["transition_width"]
        lines.append(f"{c['process']:8s} L={c['depth']}: transition alpha "
                     f"{'n/a' if a is None else f'{a:.3f}'}, width {'n/a' if w is None else f'{w:.3f}'}, "
                     f"max chunk size {max(x for x in c['chunk_size'] if x is not None):.2f}")
    return "\n".join(lines)


__all__ = ["ProbeConfig", "ProbeAlphas", "load_probe_config", "forward_backward", "change_statistics",
           "tree_distance", "transition", "crossing", "run_probe", "format_probe", "plot_probe"]
