"""The exact denoiser of a GHM: belief propagation on the noise process's leaf evidence."""

from __future__ import annotations

import torch

from hdiff.bp import posterior, sample_posterior
from hdiff.ghm import GHM
from hdiff.noise.base import Alpha, NoiseProcess


class BPDenoiser:
    """Exact ``log p(x0_i = b | x_t)`` by BP (Sclocchi, Favero, Wyart 2025; Mei 2024).

    Stateless: every call runs one BP pass on ``process.leaf_log_likelihood(x_t, alpha)``.

    Args:
        ghm: the model the clean data come from.
        process: the noise process; its ``vocab_size`` must equal the GHM's.
    """

    def __init__(self, ghm: GHM, process: NoiseProcess) -> None:
        if not isinstance(ghm, GHM):
            raise TypeError(f"ghm must be a GHM, got {type(ghm).__name__}")
        if not isinstance(process, NoiseProcess):
            raise TypeError(f"process must be a NoiseProcess, got {type(process).__name__}")
        if process.vocab_size != ghm.vocab_size:
            raise ValueError(f"process.vocab_size ({process.vocab_size}) must equal ghm.vocab_size ({ghm.vocab_size})")
        self.ghm = ghm
        self.process = process

    def __repr__(self) -> str:
        return f"BPDenoiser({self.ghm!r}, {self.process!r})"

    @property
    def leaf_shape(self) -> tuple[int, ...]:
        """The GHM's leaf shape."""
        return self.ghm.leaf_shape

    def _evidence(self, x_t: torch.Tensor, alpha: Alpha) -> torch.Tensor:
        ll = self.process.leaf_log_likelihood(x_t, alpha)
        if tuple(ll.shape[1:-1]) != self.ghm.leaf_shape:
            raise ValueError(f"x_t has leaf shape {tuple(ll.shape[1:-1])}, the GHM's is {self.ghm.leaf_shape}")
        return ll

    def __call__(self, x_t: torch.Tensor, alpha: Alpha) -> torch.Tensor:
        """Exact leaf posteriors as log-probabilities ``(B, v, *leaf_shape)`` (``-inf`` where impossible)."""
        return posterior(self.ghm, self._evidence(x_t, alpha)).leaf_marginals.log().movedim(-1, 1)

    def sample_x0(self, x_t: torch.Tensor, alpha: Alpha, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw ``x0`` ``(B, *leaf_shape)`` jointly from ``p(x0 | x_t)``."""
        return sample_posterior(self.ghm, self._evidence(x_t, alpha), generator=generator)
