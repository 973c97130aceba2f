"""Random GHM families: the random hierarchy model and the random factorized model."""

from __future__ import annotations

import numpy as np
import torch

from hdiff.ghm.kernels import FactorizedKernel, ProductionKernel
from hdiff.ghm.model import GHM, size_error

RULE_PROBS = ("uniform", "zipf")


def _check_sizes(**sizes: int) -> None:
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_fits(branching: int, depth: int, vocab_size: int, parameter_bytes: int) -> None:
    """Refuse a GHM too large to build or to use, before allocating any of it (:func:`size_error`)."""
    error = size_error(branching, depth, vocab_size, parameter_bytes)
    if error is not None:
        raise ValueError(error)


def _distinct_tuples(rng: np.random.Generator, count: int, vocab_size: int, branching: int) -> np.ndarray:
    """``count`` distinct tuples from ``[0, v)**s`` drawn uniformly without replacement -> ``(count, s)``."""
    total = vocab_size**branching
    if total <= 1 << 24:
        codes = rng.choice(total, size=count, replace=False)
    else:  # too many tuples to permute: rejection sampling of codes (count << total here)
        chosen: dict[int, None] = {}
        while len(chosen) < count:
            for c in rng.integers(0, total, size=2 * (count - len(chosen))):
                chosen.setdefault(int(c))
                if len(chosen) == count:
                    break
        codes = np.fromiter(chosen, dtype=np.int64, count=count)
    digits = [(codes // vocab_size**(branching - 1 - j)) % vocab_size for j in range(branching)]
    return np.stack(digits, axis=-1)


def random_hierarchy(vocab_size: int, num_rules: int, branching: int, depth: int, *,
                     num_classes: int | None = None, layout: str = "sequence",
                     rule_probs: str = "uniform", seed: int = 0) -> GHM:
    """The random hierarchy model (Cagnetta, Petrini, Tomasini, Favero, Wyart; PRX 2024).

    Each level's ``num_parents * num_rules`` rules are distinct ``branching``-tuples drawn without
    replacement from all ``vocab_size**branching`` tuples, so the grammar is unambiguous; this
    needs ``num_rules <= vocab_size**(branching - 1)`` (and ``num_classes * num_rules <=
    vocab_size**branching`` at the root). The root prior is uniform.

    Args:
        vocab_size: ``v``, symbols at every level below the root.
        num_rules: ``m``, productions per symbol.
        branching: ``s``.
        depth: ``L``.
        num_classes: root symbols (default ``vocab_size``).
        layout: ``"sequence"`` or ``"image"`` (needs branching 4).
        rule_probs: ``"uniform"`` (the RHM) or ``"zipf"`` (``weights[a, r] ∝ 1 / (r + 1)``).
        seed: the model's seed (the grammar is a function of it).
    """
    num_classes = vocab_size if num_classes is None else num_classes
    _check_sizes(vocab_size=vocab_size, num_rules=num_rules, branching=branching, depth=depth, num_classes=num_classes)
    if branching < 2:
        raise ValueError(f"branching must be >= 2, got {branching}")
    if num_rules > vocab_size ** (branching - 1):
        raise ValueError(f"num_rules ({num_rules}) must be <= vocab_size**(branching-1) = "
                         f"{vocab_size ** (branching - 1)} for an unambiguous grammar")
    if num_classes * num_rules > vocab_size**branching:
        raise ValueError(f"num_classes * num_rules ({num_classes * num_rules}) must be <= vocab_size**branching "
                         f"({vocab_size**branching}) for an unambiguous grammar")
    if rule_probs not in RULE_PROBS:
        raise ValueError(f"rule_probs must be one of {RULE_PROBS}, got {rule_probs!r}")
    # rules (int64, s per rule) and weights (float64) of every level, checked before any is drawn
    _check_fits(branching, depth, vocab_size,
                8 * (branching + 1) * num_rules * (num_classes + (depth - 1) * vocab_size))
    rng = np.random.default_rng(seed)
    if rule_probs == "uniform":
        w = np.full(num_rules, 1.0 / num_rules)
    else:
        w = 1.0 / np.arange(1, num_rules + 1)
        w /= w.sum()
    kernels = []
    for level in range(depth):
        parents = num_classes if level == 0 else vocab_size
        rules = _distinct_tuples(rng, parents * num_rules, vocab_size, branching).reshape(parents, num_rules, branching)
        weights = np.broadcast_to(w, (parents, num_rules))
        kernels.append(ProductionKernel(torch.from_numpy(rules).long(), torch.tensor(weights, dtype=torch.float64),
                                        num_children=vocab_size))
    prior = torch.full((num_classes,), 1.0 / num_classes, dtype=torch.float64)
    return GHM(prior, kernels, layout)


def random_factorized(vocab_size: int, branching: int, depth: int, *, num_classes: int | None = None,
                      layout: str = "sequence", concentration: float = 1.0, seed: int = 0) -> GHM:
    """A factorized GHM (Mei 2024; a hidden Markov tree) with random transitions.

    Every row ``transitions[j, a, :]`` is drawn from a symmetric Dirichlet(``concentration``);
    the root prior is uniform.
    """
    num_classes = vocab_size if num_classes is None else num_classes
    _check_sizes(vocab_size=vocab_size, branching=branching, depth=depth, num_classes=num_classes)
    if branching < 2:
        raise ValueError(f"branching must be >= 2, got {branching}")
    if not (isinstance(concentration, (int, float)) and concentration > 0 and np.isfinite(concentration)):
        raise ValueError(f"concentration must be a positive finite number, got {concentration!r}")
    _check_fits(branching, depth, vocab_size, 8 * branching * vocab_size * (num_classes + (depth - 1) * vocab_size))
    rng = np.random.default_rng(seed)
    kernels = []
    for level in range(depth):
        parents = num_classes if level == 0 else vocab_size
        t = rng.dirichlet(np.full(vocab_size, float(concentration)), size=(branching, parents))
        t = np.maximum(t, 0.0)
        t /= t.sum(-1, keepdims=True)
        kernels.append(FactorizedKernel(torch.from_numpy(t)))
    prior = torch.full((num_classes,), 1.0 / num_classes, dtype=torch.float64)
    return GHM(prior, kernels, layout)
