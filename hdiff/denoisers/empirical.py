"""The exact denoiser of a finite training set: the posterior over which sample was noised.

For data drawn uniformly from ``n`` training samples ``x^(1..n)`` (the distribution a model trained
on them sees), Bayes' rule gives the posterior over the samples in closed form,

    w_k(x_t) = p(x_t | x^(k)) / sum_j p(x_t | x^(j)),   log p(x_t | x^(k)) = sum_i log p(x_t,i | x0_i = x^(k)_i),

and the leaf posterior ``p(x0_i = b | x_t) = sum_k w_k 1[x^(k)_i = b]``: the optimal denoiser of the
empirical distribution (the one a network that memorises its training set converges to). Its main
use is as a training *target*: in the loss, ``x0`` given ``x_t`` is exactly distributed as ``w``, so the
soft cross-entropy against this posterior has the same expectation as the cross-entropy against the
one-hot ``x0`` (the same empirical risk and minimiser) with less variance (Rao-Blackwell): where many
training samples agree with ``x_t`` (high noise) the target is their average instead of one of them.
It needs nothing but the training set and the noise process (``[noise] target = "empirical"``).
"""

from __future__ import annotations

import torch

from hdiff.noise.base import Alpha, NoiseProcess
from hdiff.tokens import check_tokens

#: a finite stand-in for log 0 (masking's impossible leaves): a sum of up to 2**24 of them stays finite
#: in float32, and exp() of it is 0, so an inconsistent sample gets weight exactly 0
_LOG_ZERO = -1e4


class EmpiricalDenoiser:
    """Exact ``log p(x0_i = b | x_t)`` under the uniform distribution on a set of samples.

    Args:
        tokens: the samples ``(n, *leaf_shape)``, integers in ``[0, v)``.
        process: the noise process (its ``vocab_size`` is ``v``).
        chunk: training samples scored at once (bounds the ``(B, chunk)`` weight matrix).

    Cost per call: two ``(B, N v) x (N v, n)`` matrix products (``N`` leaves), i.e. ``O(B N v n)``.
    """

    def __init__(self, tokens: torch.Tensor, process: NoiseProcess, *, chunk: int = 16384) -> None:
        if not isinstance(process, NoiseProcess):
            raise TypeError(f"process must be a NoiseProcess, got {type(process).__name__}")
        check_tokens(tokens, "tokens", process.vocab_size)
        if tokens.shape[0] < 1:
            raise ValueError("tokens must hold at least one sample")
        self.process = process
        self.leaf_shape = tuple(tokens.shape[1:])
        self.chunk = chunk
        v = process.vocab_size
        # (n, N*v) one-hot rows: row k has a 1 at (i, x^(k)_i) for every leaf i
        self._onehot = torch.nn.functional.one_hot(tokens.long().flatten(1), v).flatten(1).float()

    def __repr__(self) -> str:
        return f"EmpiricalDenoiser(n={self._onehot.shape[0]}, leaf_shape={self.leaf_shape}, {self.process!r})"

    def to(self, device: torch.device | str) -> "EmpiricalDenoiser":
        """Move the stored samples to ``device`` (returns self)."""
        self._onehot = self._onehot.to(device)
        return self

    def sample_weights(self, x_t: torch.Tensor, alpha: Alpha) -> torch.Tensor:
        """The posterior over the samples, ``w`` ``(B, n)`` (rows sum to 1)."""
        ll = self.process.leaf_log_likelihood(x_t, alpha)  # (B, *leaf_shape, v)
        if tuple(ll.shape[1:-1]) != self.leaf_shape:
            raise ValueError(f"x_t has leaf shape {tuple(ll.shape[1:-1])}, the samples' is {self.leaf_shape}")
        ll = ll.float().flatten(1).clamp_min(_LOG_ZERO)  # (B, N*v); 0 * (-inf) would be NaN in the product
        onehot = self._onehot.to(ll.device)
        scores = torch.cat([ll @ part.T for part in onehot.split(self.chunk)], dim=1)  # (B, n) log p(x_t | x^(k))
        return torch.softmax(scores, dim=1)

    def __call__(self, x_t: torch.Tensor, alpha: Alpha) -> torch.Tensor:
        """Leaf posteriors as log-probabilities ``(B, v, *leaf_shape)`` (``-inf`` where no sample agrees)."""
        w = self.sample_weights(x_t, alpha)
        probs = w @ self._onehot.to(w.device)  # (B, N*v)
        probs = probs.view(w.shape[0], *self.leaf_shape, self.process.vocab_size)
        return probs.clamp_min(0).log().movedim(-1, 1)
