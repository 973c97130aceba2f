"""Denoisers: the exact BP oracle (and, later, learned networks) behind one protocol."""

from hdiff.denoisers.base import Denoiser, JointSampler
from hdiff.denoisers.oracle import BPDenoiser

__all__ = ["Denoiser", "JointSampler", "BPDenoiser"]
