"""hdiff: diffusion models on generative hierarchical models, with an exact belief-propagation oracle.

Subpackages: :mod:`hdiff.ghm` (models), :mod:`hdiff.bp` (exact inference), :mod:`hdiff.evaluation`.
"""

from hdiff.bp import BPResult, posterior, sample_posterior
from hdiff.ghm import GHM, FactorizedKernel, ProductionKernel

__version__ = "0.1.0"
__all__ = ["GHM", "ProductionKernel", "FactorizedKernel", "posterior", "sample_posterior", "BPResult", "__version__"]
