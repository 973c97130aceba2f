"""The finite-width BP U-Net: every exact nonlinearity of :class:`~hdiff.models.bp_unet.BPUNet` as a small MLP.

Every nonlinear step of BP in log space is a log-sum-exp (docs/bp_unet.md): over a parent's rules
(production encoder), over a child's symbols (factorized encoder), over the (parent, rule) pairs
or parent symbols that can emit a child symbol (decoders). A log-sum-exp of ``n`` numbers is a
binary tree of ``n - 1`` pairwise ones, and each pairwise one needs a single scalar function:

    lse(a, b) = max(a, b) + g(|a - b|),    g(d) = log(1 + exp(-d)),  d >= 0,

where ``max(a, b) = b + relu(a - b)`` is exact in a ReLU network. Only ``g`` is approximated: a
one-hidden-layer MLP ``g_W(d) = relu(w2 . act(w1 min(d, d_max) + b1) + b2)`` of width ``W``
(:func:`fit_nonlinearity`), applied position-wise to every pair. Beyond ``d_max`` the input is
clamped, since ``g(d) < exp(-d_max)`` there (``d_max = 16``: below 1.2e-7).

:func:`width_curve` measures ``KL(oracle || BPUNet_W)`` per noise level against the exact BP
oracle, with the parameter and hidden-unit counts of each width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

ACTIVATIONS = ("relu", "silu")

Pair = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class NonlinearityFit:
    """A fitted ``g_W(d) = relu(w2 . act(w1 min(d, d_max) + b1) + b2)`` approximating ``log(1 + e^-d)``.

    Attributes:
        w1, b1, w2: ``(W,)`` float32 hidden weights, hidden biases and output weights.
        b2: ``()`` float32 output bias.
        max_error: ``max |g_W - g|`` over the dense fitting grid of ``[0, d_max]`` (nats).
        activation: ``"relu"`` or ``"silu"``.
        d_max: the clamp of the input.
    """

    w1: torch.Tensor
    b1: torch.Tensor
    w2: torch.Tensor
    b2: torch.Tensor
    max_error: float
    activation: str
    d_max: float


def _act(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    return F.relu if name == "relu" else F.silu


@lru_cache(maxsize=32)
def _fit(width: int, activation: str, d_max: float, num_grid: int) -> NonlinearityFit:
    d = torch.linspace(0.0, d_max, num_grid, dtype=torch.float64)
    target = F.softplus(-d)
    # Knots equidistribute sqrt(g''): where a piecewise-linear interpolant's error h^2 g''/8 is even.
    density = (torch.sigmoid(d) * torch.sigmoid(-d)).sqrt()
    cdf = torch.cat([d.new_zeros(1), ((density[1:] + density[:-1]) / 2 * d.diff()).cumsum(0)])
    levels = torch.arange(width, dtype=torch.float64) / width * cdf[-1]
    knots = d[torch.searchsorted(cdf, levels).clamp_max(num_grid - 1)]  # knots[0] = 0
    if activation == "relu":
        w1 = torch.ones(width, dtype=torch.float64)
    else:  # silu(beta (d - t)) / beta is a relu smoothed over about one knot spacing
        spacing = torch.diff(knots, append=torch.tensor([d_max], dtype=torch.float64)).clamp_min(d_max / num_grid)
        w1 = 2.0 / spacing
    b1 = -w1 * knots
    hidden = _act(activation)(d.unsqueeze(-1) * w1 + b1)  # (grid, W)
    design = torch.cat([hidden, torch.ones_like(d).unsqueeze(-1)], dim=-1)
    # least squares for the output layer (the hidden layer is fixed by the knots): deterministic
    sol = torch.linalg.lstsq(design, target.unsqueeze(-1), driver="gelsd").solution.squeeze(-1)
    fitted = F.relu(design @ sol)
    return NonlinearityFit(w1.float(), b1.float(), sol[:-1].float(), sol[-1].float(),
                           float((fitted - target).abs().max()), activation, d_max)


def fit_nonlinearity(width: int, activation: str = "relu", d_max: float = 16.0, num_grid: int = 4097) -> NonlinearityFit:
    """Fit the width-``W`` MLP ``g_W`` to ``g(d) = log(1 + exp(-d))`` on ``[0, d_max]``.

    Hidden unit ``k`` is ``act(w1_k (d - t_k))`` with knots ``t_k`` (``t_0 = 0``) at the quantiles
    ``k / W`` of the density ``sqrt(g''(d))`` (the knot placement that equalises a
    piecewise-linear interpolant's error); ReLU units have ``w1 = 1``, SiLU units a slope of twice
    the inverse local knot spacing. The output layer is the least-squares fit on a uniform grid of
    ``num_grid`` points, and a final ReLU keeps ``g_W >= 0`` (so ``lse(a, b) >= max(a, b)``, as for
    ``g``). No randomness: the same arguments give the same weights.

    Args:
        width: ``W >= 1`` hidden units.
        activation: ``"relu"`` or ``"silu"``.
        d_max: the fitted range; inputs are clamped to it.
        num_grid: grid points of the least-squares fit.

    Returns:
        :class:`NonlinearityFit` (float32 weights and the grid's max error).

    Raises:
        ValueError: naming ``width``, ``activation``, ``d_max`` or ``num_grid``.
    """
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"width must be an int >= 1, got {width!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if not (isinstance(d_max, (int, float)) and math.isfinite(d_max) and d_max > 0):
        raise ValueError(f"d_max must be a positive finite number, got {d_max!r}")
    if isinstance(num_grid, bool) or not isinstance(num_grid, int) or num_grid < 2 * width + 2:
        raise ValueError(f"num_grid must be an int >= 2 * width + 2, got {num_grid!r}")
    return _fit(width, activation, float(d_max), num_grid)


class PairwiseLSE(nn.Module):
    """``lse(a, b) = max(a, b) + g(|a - b|)``, elementwise, with ``g`` exact or a fitted MLP.

    Args:
        width: ``None`` for the exact ``g(d) = log(1 + exp(-d))``; an int ``W`` for the MLP ``g_W``
            initialised by :func:`fit_nonlinearity` (its four tensors are trainable parameters).
        activation: the MLP's hidden activation, ``"relu"`` or ``"silu"``.
        d_max: the MLP's input clamp.
    """

    def __init__(self, width: int | None = None, activation: str = "relu", d_max: float = 16.0) -> None:
        super().__init__()
        self.width = width
        self.activation = activation
        self.d_max = float(d_max)
        if width is not None:
            fit = fit_nonlinearity(width, activation, d_max)
            self.w1 = nn.Parameter(fit.w1.clone())
            self.b1 = nn.Parameter(fit.b1.clone())
            self.w2 = nn.Parameter(fit.w2.clone())
            self.b2 = nn.Parameter(fit.b2.clone())

    def correction(self, d: torch.Tensor) -> torch.Tensor:
        """``g(d)`` for ``d >= 0`` (any shape): exact, or the MLP on ``min(d, d_max)``."""
        if self.width is None:
            return torch.log1p(torch.exp(-d))
        h = _act(self.activation)(d.clamp_max(self.d_max).unsqueeze(-1) * self.w1 + self.b1)  # (..., W)
        return F.relu(h @ self.w2 + self.b2)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``max(a, b) + g(|a - b|)`` for same-shaped ``a``, ``b``."""
        return torch.maximum(a, b) + self.correction((a - b).abs())


def tree_logsumexp(x: torch.Tensor, pair: Pair) -> torch.Tensor:
    """Log-sum-exp over the last dim as a balanced binary tree of pairwise ``pair`` ops.

    ``(..., n) -> (...)`` using ``n - 1`` pairwise ops in all: each round pairs the first
    half with the second (an odd element is carried to the next round unchanged).
    """
    while x.shape[-1] > 1:
        n = x.shape[-1]
        half = n // 2
        y = pair(x[..., :half], x[..., half:2 * half])
        x = torch.cat([y, x[..., 2 * half:]], dim=-1) if n % 2 else y
    return x.squeeze(-1)


@torch.no_grad()
def width_curve(ghm, process, widths: Sequence[int | None], alphas: Sequence[float], num_samples: int = 256,
                seed: int = 0, activation: str = "relu") -> list[dict]:
    """``KL(oracle || BPUNet_W)`` of leaf posteriors per width and noise level.

    For each ``alpha``: ``num_samples`` clean samples of ``ghm`` noised by ``process`` (the same
    states for every width), then the BP oracle's and ``BPUNet.from_ghm(ghm, process, width=W)``'s
    leaf posteriors. The KL is in nats per noised leaf (:meth:`NoiseProcess.informative_leaves`:
    for masking only masked leaves count).

    Args:
        ghm: the :class:`~hdiff.ghm.GHM`.
        process: a :class:`~hdiff.noise.NoiseProcess` or its name.
        widths: MLP widths; ``None`` is the exact network.
        alphas: signal levels in [0, 1].
        num_samples: noised states per level.
        seed: RNG seed of the samples and the noise.
        activation: ``"relu"`` or ``"silu"``.

    Returns:
        One dict per (width, alpha): ``width``, ``alpha``, ``kl`` (``nan`` when no leaf is
        noised), ``num_leaves`` (leaves counted), ``num_parameters``, ``hidden_units`` (MLP units
        evaluated per sample: ``W`` times the pairwise log-sum-exps of one forward pass; 0 when
        exact) and ``fit_error`` (``max |g_W - g|``; 0 when exact).
    """
    from hdiff.denoisers.oracle import BPDenoiser
    from hdiff.models.bp_unet import BPUNet

    models = {w: BPUNet.from_ghm(ghm, process, width=w, activation=activation).to(ghm.device).eval() for w in widths}
    first = next(iter(models.values()))
    proc = first.process
    oracle = BPDenoiser(ghm, proc)
    gen = torch.Generator(device=ghm.device).manual_seed(seed)
    rows = []
    for alpha in alphas:
        x0 = ghm.sample(num_samples, generator=gen)
        x_t = proc.add_noise(x0, float(alpha), generator=gen)
        lp_o = oracle(x_t, float(alpha)).double()
        p_o = lp_o.exp()
        counted = proc.informative_leaves(x_t)
        counted = torch.ones_like(x0, dtype=torch.bool) if counted is None else counted
        n = int(counted.sum())
        for w, model in models.items():
            lp_m = model(x_t, float(alpha)).double()
            kl = torch.where(p_o > 0, p_o * (lp_o - lp_m), 0.0).sum(1)  # (B, *leaf_shape)
            rows.append({
                "width": w, "alpha": float(alpha),
                "kl": float(kl[counted].sum() / n) if n else math.nan, "num_leaves": n,
                "num_parameters": sum(p.numel() for p in model.parameters()),
                "hidden_units": 0 if w is None else w * model.num_pairwise_ops(),
                "fit_error": 0.0 if w is None else fit_nonlinearity(w, activation).max_error,
            })
    return rows
