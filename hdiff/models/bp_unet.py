"""The BP U-Net: a U-Net whose weights are built from a GHM so that its forward pass is BP (Mei 2024).

Mei's "U-Nets as belief propagation" read exactly (docs/bp_unet.md): every level of the tree is
one encoder level and one decoder level, kept channels-last in tree order ``(B, N_l, channels)``
(node ``i``'s children at ``s*i + j``, :mod:`hdiff.ghm.layout`), log-messages as channels:

- input layer: the noise process's leaf log-likelihood ``U_leaf`` from ``(x_t, alpha)``;
- encoder (production level): the pooling conv (kernel = stride = ``s``) with 0/1 weights (one
  rule's child symbols) and bias ``log w`` gives ``z(a, r) = log w(a, r) + sum_j U_j(rho_j(a, r))``;
  a grouped log-sum-exp over the rules gives ``U(a)``; (factorized level) a per-position linear map
  in probability space ``y_j(a) = log sum_c T_j(a, c) exp U_j(c)``, ``U(a) = sum_j y_j(a)``;
- the root: ``D_root = log prior``;
- decoder: ``T(a, r) = D(a) + z(a, r)`` (``z`` by a long skip), the transposed conv with the same
  0/1 weights in probability space, a log, and the cavity ``- U_j(c)`` (long skip); factorized:
  ``D_j(c) = log sum_a T_j(a, c) exp(D(a) + sum_{j' != j} y_j'(a))``;
- head: ``log p(x0_i = c | x_t) = log_softmax(D_i + U_i)``.

Zeros are a large negative finite log (:data:`LOG_ZERO`), never ``-inf`` (``0 * -inf`` in a conv
is NaN); every node's messages are shifted to max 0 (posteriors do not see per-node constants),
and a sum that underflows in probability space is floored at :data:`LOG_ZERO`. With ``width = W``
the log-sum-exps run in log space as trees of pairwise MLPs (:mod:`hdiff.models.bp_unet_width`).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from diffusers.configuration_utils import register_to_config
from torch import nn
from torch.nn import functional as F

from hdiff.denoisers.learned import LOG_SNR_MAX, LearnedDenoiser, check_int, check_tree
from hdiff.ghm.kernels import FactorizedKernel, ProductionKernel
from hdiff.ghm.layout import from_tree_order, to_tree_order
from hdiff.models.bp_unet_width import ACTIVATIONS, PairwiseLSE, tree_logsumexp
from hdiff.noise.base import Alpha, NoiseProcess

#: log(0) as a finite number: far below any message BP can hold in float32, and NaN-free in convs
LOG_ZERO = -1e5
KERNEL_KINDS = ("production", "factorized")


def safe_log(x: torch.Tensor) -> torch.Tensor:
    """``log x`` where ``x > 0``, :data:`LOG_ZERO` elsewhere (also no NaN gradients at 0)."""
    return torch.where(x > 0, x.clamp_min(torch.finfo(x.dtype).tiny).log(), LOG_ZERO)


def _exclusive_sum(y: torch.Tensor, dim: int) -> torch.Tensor:
    """``sum_{j' != j} y_j'`` along ``dim`` from prefix and suffix sums (no ``total - y_j`` cancellation)."""
    zero = torch.zeros_like(y.narrow(dim, 0, 1))
    prefix = torch.cat([zero, y.cumsum(dim).narrow(dim, 0, y.shape[dim] - 1)], dim)
    suffix = torch.cat([y.flip(dim).cumsum(dim).flip(dim).narrow(dim, 1, y.shape[dim] - 1), zero], dim)
    return prefix + suffix


class ProductionLevel(nn.Module):
    """One production level: pooling conv + grouped log-sum-exp up, transposed conv + cavity down.

    The rule tables are *soft*: child slot ``j`` of rule ``(a, r)`` emits symbol ``c`` with
    probability ``t_j(c | a, r) = softmax(rule_logits)`` and the rule weights are
    ``w(r | a) = softmax(log_weight)``. A GHM's rules are the one-hot limit (logits ``0`` /
    :data:`LOG_ZERO`), where every formula below is exactly BP; at finite logits the level is exact
    BP for the "soft grammar" whose rules emit each child from ``t_j``, so a randomly initialised
    network is a proper probabilistic model and its messages stay bounded while it trains.

    Args:
        parents, children: alphabet sizes ``A`` (this level) and ``C`` (the level below).
        num_rules: ``m``.
        branching: ``s``.
        pair: a :class:`PairwiseLSE` for the finite-width network, or None (exact, probability-space convs).

    Parameters: ``rule_logits`` ``(A*m, s, C)`` (the weights of the pooling conv and of its
    transpose, tied), ``log_weight`` ``(A, m)`` (the pooling conv's bias).
    """

    def __init__(self, parents: int, children: int, num_rules: int, branching: int, pair: PairwiseLSE | None) -> None:
        super().__init__()
        self.shape = (parents, children, num_rules, branching)
        self.rule_logits = nn.Parameter(torch.empty(parents * num_rules, branching, children))
        self.log_weight = nn.Parameter(torch.empty(parents, num_rules))
        self.pair = pair

    @property
    def rule_table(self) -> torch.Tensor:
        """``(A*m, s*C)`` emission probabilities (row ``a*m + r``, column ``j*C + c``): 0/1 for a GHM's rules."""
        return torch.softmax(self.rule_logits, -1).flatten(1)

    def reset_random(self, scale: float) -> None:
        """Soft random rules: logits ``scale * N(0, 1)``; uniform rule weights."""
        with torch.no_grad():
            self.rule_logits.normal_(0.0, 1.0).mul_(scale)
            self.log_weight.fill_(-math.log(self.shape[2]))

    def set_kernel(self, kernel: ProductionKernel) -> None:
        """Exact weights: one-hot rule tuples (logits 0 / ``LOG_ZERO``) and ``log w`` (``LOG_ZERO`` for 0)."""
        A, C, m, s = self.shape
        onehot = F.one_hot(kernel.rules.cpu().reshape(A * m, s), C)
        with torch.no_grad():
            self.rule_logits.copy_((1 - onehot).float() * LOG_ZERO)
            self.log_weight.copy_(safe_log(kernel.weights.cpu()).float())

    def up(self, u_children: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        """``(B, M, s*C)`` children's messages -> ``U`` ``(B, M, A)`` (max 0 per node) and the skip.

        ``y_j(a, r) = log sum_c t_j(c | a, r) exp U_j(c)`` (``= U_j(rho_j(a, r))`` for one-hot rules),
        ``z(a, r) = log w(r | a) + sum_j y_j(a, r)`` (the pooling conv and its bias),
        ``U(a) = logsumexp_r z(a, r) - max_a(.)``.
        """
        A, C, m, s = self.shape
        uc = u_children.unflatten(-1, (s, C))  # (B, M, s, C)
        log_w = torch.log_softmax(self.log_weight, -1).flatten()
        log_t = torch.log_softmax(self.rule_logits, -1)  # (A*m, s, C)
        terms = uc.unsqueeze(-3) + log_t  # (B, M, A*m, s, C)
        # log space (not a matmul in probability space): every finite upward message stays exact,
        # however far below its node's max (the encoder's messages are what probes compare with BP)
        y = torch.logsumexp(terms, -1) if self.pair is None else tree_logsumexp(terms, self.pair)  # (B, M, A*m, s)
        z = log_w + y.sum(-1)  # (B, M, A*m)
        zr = z.unflatten(-1, (A, m))
        u = torch.logsumexp(zr, -1) if self.pair is None else tree_logsumexp(zr, self.pair)
        return u - u.amax(-1, keepdim=True).detach(), (y, z)

    def down(self, d_parent: torch.Tensor, skip: tuple) -> torch.Tensor:
        """``D`` ``(B, M, A)`` -> children's ``D`` ``(B, M, s*C)``.

        ``T(a, r) = D(a) + z(a, r)`` (``z`` by the long skip); the cavity removes child ``j``'s own
        term, ``T - y_j``, and the transposed conv spreads it over the child's symbols:
        ``D_j(c) = log sum_{(a, r)} t_j(c | a, r) exp(T(a, r) - y_j(a, r))``.
        """
        y, z = skip
        t_ar = z + d_parent.repeat_interleave(self.shape[2], dim=-1)  # (B, M, A*m)
        cavity = t_ar.unsqueeze(-1) - y  # (B, M, A*m, s)
        if self.pair is None:  # transposed conv in probability space, stabilised per (node, slot)
            mx = cavity.amax(-2, keepdim=True).detach()
            t = torch.softmax(self.rule_logits, -1)
            d = safe_log(torch.einsum("bmnj,njc->bmjc", (cavity - mx).exp(), t)) + mx.transpose(-1, -2)
        else:  # log-space: for each (j, c), a pairwise-lse tree over all (a, r)
            log_t = torch.log_softmax(self.rule_logits, -1)  # (A*m, s, C)
            d = tree_logsumexp((cavity.unsqueeze(-1) + log_t).permute(0, 1, 3, 4, 2), self.pair)  # (B, M, s, C)
        return d.flatten(-2)

    def num_pairs(self) -> tuple[int, int]:
        """Pairwise log-sum-exps per node (up, down) of the finite-width network."""
        A, C, m, s = self.shape
        return A * m * s * (C - 1) + A * (m - 1), s * C * (A * m - 1)


class FactorizedLevel(nn.Module):
    """One factorized level: per-position linear maps in probability space, up and down.

    Args:
        parents, children: ``A`` and ``C``.
        branching: ``s``.
        pair: as for :class:`ProductionLevel`.

    Parameter: ``transition_logits`` ``(s, A, C)``; the per-position weights ``T_j(a, c)`` of a conv
    with kernel = stride = ``s`` (and of its transpose) are their softmax over ``c`` (row-stochastic,
    as a GHM's transitions; :data:`LOG_ZERO` logits give exact zeros).
    """

    def __init__(self, parents: int, children: int, branching: int, pair: PairwiseLSE | None) -> None:
        super().__init__()
        self.shape = (parents, children, branching)
        self.transition_logits = nn.Parameter(torch.empty(branching, parents, children))
        self.pair = pair

    @property
    def transition(self) -> torch.Tensor:
        """``T_j(a, c)`` ``(s, A, C)``, rows summing to 1."""
        return torch.softmax(self.transition_logits, -1)

    def reset_random(self, scale: float) -> None:
        """Soft random transitions: logits ``scale * N(0, 1)``."""
        with torch.no_grad():
            self.transition_logits.normal_(0.0, 1.0).mul_(scale)

    def set_kernel(self, kernel: FactorizedKernel) -> None:
        """Exact weights: logits ``log T_j(a, c)`` (:data:`LOG_ZERO` for 0)."""
        with torch.no_grad():
            self.transition_logits.copy_(safe_log(kernel.transitions.cpu().double()).float())

    def up(self, u_children: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        """``(B, M, s*C)`` -> ``U`` ``(B, M, A)``: ``y_j(a) = log sum_c T_j(a, c) exp U_j(c)``, ``U = sum_j y_j``."""
        A, C, s = self.shape
        uc = u_children.unflatten(-1, (s, C))
        terms = uc.unsqueeze(-2) + torch.log_softmax(self.transition_logits, -1)  # (B, M, s, A, C)
        y = torch.logsumexp(terms, -1) if self.pair is None else tree_logsumexp(terms, self.pair)  # (B, M, s, A)
        u = y.sum(-2)
        return u - u.amax(-1, keepdim=True).detach(), (y,)

    def down(self, d_parent: torch.Tensor, skip: tuple) -> torch.Tensor:
        """``D`` ``(B, M, A)`` -> ``(B, M, s*C)``: ``D_j(c) = log sum_a T_j(a, c) exp(D(a) + sum_{j' != j} y_j'(a))``."""
        (y,) = skip
        cavity = d_parent.unsqueeze(-2) + _exclusive_sum(y, -2)  # (B, M, s, A)
        if self.pair is None:
            mx = cavity.amax(-1, keepdim=True).detach()
            d = safe_log(torch.einsum("bmja,jac->bmjc", (cavity - mx).exp(), self.transition)) + mx
        else:
            log_t = torch.log_softmax(self.transition_logits, -1)
            d = tree_logsumexp((cavity.unsqueeze(-1) + log_t).transpose(-1, -2), self.pair)
        return d.flatten(-2)

    def num_pairs(self) -> tuple[int, int]:
        """Pairwise log-sum-exps per node (up, down) of the finite-width network."""
        A, C, s = self.shape
        return s * A * (C - 1), s * C * (A - 1)


def _per_level(value, depth: int, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != depth:
            raise ValueError(f"{name} must be one value or {depth} values (one per level, root first), got {value!r}")
        return list(value)
    return [value] * depth


class BPUNet(LearnedDenoiser):
    """The U-Net whose forward pass is BP on a GHM (from :meth:`from_ghm`), or its trainable relaxation.

    ``model(x_t, alpha) -> log p(x0_i = b | x_t)`` ``(B, v, *leaf_shape)``.

    Args:
        vocab_size: ``v`` (leaf alphabet).
        process: ``"masking"``, ``"uniform"`` or ``"gaussian"`` (the default embedding ``2 onehot - 1``).
        branching: ``s``.
        depth: ``L``.
        layout: ``"sequence"`` or ``"image"``.
        num_classes: root alphabet size (None: ``v``).
        kernels: ``"production"`` / ``"factorized"``, or one per level, root first.
        num_rules: ``m``, or one per level (read for production levels only).
        inner_vocab_sizes: alphabet sizes of levels ``1 .. L-1`` (None: ``v`` each).
        width: None for the exact nonlinearities, ``W`` for pairwise MLPs of width ``W``.
        activation: the MLPs' ``"relu"`` or ``"silu"``.
        d_max: the MLPs' input clamp (:func:`~hdiff.models.bp_unet_width.fit_nonlinearity`).
        init_scale: spread of the random soft rule tables / transitions (random init only).

    Parameters (all trainable): ``levels.{l}.rule_logits`` / ``log_weight`` or ``transition_logits``, the
    root's ``root_log_prior``, ``embedding`` ``(v, k)`` for Gaussian noise (the input 1x1 conv),
    and the MLPs ``levels.{l}.pair.*`` when ``width`` is set. The constructor initialises them at
    random; :meth:`from_ghm` sets them to a GHM's.

    Raises:
        ValueError: naming the field for an invalid config.
    """

    @register_to_config
    def __init__(self, vocab_size: int = 8, process: str = "masking", branching: int = 2, depth: int = 4,
                 layout: str = "sequence", num_classes: int | None = None,
                 kernels: str | Sequence[str] = "production", num_rules: int | Sequence[int] = 2,
                 inner_vocab_sizes: Sequence[int] | None = None, width: int | None = None,
                 activation: str = "relu", d_max: float = 16.0, init_scale: float = 0.5) -> None:
        super().__init__()
        self._init_process(process, vocab_size)
        check_tree(branching, depth, layout)
        sizes = [vocab_size if num_classes is None else check_int(num_classes, "num_classes", 1)]
        inner = [vocab_size] * (depth - 1) if inner_vocab_sizes is None else list(inner_vocab_sizes)
        if len(inner) != depth - 1:
            raise ValueError(f"inner_vocab_sizes must hold {depth - 1} sizes (levels 1 .. depth-1), got {inner_vocab_sizes!r}")
        sizes += [check_int(c, "inner_vocab_sizes", 1) for c in inner] + [vocab_size]
        kinds = _per_level(kernels, depth, "kernels")
        if any(k not in KERNEL_KINDS for k in kinds):
            raise ValueError(f"kernels must be among {KERNEL_KINDS}, got {kernels!r}")
        rules = [check_int(m, "num_rules", 1) for m in _per_level(num_rules, depth, "num_rules")]
        if width is not None:
            check_int(width, "width", 1)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if not (isinstance(d_max, (int, float)) and math.isfinite(d_max) and d_max > 0):
            raise ValueError(f"d_max must be a positive finite number, got {d_max!r}")
        if not (isinstance(init_scale, (int, float)) and init_scale >= 0):
            raise ValueError(f"init_scale must be a non-negative number, got {init_scale!r}")
        self.level_sizes = sizes
        levels = []
        for l, kind in enumerate(kinds):
            pair = None if width is None else PairwiseLSE(width, activation, d_max)
            levels.append(ProductionLevel(sizes[l], sizes[l + 1], rules[l], branching, pair) if kind == "production"
                          else FactorizedLevel(sizes[l], sizes[l + 1], branching, pair))
            levels[-1].reset_random(init_scale)
        self.levels = nn.ModuleList(levels)
        self.root_log_prior = nn.Parameter(torch.full((sizes[0],), -math.log(sizes[0])))
        if not self.process.discrete:
            self.embedding = nn.Parameter(self.process.embedding.clone())  # (v, k): the input 1x1 conv is E^T

    # ------------------------------------------------------------ construction
    @classmethod
    def from_ghm(cls, ghm, process: NoiseProcess | str, *, width: int | None = None, activation: str = "relu",
                 d_max: float = 16.0) -> "BPUNet":
        """The BP U-Net of ``ghm``: its forward pass is exact BP (``width=None``) or Mei's width-``W`` approximation.

        Args:
            ghm: the :class:`~hdiff.ghm.GHM`.
            process: the noise process (or its name); Gaussian must use the default embedding.
            width, activation, d_max: as in the constructor.

        Raises:
            ValueError: ``process`` does not match the GHM's vocabulary, or is not rebuildable from its name.
        """
        from hdiff.ghm.model import GHM

        if not isinstance(ghm, GHM):
            raise ValueError(f"ghm must be a GHM, got {type(ghm).__name__}")
        name = process if isinstance(process, str) else getattr(process, "name", None)
        if isinstance(process, NoiseProcess) and process.vocab_size != ghm.vocab_size:
            raise ValueError(f"process.vocab_size ({process.vocab_size}) must equal ghm.vocab_size ({ghm.vocab_size})")
        kinds = ["production" if isinstance(k, ProductionKernel) else "factorized" for k in ghm.kernels]
        model = cls(vocab_size=ghm.vocab_size, process=name, branching=ghm.branching, depth=ghm.depth,
                    layout=ghm.layout, num_classes=ghm.num_classes, kernels=kinds,
                    num_rules=[k.num_rules if isinstance(k, ProductionKernel) else 1 for k in ghm.kernels],
                    inner_vocab_sizes=[ghm.symbols(l) for l in range(1, ghm.depth)], width=width,
                    activation=activation, d_max=d_max)
        if isinstance(process, NoiseProcess) and model.process != process:
            raise ValueError(f"process: {process!r} is not the default {name!r} process a BPUNet config rebuilds "
                             "(a Gaussian process must use the default embedding)")
        for level, kernel in zip(model.levels, ghm.kernels):
            level.set_kernel(kernel)
        with torch.no_grad():
            model.root_log_prior.copy_(safe_log(ghm.root_prior.cpu()).float())
        return model

    # ------------------------------------------------------------------ layers
    def leaf_evidence(self, x_t: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        """The input layer: leaf log-likelihoods ``(B, N, v)`` in tree order, max 0 per leaf.

        - masking: 0 at MASK, else ``log 1[c = x_t,i]`` (``LOG_ZERO`` for 0);
        - uniform: ``-1[c != x_t,i] log(1 + alpha v / (1 - alpha))`` (capped at ``-LOG_ZERO``);
        - Gaussian: ``sqrt(alpha)/(1-alpha) <z_i, E_c> - alpha |E_c|^2 / (2 (1-alpha))``, a 1x1 conv
          with weight ``E^T`` scaled per sample plus a per-sample bias; ``alpha = 1`` is hard
          evidence for the nearest embedding.

        Args:
            x_t: a validated state (tokens ``(B, *leaf_shape)`` or floats ``(B, k, *leaf_shape)``).
            alpha: ``(B,)`` signal levels in [0, 1].
        """
        c, v = self.config, self.config.vocab_size
        dtype = self.root_log_prior.dtype
        a = alpha.to(dtype).view(-1, 1, 1)
        if not self.process.discrete:
            z = to_tree_order(x_t.movedim(1, -1), c.layout, c.depth).to(dtype)  # (B, N, k)
            e = self.embedding
            dot, norm2 = z @ e.T, (e * e).sum(-1)
            noisy = a < 1
            denom = torch.where(noisy, 1 - a, 1.0)
            ev = (a.sqrt() / denom) * dot - (a / (2 * denom)) * norm2
            if not bool(noisy.all()):  # nearest embedding: argmax of <z, E_c> - |E_c|^2 / 2
                hard = F.one_hot((dot - norm2 / 2).argmax(-1), v).to(dtype)
                ev = torch.where(noisy, ev, (1 - hard) * LOG_ZERO)
            return ev - ev.amax(-1, keepdim=True)
        x = to_tree_order(x_t, c.layout, c.depth).long()  # (B, N)
        onehot = F.one_hot(x, v + 1)[..., :v].to(dtype)
        if self.process.name == "masking":
            return (1 - onehot) * (x != v).unsqueeze(-1).to(dtype) * LOG_ZERO
        gap = (torch.log(a * v + 1 - a) - torch.log1p(-a)).clamp_max(-LOG_ZERO)  # alpha = 1: +inf -> cap
        return -(1 - onehot) * gap

    def _posterior_logits(self, x_t: torch.Tensor, alpha: torch.Tensor, features: dict | None = None) -> torch.Tensor:
        """``D + U`` at the leaves ``(B, v, *leaf_shape)``; ``features`` (a dict) gets :meth:`tree_features`."""
        c = self.config
        leaf_u = self.leaf_evidence(x_t, alpha)  # (B, N, v)
        b = leaf_u.shape[0]
        ups = [leaf_u] * (c.depth + 1)  # U per level, root first; level L is the evidence
        skips = [None] * c.depth
        for l in reversed(range(c.depth)):  # encoder: leaves -> root
            below = ups[l + 1]
            children = below.reshape(b, -1, c.branching * below.shape[-1])  # a node's s children are contiguous
            ups[l], skips[l] = self.levels[l].up(children)
        d = self.root_log_prior.expand(b, 1, -1)
        beliefs = [d + ups[0]]
        for l in range(c.depth):  # decoder: root -> leaves
            d = self.levels[l].down(d, skips[l]).reshape(b, -1, self.level_sizes[l + 1])
            if features is not None:
                beliefs.append(d + ups[l + 1])
        if features is not None:
            features.update(encoder=ups[:-1], decoder=beliefs)
        out = d + leaf_u  # belief = cavity + own evidence
        return from_tree_order(out, c.layout, c.depth).movedim(-1, 1)

    def logits(self, x_t: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Leaf logits from the normalised signal level ``u`` (the :class:`LearnedDenoiser` contract).

        Discrete: ``alpha = u``. Gaussian: ``alpha = sigmoid(log-SNR)`` from ``u``, with ``u = 1`` read as
        ``alpha = 1`` (the log-SNR clamp loses ``alpha`` beyond ``sigmoid(15)``; :meth:`forward` does not).
        """
        if self.process.discrete:
            return self._posterior_logits(x_t, u)
        alpha = torch.sigmoid(u * 2 * LOG_SNR_MAX - LOG_SNR_MAX)
        return self._posterior_logits(x_t, torch.where(u >= 1, 1.0, torch.where(u <= 0, 0.0, alpha)))

    def forward(self, x_t: torch.Tensor, alpha: Alpha) -> torch.Tensor:
        """``log p(x0_i = b | x_t)`` ``(B, v, *leaf_shape)`` float32, validated as :meth:`LearnedDenoiser.forward`.

        Reads the raw ``alpha`` (float or ``(B,)`` in [0, 1]) for the evidence layer.
        """
        self.check_input(x_t)
        a = self.process.alpha_tensor(alpha, x_t.shape[0], 1, x_t.device, torch.float32)
        return torch.log_softmax(self._posterior_logits(x_t, a).float(), dim=1)

    @torch.no_grad()
    def tree_features(self, x_t: torch.Tensor, alpha: Alpha) -> dict[str, list[torch.Tensor]]:
        """Every level's messages, for linear probes (the layout of ``TreeUNet.tree_features``).

        Args:
            x_t: a state of :attr:`process` (validated as in :meth:`forward`).
            alpha: the signal level, a float or ``(B,)`` in [0, 1].

        Returns:
            ``{"encoder": [...], "decoder": [...]}``, root first, level ``l`` ``(B, s**l, symbols(l))``
            in tree order: encoder levels ``l = 0 .. L-1`` hold the upward log-messages ``U`` (max 0
            per node; the root's before the prior); decoder levels ``l = 0 .. L`` the node
            log-posterior logits ``D + U`` (the root: ``U + log prior``), so their ``log_softmax`` is
            BP's level marginals for :meth:`from_ghm`.
        """
        self.check_input(x_t)
        a = self.process.alpha_tensor(alpha, x_t.shape[0], 1, x_t.device, torch.float32)
        features: dict[str, list[torch.Tensor]] = {}
        self._posterior_logits(x_t, a, features)
        return features

    def num_pairwise_ops(self) -> int:
        """Pairwise log-sum-exps in one forward pass of one sample (the finite-width network's MLP calls)."""
        s = self.config.branching
        return sum(s**l * sum(level.num_pairs()) for l, level in enumerate(self.levels))


def bp_unet_from_config(config: dict, ghm=None) -> BPUNet:
    """A :class:`BPUNet` from a model config dict with an ``init`` key: ``"random"`` (default) or ``"ghm"``.

    ``init = "ghm"`` builds :meth:`BPUNet.from_ghm` from ``ghm`` (with the config's ``process``,
    ``width``, ``activation``, ``d_max``); any structural key the config also gives must agree with
    the GHM. Raises ``ValueError`` naming the field otherwise.
    """
    kwargs = dict(config)
    init = kwargs.pop("init", "random")
    if init == "random":
        return BPUNet(**kwargs)
    if init != "ghm":
        raise ValueError(f"init must be 'random' or 'ghm', got {init!r}")
    if ghm is None:
        raise ValueError("init = 'ghm' needs the GHM")
    options = {k: kwargs.pop(k) for k in ("width", "activation", "d_max") if k in kwargs}
    model = BPUNet.from_ghm(ghm, kwargs.pop("process", "masking"), **options)
    for key in ("vocab_size", "branching", "depth", "layout", "num_classes", "kernels"):
        if kwargs.get(key) is None:
            continue
        want, have = kwargs[key], model.config[key]
        if key == "kernels":
            want = _per_level(want, model.config.depth, "kernels")
        if (list(want) if isinstance(want, (list, tuple)) else want) != (list(have) if isinstance(have, (list, tuple)) else have):
            raise ValueError(f"{key} = {kwargs[key]!r} disagrees with the GHM ({have!r})")
    return model
