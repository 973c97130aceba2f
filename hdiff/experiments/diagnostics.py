"""Why a learned denoiser falls short of the oracle: the diagnostics of ``hdiff compare``.

Three views, all read from the rows of ``metrics.json`` (docs/experiments.md, "Diagnostics"):

- **Gap decomposition.** Beside each learned cell trained on a fixed set of ``n`` samples
  (``data = "fixed"``), the same model trained for the same steps on a fresh batch from the GHM at
  every step (``data = "fresh"``: ``n = inf``) and, optionally, on fresh batches against the oracle's
  exact posteriors instead of the clean tokens (``data = "fresh_rb"``: the Rao-Blackwellised loss,
  no label noise). With ``K(.)`` the mean ``KL(oracle || model)`` per noised leaf::

      K(n) = [K(n) - K(inf)]  +  [K(inf) - K(rb)]  +  K(rb)
             estimation          target noise         approximation + optimisation

  The first term is what the finite training set costs; the others are what even unlimited data
  does not fix at this budget.
- **Training-time axis** (Favero et al. 2025): validity, per-level validity and KL of the EMA
  snapshots saved during training, against steps, one line per ``n``.
- **Message probes**: the per-level ``R^2`` of linear probes from the network's activations to
  BP's messages (:mod:`hdiff.metrics.message_probes`), against ``n``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only
import matplotlib.pyplot as plt  # noqa: E402

from hdiff.experiments.plots import save_figure  # noqa: E402

ORACLE = "oracle"
REFERENCE = "bp_unet_ghm"
DATA_KINDS = ("fixed", "fresh", "fresh_rb")


def _learned_rows(rows: list[dict], data: str = "fixed") -> list[dict]:
    return [r for r in rows if r["denoiser"] not in (ORACLE, REFERENCE) and r.get("data", "fixed") == data
            and "kl_mean" in r]


def decompose(rows: list[dict]) -> list[dict[str, Any]]:
    """The gap decomposition (module docstring) of every learned fixed-data cell that has a fresh twin.

    Args:
        rows: the sweep's rows and its diagnostic rows (``metrics["rows"] + metrics["diagnostic_rows"]``).

    Returns:
        One dict per (denoiser, n): ``kl_n``, ``kl_inf``, ``kl_rb`` (None without an RB twin),
        ``estimation``, ``target_noise`` (None without RB), ``approx_optim`` (``kl_rb``, else
        ``kl_inf``), ``steps`` and ``dominant``: which term is largest.
    """
    twins = {(r["denoiser"], r["n"], r.get("data", "fixed")): r for r in rows if r["denoiser"] not in (ORACLE, REFERENCE)}
    out = []
    for r in _learned_rows(rows):
        fresh = twins.get((r["denoiser"], r["n"], "fresh"))
        if fresh is None or "kl_mean" not in fresh:
            continue
        rb = twins.get((r["denoiser"], r["n"], "fresh_rb"))
        kl_n, kl_inf = r["kl_mean"], fresh["kl_mean"]
        kl_rb = rb["kl_mean"] if rb is not None and "kl_mean" in rb else None
        terms = {"estimation": kl_n - kl_inf,
                 "target_noise": None if kl_rb is None else kl_inf - kl_rb,
                 "approx_optim": kl_inf if kl_rb is None else kl_rb}
        named = {k: v for k, v in terms.items() if v is not None}
        out.append({"denoiser": r["denoiser"], "n": r["n"], "steps": r.get("steps"), "kl_n": kl_n,
                    "kl_inf": kl_inf, "kl_rb": kl_rb, **terms, "dominant": max(named, key=lambda k: named[k])})
    return sorted(out, key=lambda d: (d["denoiser"], d["n"]))


def plot_decomposition(metrics: dict, path: Path) -> bool:
    """Stacked bars of the decomposition per n (one panel per learned model); False if there is none."""
    parts = decompose(metrics["rows"] + metrics.get("diagnostic_rows", []))
    if not parts:
        return False
    models = list(dict.fromkeys(p["denoiser"] for p in parts))
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        sel = [p for p in parts if p["denoiser"] == model]
        x = list(range(len(sel)))
        bottom = [0.0] * len(sel)
        for key, color, label in (("approx_optim", "tab:blue", "approximation + optimisation (at this budget)"),
                                  ("target_noise", "tab:orange", "target noise (CE vs exact posteriors)"),
                                  ("estimation", "tab:red", "estimation (finite n)")):
            vals = [max(p[key], 0.0) if p[key] is not None else 0.0 for p in sel]
            if any(vals):
                ax.bar(x, vals, bottom=bottom, color=color, label=label)
                bottom = [b + v for b, v in zip(bottom, vals)]
        ax.plot(x, [p["kl_n"] for p in sel], "k_", ms=20, mew=2, label="KL at n (measured)")
        ax.set_xticks(x, [f"n={p['n']}\n{p['steps']} steps" for p in sel], fontsize=8)
        ax.set(yscale="log", ylabel="KL(oracle || model), nats per noised leaf", title=f"{model}: where the gap comes from")
        ax.legend(fontsize=7)
    save_figure(fig, path)
    return True


def plot_time_axis(metrics: dict, path: Path) -> bool:
    """Validity and KL of the training snapshots vs steps, one line per n; False if there are none."""
    rows = [r for r in _learned_rows(metrics["rows"]) if r.get("time_axis")]
    if not rows:
        return False
    depth = metrics["depth"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    cmap = plt.get_cmap("viridis")
    for k, r in enumerate(sorted(rows, key=lambda r: (r["denoiser"], r["n"]))):
        pts = r["time_axis"]
        steps = [p["step"] for p in pts]
        color = cmap(k / max(1, len(rows) - 1))
        label = f"{r['denoiser']} n={r['n']}"
        axes[0].plot(steps, [p["validity"] for p in pts], "o-", color=color, label=label)
        axes[1].plot(steps, [p["level_validity"][max(0, depth // 2 - 1)] for p in pts], "o-", color=color, label=label)
        axes[2].plot(steps, [p["kl_mean"] for p in pts], "o-", color=color, label=label)
    axes[0].set(xlabel="training step", ylabel="valid fraction", ylim=(-0.02, 1.02), title="validity during training")
    axes[1].set(xlabel="training step", ylabel="fraction coherent", ylim=(-0.02, 1.02),
                title=f"per-level validity, blocks of s^{max(1, depth // 2)} leaves")
    axes[2].set(xlabel="training step", ylabel="nats per noised leaf", yscale="log", title="KL(oracle || model)")
    for ax in axes:
        ax.legend(fontsize=7)
    save_figure(fig, path)
    return True


def plot_probes(metrics: dict, path: Path) -> bool:
    """Probe R^2 per level vs n (encoder: upward messages; decoder: posteriors); False if there are none."""
    rows = [r for r in _learned_rows(metrics["rows"]) if r.get("probes")]
    if not rows:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    cmap = plt.get_cmap("plasma")
    for model in dict.fromkeys(r["denoiser"] for r in rows):
        sel = sorted((r for r in rows if r["denoiser"] == model), key=lambda r: r["n"])
        ns = [r["n"] for r in sel]
        for ax, key in zip(axes, ("encoder_r2", "decoder_r2")):
            levels = len(sel[0]["probes"][key])
            for l in range(levels):
                ax.plot(ns, [r["probes"][key][l] for r in sel], "o-", color=cmap(l / max(1, levels)),
                        label=f"{model}, level {l}" + (" (root)" if l == 0 else ""))
    axes[0].set(xscale="log", xlabel="training samples n", ylabel="R^2 (held-out)", ylim=(-0.05, 1.02),
                title="encoder level l -> BP upward messages")
    axes[1].set(xscale="log", xlabel="training samples n", ylabel="R^2 (held-out)", ylim=(-0.05, 1.02),
                title="decoder level l -> BP node posteriors")
    for ax in axes:
        ax.legend(fontsize=6)
    save_figure(fig, path)
    return True


def diagnostics_markdown(metrics: dict) -> list[str]:
    """Markdown lines: the decomposition table with the dominant term per n, and the probe summary."""
    lines: list[str] = []
    parts = decompose(metrics["rows"] + metrics.get("diagnostic_rows", []))
    if parts:
        lines += ["## Where the gap comes from", "",
                  "KL(oracle || model) in nats per noised leaf; `inf` = fresh samples every step, same steps; "
                  "`rb` = fresh samples and the oracle's exact posteriors as targets.", "",
                  "| model | n | steps | KL at n | KL at inf | KL rb | estimation | target noise | approx. + optim. | dominant |",
                  "|---|---|---|---|---|---|---|---|---|---|"]

        def f(v: float | None) -> str:
            return "-" if v is None else f"{v:.4f}"

        for p in parts:
            lines.append(f"| {p['denoiser']} | {p['n']} | {p['steps']} | {f(p['kl_n'])} | {f(p['kl_inf'])} | "
                         f"{f(p['kl_rb'])} | {f(p['estimation'])} | {f(p['target_noise'])} | {f(p['approx_optim'])} | "
                         f"{p['dominant'].replace('_', ' ')} |")
        lines.append("")
    probed = [r for r in _learned_rows(metrics["rows"]) if r.get("probes")]
    if probed:
        lines += ["## Does the network compute BP? (linear probes, held-out R^2 per level, root first)", "",
                  "| model | n | encoder -> upward messages | decoder -> posteriors | decoder probe KL (nats/node) |",
                  "|---|---|---|---|---|"]
        for r in sorted(probed, key=lambda r: (r["denoiser"], r["n"])):
            p = r["probes"]
            lines.append(f"| {r['denoiser']} | {r['n']} | {' '.join(f'{v:.2f}' for v in p['encoder_r2'])} | "
                         f"{' '.join(f'{v:.2f}' for v in p['decoder_r2'])} | "
                         f"{' '.join(f'{v:.3f}' for v in p['decoder_kl'])} |")
        lines.append("")
    return lines
