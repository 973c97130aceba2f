"""Sample efficiency of root classification: tree ConvNet vs MLP vs the Bayes classifier (BP).

Mei (2024) shows that a ConvNet whose pooling follows the tree implements BP's upward pass, hence
the Bayes classifier of the root; Cagnetta et al. (PRX 2024) find that on the RHM such a deep CNN
needs about ``n_c m^L`` training samples, a fully connected net about the number of valid strings
``P_max = n_c m^((s^L - 1)/(s - 1))`` (docs/ghm.md, "The random hierarchy model (RHM)").
:func:`run_classify` measures it: for each training-set size ``n`` it trains
:class:`~hdiff.models.RootClassifier` and an :class:`MLPClassifier` of similar parameter count on
the first ``n`` samples of one stream (the training sets are nested), and reports their test
accuracy beside the Bayes-optimal accuracy, that of ``argmax p(root | leaves)`` from exact BP.
For an unambiguous RHM the leaves determine the root, so the Bayes accuracy is exactly 1: the
question is only how many samples each architecture needs to approach it.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from hdiff.bp import posterior
from hdiff.config import GHMConfig, load_toml, to_toml
from hdiff.models import RootClassifier
from hdiff.ghm import GHM
from hdiff.experiments.plots import save_figure
from hdiff.io import write_csv_atomic, write_json_atomic, write_text_atomic

ModelName = Literal["convnet", "mlp"]


class MLPClassifier(nn.Module):
    """Fully connected baseline: one-hot leaves ``(B, N * v)`` -> hidden layers -> root logits.

    Args:
        vocab_size: ``v``.
        num_leaves: ``N`` (``s**L``; images are flattened).
        num_classes: root symbols.
        width: hidden width.
        hidden_layers: number of hidden layers (>= 1), each ``Linear`` + ``SiLU``.

    ``forward(x)``: tokens ``(B, *leaf_shape)`` -> logits ``(B, num_classes)``.
    """

    def __init__(self, vocab_size: int, num_leaves: int, num_classes: int, width: int, hidden_layers: int = 2) -> None:
        super().__init__()
        if hidden_layers < 1 or width < 1:
            raise ValueError(f"hidden_layers and width must be >= 1, got {hidden_layers}, {width}")
        self.vocab_size = vocab_size
        dims = [num_leaves * vocab_size] + [width] * hidden_layers
        layers: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.SiLU()]
        self.net = nn.Sequential(*layers, nn.Linear(width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Root logits ``(B, num_classes)`` for tokens ``x`` ``(B, *leaf_shape)``."""
        onehot = nn.functional.one_hot(x.long().flatten(1), self.vocab_size).float()
        return self.net(onehot.flatten(1))

    @staticmethod
    def width_for(params: int, vocab_size: int, num_leaves: int, num_classes: int, hidden_layers: int = 2) -> int:
        """The hidden width whose parameter count is closest to ``params`` (solves the quadratic)."""
        d_in, c, k = num_leaves * vocab_size, num_classes, hidden_layers - 1
        # params(w) = k w^2 + (d_in + 1 + k + c) w + c
        b = d_in + 1 + k + c
        if k == 0:
            return max(1, round((params - c) / b))
        return max(1, round((-b + math.sqrt(b * b + 4 * k * (params - c))) / (2 * k)))


def num_params(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@dataclass
class ClassifyModelConfig:
    """The two architectures. ``mlp_width = 0`` picks the width matching the ConvNet's parameter count."""

    channels: int = 64
    dropout: float = 0.0
    mlp_hidden_layers: int = 2
    mlp_width: int = 0

    def __post_init__(self) -> None:
        for name, low in (("channels", 1), ("mlp_hidden_layers", 1), ("mlp_width", 0)):
            if getattr(self, name) < low:
                raise ValueError(f"model.{name} must be >= {low}, got {getattr(self, name)}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"model.dropout must lie in [0, 1), got {self.dropout}")


@dataclass
class ClassifyOptimConfig:
    """AdamW + cross-entropy on minibatches; stop early once the training set is fitted.

    Every ``eval_every`` steps the full training set is scored; training stops when its loss is
    below ``stop_loss`` (no held-out labels are used, so the sample count is honest).
    """

    lr: float = 0.003
    weight_decay: float = 0.01
    batch_size: int = 128
    max_steps: int = 3000
    eval_every: int = 50
    stop_loss: float = 0.01

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"optim.lr must be > 0 (0 never moves the weights), got {self.lr}")
        for name in ("batch_size", "max_steps", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"optim.{name} must be >= 1, got {getattr(self, name)}")
        if self.weight_decay < 0 or self.stop_loss < 0:
            raise ValueError(f"optim.weight_decay and optim.stop_loss must be >= 0, got {self.weight_decay}, "
                             f"{self.stop_loss}")


@dataclass
class ClassifyConfig:
    """``hdiff classify``: which GHM, which training-set sizes, how to train."""

    ghm: GHMConfig = field(default_factory=GHMConfig)
    n_train: list[int] = field(default_factory=lambda: [64, 128, 256, 512, 1024, 2048, 4096])
    n_test: int = 2048
    models: list[ModelName] = field(default_factory=lambda: ["convnet", "mlp"])
    data_seed: int = 0
    seed: int = 0
    threads: int = 0  # torch intra-op threads; 0 keeps torch's default
    model: ClassifyModelConfig = field(default_factory=ClassifyModelConfig)
    optim: ClassifyOptimConfig = field(default_factory=ClassifyOptimConfig)

    def __post_init__(self) -> None:
        if not self.n_train or any(n < 1 for n in self.n_train):
            raise ValueError(f"n_train must be a non-empty list of positive sizes, got {self.n_train}")
        if self.n_test < 1:
            raise ValueError(f"n_test must be >= 1, got {self.n_test}")
        if not self.models:
            raise ValueError("models must name at least one of 'convnet', 'mlp'")
        for name in ("data_seed", "seed", "threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


def load_classify_config(path: str | os.PathLike) -> ClassifyConfig:
    """Read a :class:`ClassifyConfig` from TOML (unknown keys and wrong types raise, naming the field)."""
    return load_toml(ClassifyConfig, path)


def build_model(name: ModelName, ghm: GHM, cfg: ClassifyModelConfig) -> nn.Module:
    """A fresh ConvNet (:class:`RootClassifier`) or an :class:`MLPClassifier` sized like it."""
    conv = RootClassifier(vocab_size=ghm.vocab_size, num_classes=ghm.num_classes, branching=ghm.branching,
                          depth=ghm.depth, layout=ghm.layout, channels=cfg.channels, dropout=cfg.dropout)
    if name == "convnet":
        return conv
    width = cfg.mlp_width or MLPClassifier.width_for(num_params(conv), ghm.vocab_size, ghm.num_leaves,
                                                     ghm.num_classes, cfg.mlp_hidden_layers)
    return MLPClassifier(ghm.vocab_size, ghm.num_leaves, ghm.num_classes, width, cfg.mlp_hidden_layers)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 4096) -> tuple[float, float]:
    """``(mean cross-entropy, accuracy)`` of ``model`` on tokens ``x`` ``(B, *leaf_shape)``, labels ``y`` ``(B,)``."""
    model.eval()
    loss, correct = 0.0, 0
    for i in range(0, len(x), batch_size):
        logits = model(x[i:i + batch_size])
        loss += float(nn.functional.cross_entropy(logits, y[i:i + batch_size], reduction="sum"))
        correct += int((logits.argmax(-1) == y[i:i + batch_size]).sum())
    return loss / max(len(x), 1), correct / max(len(x), 1)


def train_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: ClassifyOptimConfig, *,
                     generator: torch.Generator) -> dict[str, float]:
    """Fit ``model`` to ``(x, y)`` with AdamW and cross-entropy (minibatches drawn with ``generator``).

    Args:
        model: maps tokens ``(B, *leaf_shape)`` to logits ``(B, num_classes)``.
        x: training tokens ``(n, *leaf_shape)``.
        y: root labels ``(n,)``.
        cfg: optimiser settings.
        generator: the only RNG for minibatch order.

    Returns:
        ``{"steps", "train_loss", "train_accuracy"}`` at the end.
    """
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n = len(x)
    batch = min(cfg.batch_size, n)
    perm, pos, step = torch.randperm(n, generator=generator), 0, 0
    train_loss, train_acc = evaluate(model, x, y)
    while step < cfg.max_steps and train_loss >= cfg.stop_loss:
        model.train()
        if pos + batch > n:  # a new epoch
            perm, pos = torch.randperm(n, generator=generator), 0
        idx = perm[pos:pos + batch]
        pos += batch
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            train_loss, train_acc = evaluate(model, x, y)
    return {"steps": step, "train_loss": train_loss, "train_accuracy": train_acc}


def bayes_accuracy(ghm: GHM, x: torch.Tensor, y: torch.Tensor) -> float:
    """Accuracy of ``argmax_c p(root = c | x)`` (exact BP on hard leaf evidence): the best any classifier can do."""
    root = posterior(ghm, ghm.hard_evidence(x)).root_marginals
    return float((root.argmax(-1) == y).float().mean())


def n_at_fraction(ns: list[int], accuracies: list[float], target: float) -> float | None:
    """Smallest ``n`` at which accuracy reaches ``target``, interpolated linearly in ``log n`` between grid points.

    Returns ``None`` when no grid point reaches it ("not reached"); the first grid point if it already does.
    """
    for i, (n, acc) in enumerate(zip(ns, accuracies)):
        if acc >= target:
            if i == 0:
                return float(n)
            n0, a0 = ns[i - 1], accuracies[i - 1]
            t = (target - a0) / (acc - a0)
            return float(math.exp(math.log(n0) + t * (math.log(n) - math.log(n0))))
    return None


def plot_accuracy(metrics: dict, path: str | os.PathLike) -> None:
    """Test accuracy vs ``n`` (log axis) per model, with the Bayes accuracy, 90% of it and chance."""
    from hdiff.experiments.plots import plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, res in metrics["models"].items():
        ax.plot(res["n"], res["test_accuracy"], "o-", label=f"{name} ({res['params']} params)")
    ax.axhline(metrics["bayes_accuracy"], color="k", ls="--", lw=1, label="Bayes (BP)")
    ax.axhline(0.9 * metrics["bayes_accuracy"], color="gray", ls=":", lw=1, label="90% of Bayes")
    ax.axhline(metrics["chance_accuracy"], color="gray", ls="-.", lw=1, label="chance")
    ax.set_xscale("log")
    ax.set_xlabel("training samples n")
    ax.set_ylabel("test accuracy")
    ax.set_title(metrics["ghm"], fontsize=7)
    ax.legend(fontsize=8)
    save_figure(fig, path, dpi=110)


def run_classify(cfg: ClassifyConfig, out: str | os.PathLike, *, progress: bool = True) -> dict:
    """Train every model at every ``n`` and write ``config.toml``, ``metrics.json``, ``metrics.csv``, ``accuracy.png``.

    Args:
        cfg: the experiment.
        out: output directory (created; files are replaced atomically, a rerun recomputes).
        progress: show a tqdm bar over the sweep.

    Returns:
        The metrics: ``bayes_accuracy``, ``chance_accuracy``, and per model lists over ``n``
        (``test_accuracy``, ``train_accuracy``, ``steps``, ``seconds``) plus ``n90``, the interpolated
        ``n`` at which test accuracy reaches 90% of the Bayes accuracy (``None``: not reached).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "config.toml", to_toml(cfg))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    start = time.perf_counter()
    ghm = cfg.ghm.build()
    data_gen = torch.Generator().manual_seed(cfg.data_seed)
    x_train, tree = ghm.sample(max(cfg.n_train), generator=data_gen, return_tree=True)
    y_train = tree[0].flatten()
    x_test, tree = ghm.sample(cfg.n_test, generator=data_gen, return_tree=True)  # same stream, later draws
    y_test = tree[0].flatten()
    bayes = bayes_accuracy(ghm, x_test, y_test)
    counts = torch.bincount(y_test, minlength=ghm.num_classes)
    metrics: dict = {"ghm": repr(ghm), "bayes_accuracy": bayes, "chance_accuracy": float(ghm.root_prior.max()),
                     "majority_class_test_accuracy": float(counts.max()) / cfg.n_test, "n_test": cfg.n_test,
                     "models": {}}
    ns = sorted(cfg.n_train)
    rows = []
    bar = tqdm([(name, n) for name in cfg.models for n in ns], desc="classify", disable=not progress)
    for name, n in bar:
        bar.set_postfix(model=name, n=n)
        torch.manual_seed(cfg.seed)  # only nn.Module init draws from the global RNG; keep it reproducible
        model = build_model(name, ghm, cfg.model)
        t0 = time.perf_counter()
        fit = train_classifier(model, x_train[:n], y_train[:n], cfg.optim,
                               generator=torch.Generator().manual_seed(cfg.seed + n))
        _, acc = evaluate(model, x_test, y_test)
        row = {"model": name, "n": n, "params": num_params(model), "test_accuracy": acc, **fit,
               "seconds": time.perf_counter() - t0}
        rows.append(row)
        res = metrics["models"].setdefault(name, {"params": row["params"], "n": [], "test_accuracy": [],
                                                  "train_accuracy": [], "train_loss": [], "steps": [], "seconds": []})
        for k in ("n", "test_accuracy", "train_accuracy", "train_loss", "steps", "seconds"):
            res[k].append(row[k])
    for res in metrics["models"].values():
        res["n90"] = n_at_fraction(res["n"], res["test_accuracy"], 0.9 * bayes)
    metrics["wall_seconds"] = time.perf_counter() - start
    metrics["config"] = asdict(cfg)
    write_csv_atomic(out / "metrics.csv", rows)
    write_json_atomic(out / "metrics.json", metrics)
    plot_accuracy(metrics, out / "accuracy.png")
    return metrics


def format_classify(metrics: dict) -> str:
    """A short human summary: Bayes accuracy and each model's n90."""
    lines = [f"Bayes accuracy {metrics['bayes_accuracy']:.3f} (chance {metrics['chance_accuracy']:.3f})"]
    for name, res in metrics["models"].items():
        n90 = "not reached" if res["n90"] is None else f"{res['n90']:.0f}"
        accs = ", ".join(f"{n}: {a:.3f}" for n, a in zip(res["n"], res["test_accuracy"]))
        lines.append(f"{name} ({res['params']} params): n90 = {n90}; test accuracy {accs}")
    return "\n".join(lines)


__all__ = ["MLPClassifier", "ClassifyConfig", "ClassifyModelConfig", "ClassifyOptimConfig", "load_classify_config",
           "build_model", "train_classifier", "evaluate", "bayes_accuracy", "n_at_fraction", "run_classify",
           "format_classify", "num_params"]
