"""Forward noise processes and their leaf likelihoods (the evidence BP conditions on)."""

from hdiff.noise.base import NoiseProcess
from hdiff.noise.discrete import MaskingProcess, UniformProcess
from hdiff.noise.gaussian import GaussianProcess

__all__ = ["NoiseProcess", "GaussianProcess", "MaskingProcess", "UniformProcess"]
