"""Denoisers: the exact BP oracle and learned networks behind one protocol."""

from hdiff.denoisers.base import Denoiser, JointSampler
from hdiff.denoisers.baselines import UNet1DBaseline, UNet2DBaseline
from hdiff.denoisers.classifier import RootClassifier
from hdiff.denoisers.learned import LearnedDenoiser
from hdiff.denoisers.oracle import BPDenoiser
from hdiff.denoisers.tree_unet import TreeUNet

__all__ = ["Denoiser", "JointSampler", "BPDenoiser", "LearnedDenoiser", "TreeUNet", "UNet1DBaseline",
           "UNet2DBaseline", "RootClassifier"]
