"""Kernels: how a parent symbol emits its ``branching`` children (one tree level).

Two families (docs/ghm.md):

- :class:`ProductionKernel` -- a parent ``a`` picks rule ``r`` with probability ``weights[a, r]``
  and emits the tuple ``rules[a, r]`` (the random hierarchy model of Cagnetta et al. 2024).
- :class:`FactorizedKernel` -- children are independent given the parent, child ``j`` drawn from
  ``transitions[j, a]`` (Mei 2024's GHM; the hidden Markov tree).

Kernels are immutable; their parameters are stored in float64 so that enumeration and
``log_prob`` are exact, and cast to the evidence dtype inside BP.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hdiff.ghm._checks import check_distribution
from hdiff.ghm._random import categorical



@dataclass(frozen=True, eq=False)
class ProductionKernel:
    """Production rules ``a -> rules[a, r]`` chosen with probability ``weights[a, r]``.

    Args:
        rules: LongTensor ``(num_parents, num_rules, branching)`` of child symbols.
        weights: ``(num_parents, num_rules)``, non-negative rows summing to one.
        num_children: size of the child vocabulary (default: ``rules.max() + 1``).

    Raises:
        ValueError: naming ``rules``, ``weights`` or ``num_children`` when the spec is invalid.
    """

    rules: torch.Tensor
    weights: torch.Tensor
    num_children: int = field(default=-1)

    def __post_init__(self) -> None:
        rules, weights = self.rules, self.weights
        if not isinstance(rules, torch.Tensor) or rules.dtype not in (torch.int64, torch.int32):
            raise ValueError("rules must be an integer (Long) tensor of shape (num_parents, num_rules, branching)")
        if rules.ndim != 3 or min(rules.shape) < 1:
            raise ValueError(f"rules must have shape (num_parents, num_rules, branching), got {tuple(rules.shape)}")
        if rules.shape[2] < 2:
            raise ValueError(f"rules: branching must be >= 2, got {rules.shape[2]}")
        if not isinstance(weights, torch.Tensor) or not weights.is_floating_point():
            raise ValueError("weights must be a floating-point tensor of shape (num_parents, num_rules)")
        if tuple(weights.shape) != tuple(rules.shape[:2]):
            raise ValueError(f"weights must have shape {tuple(rules.shape[:2])} (num_parents, num_rules), got {tuple(weights.shape)}")
        num_children = int(self.num_children)
        if num_children == -1:
            num_children = int(rules.max()) + 1
        if num_children < 1:
            raise ValueError(f"num_children must be >= 1, got {num_children}")
        if int(rules.min()) < 0 or int(rules.max()) >= num_children:
            raise ValueError(f"rules: symbols must lie in [0, {num_children}), got range [{int(rules.min())}, {int(rules.max())}]")
        weights = check_distribution(weights.to(torch.float64), "weights")
        object.__setattr__(self, "rules", rules.to(torch.int64).contiguous())
        object.__setattr__(self, "weights", weights)
        object.__setattr__(self, "num_children", num_children)

    @property
    def num_parents(self) -> int:
        """Number of parent symbols."""
        return self.rules.shape[0]

    @property
    def num_rules(self) -> int:
        """Rules (productions) per parent symbol, ``m``."""
        return self.rules.shape[1]

    @property
    def branching(self) -> int:
        """Children per node, ``s``."""
        return self.rules.shape[2]

    @property
    def unambiguous(self) -> bool:
        """True when every child tuple with positive weight has a single (parent, rule) origin."""
        used = self.rules[self.weights > 0]  # (K, s)
        return torch.unique(used, dim=0).shape[0] == used.shape[0]

    @property
    def device(self) -> torch.device:
        """Device of the parameters."""
        return self.rules.device

    def sample_children(self, parents: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw children of ``parents`` ``(n, N)`` -> ``(n, N * branching)`` in tree order."""
        rule = categorical(self.weights[parents], generator=generator)  # (n, N)
        return self.rules[parents, rule].flatten(1)

    def to(self, device: torch.device | str) -> "ProductionKernel":
        """A copy on ``device``."""
        return ProductionKernel(self.rules.to(device), self.weights.to(device), self.num_children)

    def state(self) -> dict[str, torch.Tensor]:
        """Tensors to save (see :meth:`hdiff.ghm.GHM.save`)."""
        return {"rules": self.rules, "weights": self.weights}


@dataclass(frozen=True, eq=False)
class FactorizedKernel:
    """Children independent given the parent: child ``j`` ~ ``transitions[j, a, :]``.

    Args:
        transitions: ``(branching, num_parents, num_children)``, non-negative rows summing to one.

    Raises:
        ValueError: naming ``transitions`` when the spec is invalid.
    """

    transitions: torch.Tensor

    def __post_init__(self) -> None:
        t = self.transitions
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise ValueError("transitions must be a floating-point tensor of shape (branching, num_parents, num_children)")
        if t.ndim != 3 or min(t.shape) < 1:
            raise ValueError(f"transitions must have shape (branching, num_parents, num_children), got {tuple(t.shape)}")
        if t.shape[0] < 2:
            raise ValueError(f"transitions: branching must be >= 2, got {t.shape[0]}")
        object.__setattr__(self, "transitions", check_distribution(t.to(torch.float64), "transitions"))

    @property
    def num_parents(self) -> int:
        """Number of parent symbols."""
        return self.transitions.shape[1]

    @property
    def num_children(self) -> int:
        """Size of the child vocabulary."""
        return self.transitions.shape[2]

    @property
    def branching(self) -> int:
        """Children per node, ``s``."""
        return self.transitions.shape[0]

    @property
    def device(self) -> torch.device:
        """Device of the parameters."""
        return self.transitions.device

    def sample_children(self, parents: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw children of ``parents`` ``(n, N)`` -> ``(n, N * branching)`` in tree order."""
        probs = self.transitions[:, parents].permute(1, 2, 0, 3)  # (n, N, s, C)
        return categorical(probs, generator=generator).flatten(1)

    def to(self, device: torch.device | str) -> "FactorizedKernel":
        """A copy on ``device``."""
        return FactorizedKernel(self.transitions.to(device))

    def state(self) -> dict[str, torch.Tensor]:
        """Tensors to save (see :meth:`hdiff.ghm.GHM.save`)."""
        return {"transitions": self.transitions}


Kernel = ProductionKernel | FactorizedKernel
