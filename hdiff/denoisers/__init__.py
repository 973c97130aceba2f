"""Denoisers: the protocol every denoiser follows, the exact BP oracle, the exact denoiser of a
finite training set, and the base of learned ones.

The network architectures themselves (tree U-Net, BP U-Net, diffusers baselines, the root
classifier) live in :mod:`hdiff.models`.
"""

from hdiff.denoisers.base import Denoiser
from hdiff.denoisers.empirical import EmpiricalDenoiser
from hdiff.denoisers.learned import LearnedDenoiser
from hdiff.denoisers.oracle import BPDenoiser

__all__ = ["Denoiser", "BPDenoiser", "EmpiricalDenoiser", "LearnedDenoiser"]
