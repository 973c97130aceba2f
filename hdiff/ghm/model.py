"""The generative hierarchical model (GHM): a root prior and one kernel per level."""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file

from hdiff.ghm._checks import check_distribution
from hdiff.io import atomic_write
from hdiff.tokens import check_tokens
from hdiff.ghm._random import categorical
from hdiff.ghm.kernels import FactorizedKernel, Kernel, ProductionKernel
from hdiff.ghm.layout import LAYOUTS, from_tree_order, level_shape

#: the most leaves a GHM may have: one sample is then 128 MiB of tokens and BP on it a few GiB
MAX_LEAVES = 2**24
#: the most bytes a GHM's parameters (root prior and kernels, float64) may take
MAX_PARAMETER_BYTES = 2 * 2**30
_GIB = 2**30


def size_error(branching: int, depth: int, vocab_size: int, parameter_bytes: int) -> str | None:
    """Why a GHM of this size is refused (one line, with the memory it would need), or None if it fits.

    Checked before anything is allocated (by :class:`GHM`, the random families and the ``[ghm]``
    config), because a too-deep tree does not fail cleanly later: sampling ``n`` strings of
    ``s**L`` leaves or running BP on them would exhaust the memory of the machine.
    """
    leaves = branching**depth
    if leaves > MAX_LEAVES:
        tokens = leaves * 8 / _GIB
        bp = leaves * vocab_size * 4 * 3 / _GIB  # float32 evidence plus the messages of two levels
        return (f"branching**depth = {branching}**{depth} = {leaves} leaves is more than hdiff supports "
                f"({MAX_LEAVES} = 2**24): one sample would need {tokens:.3g} GiB of tokens and exact BP on it "
                f"about {bp:.3g} GiB")
    if parameter_bytes > MAX_PARAMETER_BYTES:
        return (f"the GHM's parameters would need {parameter_bytes / _GIB:.3g} GiB (float64), more than the "
                f"{MAX_PARAMETER_BYTES / _GIB:.3g} GiB hdiff allows")
    return None


_FORMAT = "hdiff.ghm/1"


@dataclass(frozen=True)
class Entropy:
    """Entropy of the leaves, ``H(x) = -E log p(x)``, in nats.

    Attributes:
        nats: the value (exact, or a Monte-Carlo mean of ``-log p(x)``).
        stderr: its standard error (0 when exact).
        exact: whether the value is exact.
        num_leaves: leaves per sample, for :attr:`bits_per_leaf`.
    """

    nats: float
    stderr: float
    exact: bool
    num_leaves: int

    @property
    def bits_per_leaf(self) -> float:
        """``nats / (num_leaves * ln 2)``."""
        return self.nats / (self.num_leaves * math.log(2))


class GHM:
    """A tree-structured generative model over discrete symbols.

    The root symbol ``y ~ root_prior``; each kernel, listed root to leaves, draws the children of
    every node of its level. Node ``i`` at level ``l`` has children ``s*i + j`` (tree order); the
    ``layout`` only decides how leaves are arranged in user tensors (see :mod:`hdiff.ghm.layout`).

    Args:
        root_prior: ``(num_classes,)`` probabilities.
        kernels: one kernel per level, root to leaves; kernel ``l``'s ``num_children`` must equal
            kernel ``l+1``'s ``num_parents``, and all must share one ``branching``.
        layout: ``"sequence"`` (leaves ``(s**L,)``) or ``"image"`` (branching 4, ``(2**L, 2**L)``).

    Raises:
        ValueError: naming ``root_prior``, ``kernels`` or ``layout`` for an invalid spec.
    """

    def __init__(self, root_prior: torch.Tensor, kernels: Sequence[Kernel], layout: str = "sequence") -> None:
        if not isinstance(root_prior, torch.Tensor) or not root_prior.is_floating_point() or root_prior.ndim != 1:
            raise ValueError("root_prior must be a 1-D floating-point tensor of shape (num_classes,)")
        self.root_prior = check_distribution(root_prior.to(torch.float64), "root_prior")
        kernels = list(kernels)
        if not kernels:
            raise ValueError("kernels must hold at least one kernel (depth >= 1)")
        for i, k in enumerate(kernels):
            if not isinstance(k, (ProductionKernel, FactorizedKernel)):
                raise ValueError(f"kernels[{i}] must be a ProductionKernel or FactorizedKernel, got {type(k).__name__}")
        if kernels[0].num_parents != self.root_prior.shape[0]:
            raise ValueError(f"kernels[0].num_parents ({kernels[0].num_parents}) must equal len(root_prior) ({self.root_prior.shape[0]})")
        for i in range(1, len(kernels)):
            if kernels[i].num_parents != kernels[i - 1].num_children:
                raise ValueError(f"kernels[{i}].num_parents ({kernels[i].num_parents}) must equal kernels[{i-1}].num_children ({kernels[i-1].num_children})")
            if kernels[i].branching != kernels[0].branching:
                raise ValueError(f"kernels[{i}].branching ({kernels[i].branching}) differs from kernels[0] ({kernels[0].branching})")
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if layout == "image" and kernels[0].branching != 4:
            raise ValueError(f"layout 'image' needs branching 4 (2x2 blocks), got branching {kernels[0].branching}")
        too_big = size_error(kernels[0].branching, len(kernels), kernels[-1].num_children, 0)
        if too_big is not None:
            raise ValueError(f"kernels: {too_big}")
        devices = {k.device for k in kernels}
        if len(devices) > 1:
            raise ValueError(f"kernels must share one device, got {sorted(map(str, devices))}")
        self.kernels: tuple[Kernel, ...] = tuple(kernels)
        self.layout = layout
        self.root_prior = self.root_prior.to(next(iter(devices)))

    # ----------------------------------------------------------------- sizes
    @property
    def depth(self) -> int:
        """Levels below the root, ``L``."""
        return len(self.kernels)

    @property
    def branching(self) -> int:
        """Children per node, ``s``."""
        return self.kernels[0].branching

    @property
    def vocab_size(self) -> int:
        """Leaf vocabulary size, ``v``."""
        return self.kernels[-1].num_children

    @property
    def num_classes(self) -> int:
        """Number of root symbols."""
        return self.root_prior.shape[0]

    @property
    def leaf_shape(self) -> tuple[int, ...]:
        """``(s**L,)`` for sequences, ``(2**L, 2**L)`` for images."""
        return level_shape(self.layout, self.branching, self.depth)

    @property
    def num_leaves(self) -> int:
        """``s**L``."""
        return self.branching**self.depth

    @property
    def device(self) -> torch.device:
        """Device of the parameters."""
        return self.root_prior.device

    def level_shape(self, level: int) -> tuple[int, ...]:
        """Node arrangement at ``level`` (0 = root, ``depth`` = leaves)."""
        return level_shape(self.layout, self.branching, level)

    def symbols(self, level: int) -> int:
        """Alphabet size at ``level`` (num_classes at the root, ``vocab_size``-like below)."""
        return self.num_classes if level == 0 else self.kernels[level - 1].num_children

    def __repr__(self) -> str:
        kinds = "/".join(sorted({type(k).__name__ for k in self.kernels}))
        return (f"GHM({kinds}, layout={self.layout!r}, depth={self.depth}, branching={self.branching}, "
                f"vocab_size={self.vocab_size}, num_classes={self.num_classes})")

    # ------------------------------------------------------------ constructors
    @classmethod
    def random_hierarchy(cls, vocab_size: int, num_rules: int, branching: int, depth: int, *,
                         num_classes: int | None = None, layout: str = "sequence",
                         rule_probs: str = "uniform", seed: int = 0) -> "GHM":
        """The random hierarchy model (Cagnetta et al., PRX 2024); see :mod:`hdiff.ghm.random`."""
        from hdiff.ghm.random import random_hierarchy

        return random_hierarchy(vocab_size, num_rules, branching, depth, num_classes=num_classes,
                                layout=layout, rule_probs=rule_probs, seed=seed)

    @classmethod
    def random_factorized(cls, vocab_size: int, branching: int, depth: int, *, num_classes: int | None = None,
                          layout: str = "sequence", concentration: float = 1.0, seed: int = 0) -> "GHM":
        """A factorized GHM with Dirichlet transitions (Mei 2024); see :mod:`hdiff.ghm.random`."""
        from hdiff.ghm.random import random_factorized

        return random_factorized(vocab_size, branching, depth, num_classes=num_classes, layout=layout,
                                 concentration=concentration, seed=seed)

    # ---------------------------------------------------------------- sampling
    def sample(self, n: int, *, generator: torch.Generator | None = None,
               return_tree: bool = False) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Ancestral samples.

        Args:
            n: number of samples.
            generator: torch RNG (on this GHM's device) for reproducibility.
            return_tree: also return every level's symbols.

        Returns:
            tokens ``(n, *leaf_shape)`` long; with ``return_tree`` also a list of ``depth + 1``
            tensors, root first, level ``l`` of shape ``(n, *level_shape(l))``.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be a non-negative int, got {n!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        nodes = categorical(self.root_prior.expand(n, 1, -1), generator=generator)  # (n, 1)
        levels = [nodes]
        for kernel in self.kernels:
            nodes = kernel.sample_children(nodes, generator=generator)
            levels.append(nodes)
        levels = [from_tree_order(x, self.layout, l) for l, x in enumerate(levels)]
        return (levels[-1], levels) if return_tree else levels[-1]

    # -------------------------------------------------------------- likelihood
    def check_tokens(self, x: torch.Tensor, name: str = "x") -> None:
        """Raise ``ValueError`` unless ``x`` is a LongTensor ``(B, *leaf_shape)`` in ``[0, vocab_size)``."""
        check_tokens(x, name, self.vocab_size, leaf_shape=self.leaf_shape)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Exact ``log p(x)`` (float64, ``-inf`` where impossible), via BP with hard evidence.

        Args:
            x: tokens ``(B, *leaf_shape)``.

        Returns:
            ``(B,)`` float64.
        """
        from hdiff.bp import log_evidence

        self.check_tokens(x)
        return log_evidence(self, self.hard_evidence(x.to(self.device), dtype=torch.float64))

    def hard_evidence(self, x: torch.Tensor, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Leaf log-likelihood pinning every leaf to its token: ``(B, *leaf_shape, v)``, 0 / ``-inf``.

        Raises:
            ValueError: as :meth:`check_tokens`.
        """
        self.check_tokens(x)
        evidence = torch.full((*x.shape, self.vocab_size), -math.inf, dtype=dtype, device=x.device)
        return evidence.scatter_(-1, x.long().unsqueeze(-1), 0.0)

    def entropy(self, *, num_samples: int = 4096, generator: torch.Generator | None = None) -> Entropy:
        """Entropy of the leaves in nats.

        Exact when every kernel is an unambiguous :class:`ProductionKernel` (the leaves then
        determine the whole tree, so ``H(x) = H(root) + sum over nodes of E H(rule | symbol)``,
        for any rule weights; with uniform weights this is ``log n_c + (s^L - 1)/(s - 1) log m``).
        Otherwise a Monte-Carlo mean of ``-log p(x)`` over ``num_samples`` samples, with its
        standard error.
        """
        if all(isinstance(k, ProductionKernel) and k.unambiguous for k in self.kernels):
            marg = self.root_prior.unsqueeze(0)  # (N_l, A): marginal of each node's symbol
            h = -(self.root_prior * _xlogx_safe_log(self.root_prior)).sum()
            for k in self.kernels:
                w = k.weights
                rule_h = -(w * _xlogx_safe_log(w)).sum(-1)  # (A,)
                h = h + (marg @ rule_h).sum()
                joint = marg.unsqueeze(-1) * w  # (N, A, m)
                onehot = torch.nn.functional.one_hot(k.rules, k.num_children).to(joint.dtype)  # (A, m, s, C)
                marg = torch.einsum("nar,arjc->njc", joint, onehot).flatten(0, 1)
            return Entropy(float(h), 0.0, True, self.num_leaves)
        lp = self.log_prob(self.sample(num_samples, generator=generator))
        return Entropy(float(-lp.mean()), float(lp.std() / math.sqrt(num_samples)), False, self.num_leaves)

    # ------------------------------------------------------------ persistence
    def to(self, device: torch.device | str) -> "GHM":
        """A copy of this GHM on ``device``."""
        return GHM(self.root_prior.to(device), [k.to(device) for k in self.kernels], self.layout)

    def _canonical(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """The structure (JSON-able) and the tensors (CPU, contiguous) that define this GHM."""
        tensors = {"root_prior": self.root_prior.cpu().contiguous()}
        meta = {"format": _FORMAT, "layout": self.layout, "kernels": []}
        for i, k in enumerate(self.kernels):
            entry = {"type": "production" if isinstance(k, ProductionKernel) else "factorized"}
            if isinstance(k, ProductionKernel):
                entry["num_children"] = k.num_children
            meta["kernels"].append(entry)
            tensors.update({f"kernels.{i}.{name}": t.cpu().contiguous() for name, t in k.state().items()})
        return meta, tensors

    def sha256(self) -> str:
        """A content hash: SHA-256 over the structure (layout, kernel types) and every tensor's name,
        dtype, shape and bytes.

        Two GHMs have the same hash exactly when they define the same model the same way; a run
        records it (``ghm.json``, ``train_meta.json``) so that a swapped, truncated or edited GHM is
        found on load instead of scoring samples against the wrong model.
        """
        meta, tensors = self._canonical()
        h = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
        for name in sorted(tensors):
            t = tensors[name]
            h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
            h.update(t.numpy().tobytes())
        return h.hexdigest()

    def save(self, directory: str | os.PathLike) -> None:
        """Write ``ghm.safetensors`` (parameters) and ``ghm.json`` (structure and :meth:`sha256`) atomically."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        meta, tensors = self._canonical()
        meta["sha256"] = self.sha256()
        atomic_write(d / "ghm.safetensors", lambda p: save_file(tensors, p))
        atomic_write(d / "ghm.json", lambda p: Path(p).write_text(json.dumps(meta, indent=2)))

    @classmethod
    def load(cls, directory: str | os.PathLike, *, device: torch.device | str = "cpu") -> "GHM":
        """Read a GHM written by :meth:`save`, checking it against the hash in ``ghm.json``.

        GHMs saved before hashes were recorded load unchecked.

        Raises:
            ValueError: no saved GHM in ``directory``, or a truncated, corrupt or edited
                ``ghm.json`` / ``ghm.safetensors`` (naming the file).
        """
        d = Path(directory)
        meta_path, tensor_path = d / "ghm.json", d / "ghm.safetensors"
        if not meta_path.is_file() or not tensor_path.is_file():
            raise ValueError(f"directory {str(d)!r} holds no saved GHM (ghm.json + ghm.safetensors)")
        from hdiff.io import read_json

        meta = read_json(meta_path)
        if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
            raise ValueError(f"{meta_path}: unknown format {meta.get('format') if isinstance(meta, dict) else meta!r}")
        try:
            t = load_file(str(tensor_path), device=str(device))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for a bad file
            raise ValueError(f"{tensor_path}: corrupt or truncated safetensors file ({e})") from None
        try:
            kernels: list[Kernel] = []
            for i, entry in enumerate(meta["kernels"]):
                if entry.get("type") == "production":
                    kernels.append(ProductionKernel(t[f"kernels.{i}.rules"], t[f"kernels.{i}.weights"],
                                                    entry["num_children"]))
                elif entry.get("type") == "factorized":
                    kernels.append(FactorizedKernel(t[f"kernels.{i}.transitions"]))
                else:
                    raise ValueError(f"kernels[{i}].type must be 'factorized' or 'production'")
            ghm = cls(t["root_prior"], kernels, meta["layout"])
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise ValueError(f"{meta_path}: does not describe the GHM in {tensor_path.name} "
                             f"({type(e).__name__}: {e})") from None
        expected = meta.get("sha256")
        if expected is not None and ghm.sha256() != expected:
            raise ValueError(f"{d}: ghm.json / ghm.safetensors were changed since they were saved "
                             f"(content hash {ghm.sha256()[:12]}..., recorded {str(expected)[:12]}...)")
        return ghm


def _xlogx_safe_log(p: torch.Tensor) -> torch.Tensor:
    """``log p`` with 0 where ``p == 0`` (so ``p * log p`` is 0 there)."""
    return torch.where(p > 0, p.clamp_min(1e-300).log(), 0.0)
