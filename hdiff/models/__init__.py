"""Network architectures: learned denoisers (tree U-Net, BP U-Net, diffusers baselines) and the root classifier.

Every denoiser here is a diffusers ``ModelMixin`` + ``ConfigMixin`` on
:class:`~hdiff.denoisers.LearnedDenoiser`: ``model(x_t, alpha) -> log p(x0_i = b | x_t)``
``(B, v, *leaf_shape)``. :mod:`hdiff.models.registry` maps a config's ``[model] kind`` to a class.
"""

from hdiff.models.baselines import UNet1DBaseline, UNet2DBaseline
from hdiff.models.bp_unet import BPUNet
from hdiff.models.classifier import RootClassifier
from hdiff.models.registry import model_class, model_kinds, register_model
from hdiff.models.tree_unet import TreeUNet

__all__ = ["TreeUNet", "BPUNet", "UNet1DBaseline", "UNet2DBaseline", "RootClassifier", "model_class", "model_kinds",
           "register_model"]
