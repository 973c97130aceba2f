"""Metrics: one set, one set of names (docs/metrics.md).

- :mod:`~hdiff.metrics.samples`: exact quality of generated samples under the true GHM
  (:class:`SampleQuality` / :func:`sample_quality`).
- :mod:`~hdiff.metrics.posterior_kl`: ``KL(oracle || learned)`` of leaf posteriors per noise level.
- :mod:`~hdiff.metrics.likelihood`: upper bounds on ``-log p(x0)`` (NELBO) of any denoiser.

Metrics depend on the GHM, BP, the noise processes and the denoiser protocol only, never on
training internals or experiments.
"""

from hdiff.metrics.likelihood import BoundEstimate, gaussian_nelbo, masked_nelbo, nelbo, uniform_nelbo
from hdiff.metrics.posterior_kl import PosteriorKL, posterior_kl
from hdiff.metrics.samples import (SampleQuality, derivable_symbols, exact_leaf_marginals, leaf_marginal_kl,
                                   level_validity, sample_quality)

__all__ = ["SampleQuality", "sample_quality", "derivable_symbols", "level_validity", "exact_leaf_marginals",
           "leaf_marginal_kl", "PosteriorKL", "posterior_kl", "BoundEstimate", "nelbo", "masked_nelbo",
           "uniform_nelbo", "gaussian_nelbo"]
