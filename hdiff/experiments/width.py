"""How wide must a U-Net be to be within epsilon of BP? Mei's finite-width BP U-Net against the exact oracle.

:meth:`BPUNet.from_ghm(ghm, process, width=W) <hdiff.models.bp_unet.BPUNet.from_ghm>` is the U-Net
whose forward pass is belief propagation with every log-sum-exp replaced by a tree of pairwise
log-sum-exps, ``lse(a, b) = max(a, b) + g_W(|a - b|)``, where ``g_W`` is a fitted one-hidden-layer
MLP of width ``W`` (Mei 2024; docs/bp_unet.md, "Finite width"). :func:`run_width` measures, for
every width ``W`` and every signal level ``alpha``, ``KL(oracle || BPUNet_W)`` of the leaf
posteriors in nats per noised leaf (:func:`~hdiff.models.bp_unet_width.width_curve`; for masking
only masked leaves count), beside the network's parameter count and its hidden units per sample
(``W`` times the pairwise log-sum-exps of one forward pass). The exact network (``width = None``)
is measured too: its KL is float32 round-off, the floor of the curve. The answer to the question
is ``min_width_for_epsilon``: the smallest ``W`` whose KL is below ``epsilon`` at every ``alpha``.
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

from hdiff.config import GHMConfig, load_toml, to_toml
from hdiff.experiments.plots import save_figure
from hdiff.io import write_csv_atomic, write_json_atomic, write_text_atomic
from hdiff.models.bp_unet_width import ACTIVATIONS, width_curve

ProcessName = Literal["masking", "gaussian", "uniform"]


@dataclass
class WidthSweepConfig:
    """The ``[width]`` table: the noise process, the MLP widths, the signal levels and the target.

    Attributes:
        process: the noise process of the oracle and the networks.
        widths: MLP widths ``W >= 1`` (the exact network is always measured beside them).
        alphas: signal levels in ``[0, 1]`` (masking: keep probability; Gaussian: ``alpha_bar``).
        num_samples: noised states per ``alpha`` (the same states for every width).
        seed: seed of the samples and the noise.
        activation: the MLPs' hidden activation, ``"relu"`` or ``"silu"``.
        epsilon: the KL target in nats per noised leaf, for ``min_width_for_epsilon``.
    """

    process: ProcessName = "masking"
    widths: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32])
    alphas: list[float] = field(default_factory=lambda: [0.1, 0.25, 0.5, 0.75, 0.9])
    num_samples: int = 1024
    seed: int = 0
    activation: Literal["relu", "silu"] = "relu"
    epsilon: float = 1e-3

    def __post_init__(self) -> None:
        if not self.widths or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in self.widths):
            raise ValueError(f"width.widths must be a non-empty list of integers >= 1, got {self.widths!r}")
        if len(set(self.widths)) != len(self.widths):
            raise ValueError(f"width.widths must not repeat a width, got {self.widths!r}")
        if not self.alphas or any(not 0 <= a <= 1 for a in self.alphas):
            raise ValueError(f"width.alphas must be a non-empty list of values in [0, 1], got {self.alphas!r}")
        if self.num_samples < 1:
            raise ValueError(f"width.num_samples must be >= 1, got {self.num_samples!r}")
        if self.seed < 0:
            raise ValueError(f"width.seed must be >= 0, got {self.seed!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"width.activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if not (math.isfinite(self.epsilon) and self.epsilon > 0):
            raise ValueError(f"width.epsilon must be a positive number, got {self.epsilon!r}")


@dataclass
class WidthConfig:
    """``hdiff width``: a ``[ghm]`` table, a ``[width]`` table and ``threads`` (0: torch's default)."""

    ghm: GHMConfig = field(default_factory=GHMConfig)
    width: WidthSweepConfig = field(default_factory=WidthSweepConfig)
    threads: int = 0

    def __post_init__(self) -> None:
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0, got {self.threads!r}")


def load_width_config(path: str | os.PathLike) -> WidthConfig:
    """Read a :class:`WidthConfig` from TOML.

    Raises:
        ValueError: an unknown table or key, or a bad value, naming the field.
        TypeError: a wrong type, naming the field.
    """
    return load_toml(WidthConfig, path)


def _finite_max(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return max(finite) if finite else math.nan


def summarise(rows: list[dict], alphas: list[float], epsilon: float) -> dict:
    """Group :func:`width_curve` rows by width and find the smallest width within ``epsilon``.

    Args:
        rows: ``width_curve`` rows, the exact network's (``width = None``) among them.
        alphas: the signal levels, in the order of the per-width KL lists.
        epsilon: the KL target (nats per noised leaf).

    Returns:
        ``exact`` (``num_parameters``, ``kl`` per alpha), ``curves`` (per width, ascending: ``width``,
        ``num_parameters``, ``hidden_units``, ``fit_error``, ``kl`` (a list per alpha) and ``max_kl``
        over alphas, ``nan`` where no leaf was noised), ``min_width_for_epsilon`` (None: no width
        reaches it) with its ``min_width_parameters`` and ``min_width_hidden_units``.

    Raises:
        ValueError: ``rows`` lacks the exact network, or a width lacks an alpha.
    """
    by_width: dict = {}
    for r in rows:  # width_curve loops over alphas outside widths: each width's KLs come in alpha order
        entry = by_width.setdefault(r["width"], {"width": r["width"], "num_parameters": r["num_parameters"],
                                                 "hidden_units": r["hidden_units"], "fit_error": r["fit_error"],
                                                 "kl": []})
        entry["kl"].append(r["kl"])
    for entry in by_width.values():
        if len(entry["kl"]) != len(alphas):
            raise ValueError(f"rows: width {entry['width']} has {len(entry['kl'])} KLs for {len(alphas)} alphas")
        entry["max_kl"] = _finite_max(entry["kl"])
    if None not in by_width:
        raise ValueError("rows must include the exact network's (width = None)")
    exact = by_width.pop(None)
    curves = [by_width[w] for w in sorted(by_width)]
    best = next((c for c in curves if c["max_kl"] < epsilon), None)  # nan compares False: never "within"
    return {"exact": {"num_parameters": exact["num_parameters"], "kl": exact["kl"], "max_kl": exact["max_kl"]},
            "curves": curves, "epsilon": epsilon,
            "min_width_for_epsilon": None if best is None else best["width"],
            "min_width_parameters": None if best is None else best["num_parameters"],
            "min_width_hidden_units": None if best is None else best["hidden_units"]}


def plot_width(metrics: dict, path: str | os.PathLike) -> None:
    """Two panels: KL vs ``W`` (log-log, one line per alpha) and KL vs parameters (the exact network marked).

    Non-positive KLs (float32 round-off around the exact answer) are left out of the log axes; the
    exact network's largest ``|KL|`` is drawn as the round-off floor.
    """
    from hdiff.experiments.plots import plt

    curves, alphas, eps = metrics["curves"], metrics["alphas"], metrics["epsilon"]
    widths = [c["width"] for c in curves]
    params = [c["num_parameters"] for c in curves]
    floor = max((abs(k) for k in metrics["exact"]["kl"] if not math.isnan(k)), default=math.nan)
    cmap = plt.get_cmap("viridis")
    fig, (ax_w, ax_p) = plt.subplots(1, 2, figsize=(12, 4.4))
    for i, alpha in enumerate(alphas):
        kl = [c["kl"][i] if c["kl"][i] > 0 else math.nan for c in curves]  # nan > 0 is False: dropped too
        colour = cmap(i / max(len(alphas) - 1, 1))
        ax_w.plot(widths, kl, "o-", ms=4, color=colour, label=f"alpha = {alpha:g}")
        ax_p.plot(params, kl, "o-", ms=4, color=colour)
    for c in curves:  # W and the hidden units beside each point of the parameter panel
        top = _finite_max([k if k > 0 else math.nan for k in c["kl"]])
        if not math.isnan(top):
            ax_p.annotate(f"W={c['width']}: {c['hidden_units']:,} units", (c["num_parameters"], top), fontsize=6,
                          xytext=(4, 2), textcoords="offset points")
    exact_params = metrics["exact"]["num_parameters"]
    ax_p.axvline(exact_params, color="k", ls="--", lw=1, label=f"exact BPUNet: {exact_params:,} params, 0 units")
    for ax in (ax_w, ax_p):
        ax.axhline(eps, color="tab:red", ls=":", lw=1, label=f"epsilon = {eps:g}")
        if floor > 0:
            ax.axhline(floor, color="gray", ls="-.", lw=1, label=f"exact network (float32 round-off): {floor:.1e}")
        ax.set_yscale("log")
        ax.set_ylabel("KL(oracle || BPUNet_W), nats per noised leaf")
    ax_w.set_xscale("log", base=2)
    ax_w.set_xticks(widths, [str(w) for w in widths])
    ax_w.legend(fontsize=7, loc="lower left")
    ax_p.legend(fontsize=7, loc="upper right")
    ax_p.set_xlim(exact_params - 0.05 * (max(params) - exact_params), max(params) + 0.2 * (max(params) - exact_params))
    best = metrics["min_width_for_epsilon"]
    ax_w.set_xlabel("MLP width W (hidden units per pairwise log-sum-exp)")
    ax_w.set_title(f"{metrics['process']}, {metrics['activation']}: smallest W within epsilon at every alpha: "
                   f"{'none' if best is None else best}", fontsize=9)
    ax_p.set_xlabel("parameters (each point: W and its hidden units per sample)")
    ax_p.set_title(metrics["ghm"], fontsize=7)
    save_figure(fig, path, dpi=110)


def run_width(cfg: WidthConfig, out: str | os.PathLike) -> dict:
    """Measure ``KL(oracle || BPUNet_W)`` per width and noise level; write the results to ``out``.

    Writes ``config.toml`` (the resolved config), ``metrics.json`` (what this returns),
    ``metrics.csv`` (one row per (W, alpha), the exact network's rows with ``width = "exact"``) and
    ``width.png`` (:func:`plot_width`), each atomically.

    Args:
        cfg: the experiment.
        out: output directory (created; a rerun recomputes and replaces every file).

    Returns:
        ``ghm``, ``process``, ``activation``, ``alphas``, ``rows`` (the :func:`width_curve` rows,
        ``width = None`` for the exact network), everything :func:`summarise` returns,
        ``wall_seconds`` and ``config``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "config.toml", to_toml(cfg))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    start = time.perf_counter()
    sweep = cfg.width
    ghm = cfg.ghm.build()
    widths = sorted(sweep.widths)
    rows = width_curve(ghm, sweep.process, [None, *widths], sweep.alphas, num_samples=sweep.num_samples,
                       seed=sweep.seed, activation=sweep.activation)
    metrics = {"ghm": repr(ghm), "process": sweep.process, "activation": sweep.activation,
               "alphas": [float(a) for a in sweep.alphas], "num_samples": sweep.num_samples, "rows": rows,
               **summarise(rows, sweep.alphas, sweep.epsilon)}
    metrics["wall_seconds"] = time.perf_counter() - start
    metrics["config"] = dataclasses.asdict(cfg)
    write_csv_atomic(out / "metrics.csv", [{**r, "width": "exact" if r["width"] is None else r["width"]} for r in rows])
    write_json_atomic(out / "metrics.json", metrics)
    plot_width(metrics, out / "width.png")
    return metrics


def format_width(metrics: dict) -> str:
    """The summary table: one line per width (and the exact network), then the smallest width within epsilon.

    Args:
        metrics: what :func:`run_width` returns (or its ``metrics.json``).

    Returns:
        Lines ``W | parameters | hidden units / sample | max |g_W - g| | KL at each alpha``, then
        ``min width for epsilon``.
    """
    alphas = metrics["alphas"]
    head = ["W", "params", "hidden units", "max |g_W-g|", *(f"KL a={a:g}" for a in alphas)]
    exact = metrics["exact"]
    body = [["exact", str(exact["num_parameters"]), "0", "0", *(f"{k:.2e}" for k in exact["kl"])]]
    body += [[str(c["width"]), str(c["num_parameters"]), str(c["hidden_units"]), f"{c['fit_error']:.1e}",
              *(f"{k:.2e}" for k in c["kl"])] for c in metrics["curves"]]
    sizes = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(head)]
    lines = ["  ".join(x.rjust(n) for x, n in zip(row, sizes)) for row in [head, *body]]
    best = metrics["min_width_for_epsilon"]
    eps = metrics["epsilon"]
    lines.append(f"KL(oracle || BPUNet_W) in nats per noised leaf ({metrics['process']}, {metrics['activation']}).")
    lines.append(f"min width for epsilon = {eps:g}: " + (
        "none of the widths (max-over-alpha KL above epsilon)" if best is None else
        f"W = {best} ({metrics['min_width_parameters']} parameters, exact {exact['num_parameters']}; "
        f"{metrics['min_width_hidden_units']} hidden units per sample)"))
    return "\n".join(lines)


__all__ = ["WidthConfig", "WidthSweepConfig", "load_width_config", "summarise", "plot_width", "run_width",
           "format_width"]
