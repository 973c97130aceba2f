"""The report of ``hdiff compare``: PNG plots, ``report.md`` and a self-contained ``report.html``.

Everything is drawn from ``metrics.json`` (what :func:`hdiff.experiments.compare.run_compare`
returns) and the sample panels saved under ``OUT/samples/``; the HTML embeds its images, so it
reads offline from a single file.
"""

from __future__ import annotations

import base64
import html
import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from hdiff.experiments.diagnostics import diagnostics_markdown, plot_decomposition, plot_probes, plot_time_axis  # noqa: E402
from hdiff.experiments.plots import save_figure, symbol_colormap  # noqa: E402
from hdiff.io import load_tensor, write_text_atomic  # noqa: E402

ORACLE = "oracle"
PLOTS = {
    "validity.png": "Validity and per-level validity vs training-set size",
    "nelbo.png": "Likelihood bound (held-out) vs training-set size",
    "memorisation.png": "Memorisation and novelty vs training-set size",
    "kl.png": "KL(oracle || learned) of the leaf posteriors vs signal level",
    "decomposition.png": "Gap decomposition: estimation (finite n) vs what unlimited data does not fix at this budget",
    "time_axis.png": "Validity, coherence and KL along training (EMA snapshots)",
    "probes.png": "Linear probes: does each level of the network hold BP's messages?",
}


def _series(rows: list[dict], denoiser: str, key: str) -> tuple[list[int], list[float]]:
    pts = sorted((r["n"], r.get(key)) for r in rows if r["denoiser"] == denoiser)
    return [n for n, v in pts if v is not None], [v for _, v in pts if v is not None]


def _learned(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["denoiser"] for r in rows if r["denoiser"] != ORACLE))


def plot_validity(metrics: dict, path: Path) -> None:
    """Validity per sampler vs n (left); per-level validity of the first sampler vs n (right)."""
    rows, samplers = metrics["rows"], [s["name"] for s in metrics["samplers"]]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    colors = plt.get_cmap("tab10")
    for k, s in enumerate(samplers):
        for model in _learned(rows):
            a.plot(*_series(rows, model, f"{s}.validity"), "o-", color=colors(k), label=f"{model}, {s}")
        a.plot(*_series(rows, ORACLE, f"{s}.validity"), "--", color=colors(k), label=f"oracle, {s}")
    a.set(xscale="log", xlabel="training samples n", ylabel="valid fraction", ylim=(-0.02, 1.02), title="validity")
    a.legend(fontsize=7)
    main, model = samplers[0], (_learned(rows) or [ORACLE])[0]
    for l in range(1, metrics["depth"] + 1):
        b.plot(*_series(rows, model, f"{main}.level_validity_{l}"), "o-", color=colors(l - 1),
               label=f"l={l}: blocks of s^{l} leaves")
    b.set(xscale="log", xlabel="training samples n", ylabel="fraction coherent", ylim=(-0.02, 1.02),
          title=f"per-level validity ({model}, {main}); oracle = 1")
    b.legend(fontsize=7)
    save_figure(fig, path)


def plot_nelbo(metrics: dict, path: Path) -> None:
    """NELBO of every learned model vs n, with the oracle's bound, the exact held-out NLL and the entropy."""
    rows = metrics["rows"]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for model in _learned(rows):
        ns, mean = _series(rows, model, "nelbo_bits_per_leaf")
        _, se = _series(rows, model, "nelbo_se")
        ax.errorbar(ns, mean, yerr=[3 * s for s in se], fmt="o-", capsize=3, label=f"{model} NELBO (±3 SE)")
    _, oracle = _series(rows, ORACLE, "nelbo_bits_per_leaf")
    if oracle:
        ax.axhline(oracle[0], color="k", ls="--", label="oracle NELBO")
    ax.axhline(metrics["heldout_nll_bits_per_leaf"], color="tab:green", ls=":", label="exact NLL of the same data (BP)")
    ax.axhline(metrics["entropy_bits_per_leaf"], color="tab:red", ls="-.", lw=1, label="exact entropy")
    ax.set(xscale="log", yscale="log", xlabel="training samples n", ylabel="bits per leaf (log scale)",
           title=f"{metrics['process']} bound, held-out")
    ax.legend(fontsize=7)
    save_figure(fig, path)


def plot_memorisation(metrics: dict, path: Path) -> None:
    """Memorisation (copies of the training set) and novelty (valid, not copied) vs n, first sampler."""
    rows, main = metrics["rows"], metrics["samplers"][0]["name"]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for k, model in enumerate(_learned(rows)):
        ax.plot(*_series(rows, model, f"{main}.memorisation"), "o-", color=f"C{2 * k}", label=f"{model} memorised")
        ax.plot(*_series(rows, model, f"{main}.novelty"), "s-", color=f"C{2 * k + 1}", label=f"{model} novel & valid")
    ax.plot(*_series(rows, ORACLE, f"{main}.memorisation"), "k--", label="oracle memorised")
    ax.set(xscale="log", xlabel="training samples n", ylabel="fraction of samples", ylim=(-0.02, 1.02), title=main)
    ax.legend(fontsize=7)
    save_figure(fig, path)


def plot_kl(metrics: dict, path: Path) -> None:
    """``KL(oracle || learned)`` per alpha bin, one curve per n, one panel per learned model."""
    rows, models = metrics["rows"], _learned(metrics["rows"])
    fig, axes = plt.subplots(1, max(1, len(models)), figsize=(6.5 * max(1, len(models)), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        mine = sorted((r for r in rows if r["denoiser"] == model), key=lambda r: r["n"])
        cmap = plt.get_cmap("viridis")
        for k, r in enumerate(mine):
            kl = np.asarray(r["kl_per_bin"], dtype=float)
            centres = (np.arange(len(kl)) + 0.5) / len(kl)
            ax.plot(centres, kl, "o-", color=cmap(k / max(1, len(mine) - 1)), label=f"n={r['n']}")
        ax.set(yscale="log", xlabel="signal level alpha (1 = clean)", ylabel="nats per noised leaf", title=model)
        ax.legend(fontsize=7)
    save_figure(fig, path)


def plot_panels(grid: list[list[tuple[str, torch.Tensor]]], vocab_size: int, path: Path, title: str) -> None:
    """Samples of several cells side by side: one row of subplots per list of ``(label, tokens)``."""
    cmap = symbol_colormap(vocab_size)
    images = grid[0][0][1].ndim == 3
    rows, cols = len(grid), max(len(r) for r in grid)
    fig, axes = plt.subplots(rows, cols, figsize=(min(3.0 * cols, 18), 3.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for row, panels in zip(axes, grid):
        for ax, (label, tokens) in zip(row, panels):
            x = tokens.numpy()
            if images:  # tile the images in a grid, one blank pixel between them
                k = int(np.ceil(np.sqrt(len(x))))
                h, w = x.shape[1] + 1, x.shape[2] + 1
                pad = np.full((k * k, h, w), -1)
                pad[:len(x), :-1, :-1] = x
                x = pad.reshape(k, k, h, w).transpose(0, 2, 1, 3).reshape(k * h, k * w)[:-1, :-1]
            ax.imshow(np.ma.masked_less(x, 0), cmap=cmap, vmin=-0.5, vmax=vocab_size - 0.5,
                      aspect="equal" if images else "auto", interpolation="nearest")
            ax.set_title(label, fontsize=8)
    fig.suptitle(title, fontsize=10)
    save_figure(fig, path)


def _sample_pictures(out: Path, metrics: dict) -> list[str]:
    """One figure per sampler: the oracle's samples, then each learned model's at every n (a row per
    model, one palette colour per symbol). Returns the file names."""
    names, rows = [], metrics["rows"]
    ns = sorted({r["n"] for r in rows})
    for s in metrics["samplers"]:
        grid = []
        for denoiser in [ORACLE, *_learned(rows)]:
            panels = []
            for n in ns:
                f = out / "samples" / f"{denoiser}_n{n}.{s['name']}.pt"
                if f.is_file():
                    panels.append((f"{denoiser}" if denoiser == ORACLE else f"{denoiser}, n={n}", load_tensor(f)))
                if denoiser == ORACLE and panels:
                    break  # the oracle does not depend on n
            if panels:
                grid.append(panels)
        if grid:
            name = f"samples_{s['name']}.png"
            plot_panels(grid, metrics["vocab_size"], out / name, f"samples: {s['name']} ({s['steps']} steps)")
            names.append(name)
    return names


def headline(metrics: dict) -> tuple[list[str], list[list[str]]]:
    """The report's table: one row per (n, denoiser)."""
    samplers = [s["name"] for s in metrics["samplers"]]
    main = samplers[0]
    head = ["n", "denoiser", *[f"valid ({s})" for s in samplers], f"memorised ({main})", f"novel ({main})",
            f"diversity ({main})", "NELBO bits/leaf", "KL(oracle‖learned) nats"]

    def pct(v: Any) -> str:
        return "-" if v is None else f"{100 * v:.1f}%"

    body = []
    for r in sorted(metrics["rows"], key=lambda r: (r["n"], r["denoiser"] == ORACLE, r["denoiser"])):
        body.append([str(r["n"]), r["denoiser"], *[pct(r.get(f"{s}.validity")) for s in samplers],
                     pct(r.get(f"{main}.memorisation")), pct(r.get(f"{main}.novelty")), pct(r.get(f"{main}.diversity")),
                     f"{r['nelbo_bits_per_leaf']:.4f} ± {r['nelbo_se']:.4f}",
                     "-" if "kl_mean" not in r else f"{r['kl_mean']:.4f}"])
    return head, body


def _reference_lines(metrics: dict) -> list[str]:
    samplers = ", ".join(f"{s['name']} = {s['scheduler']} x {s['steps']} steps"
                         + (f" ({s['unmasking']})" if s["scheduler"] == "masked" else "") for s in metrics["samplers"])
    return [f"GHM: {metrics['ghm']}; noise: {metrics['process']}; samplers: {samplers}.",
            f"Exact entropy {metrics['entropy_bits_per_leaf']:.4f} bits/leaf"
            + ("" if metrics["entropy_exact"] else f" (Monte Carlo, SE {metrics['entropy_se_bits_per_leaf']:.4f})")
            + f"; exact NLL of the held-out data of the bound {metrics['heldout_nll_bits_per_leaf']:.4f}"
            f" ± {metrics['heldout_nll_se']:.4f} bits/leaf (BP). Every NELBO must lie at or above it.",
            f"Sweep time {metrics['time_s']:.0f} s"
            + (f", of which training {metrics['training_time_s']:.0f} s" if "training_time_s" in metrics else "")
            + f" ({metrics['cells_skipped']} finished cells reused)."]


def _markdown_tables_html(lines: list[str]) -> str:
    """The diagnostics' markdown (``## heading``, prose, ``|`` tables) as HTML."""
    parts, rows = [], []

    def flush() -> None:
        if rows:
            cells = [[c.strip() for c in r.strip("|").split("|")] for r in rows if not set(r) <= set("|-")]
            parts.append("<table>" + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>"
                                             for r in cells) + "</table>")
            rows.clear()

    for line in lines:
        if line.startswith("|"):
            rows.append(line)
            continue
        flush()
        if line.startswith("## "):
            parts.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line:
            parts.append(f"<p>{html.escape(line)}</p>")
    flush()
    return "".join(parts)


def write_report(out: str | os.PathLike, metrics: dict) -> None:
    """Draw every plot and write ``report.md`` and ``report.html`` into ``out``."""
    out = Path(out)
    plot_validity(metrics, out / "validity.png")
    plot_nelbo(metrics, out / "nelbo.png")
    plot_memorisation(metrics, out / "memorisation.png")
    if _learned(metrics["rows"]):
        plot_kl(metrics, out / "kl.png")
    drawn = {"decomposition.png": plot_decomposition(metrics, out / "decomposition.png"),
             "time_axis.png": plot_time_axis(metrics, out / "time_axis.png"),
             "probes.png": plot_probes(metrics, out / "probes.png")}
    pictures = [p for p in PLOTS if drawn.get(p, True) and (out / p).is_file()] + _sample_pictures(out, metrics)
    diagnostics = diagnostics_markdown(metrics)
    head, body = headline(metrics)
    refs = _reference_lines(metrics)
    md = ["# hdiff compare: BP oracle vs learned denoisers", "", *[f"- {line}" for line in refs], "",
          "| " + " | ".join(head) + " |", "|" + "---|" * len(head), *["| " + " | ".join(r) + " |" for r in body], ""]
    md += diagnostics
    md += [f"![{PLOTS.get(p, p)}]({p})" + "\n" for p in pictures]
    write_text_atomic(out / "report.md", "\n".join(md))

    def img(p: str) -> str:
        data = base64.b64encode((out / p).read_bytes()).decode()
        return f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(p)}"><figcaption>{html.escape(PLOTS.get(p, p))}</figcaption></figure>'

    table = ("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"
             + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body) + "</table>")
    page = ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>hdiff compare</title><style>"
            "body{font-family:sans-serif;max-width:1200px;margin:auto}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:3px 6px;font-size:13px}img{max-width:100%}</style></head><body>"
            "<h1>hdiff compare: BP oracle vs learned denoisers</h1><ul>"
            + "".join(f"<li>{html.escape(line)}</li>" for line in refs) + "</ul>" + table
            + _markdown_tables_html(diagnostics) + "".join(img(p) for p in pictures) + "</body></html>")
    write_text_atomic(out / "report.html", page)
