"""Reverse diffusion: the plain sampling loop and the diffusers pipeline around it."""

from hdiff.sampling.loop import sample
from hdiff.sampling.pipeline import HierarchicalDiffusionPipeline, HierarchicalPipelineOutput

__all__ = ["sample", "HierarchicalDiffusionPipeline", "HierarchicalPipelineOutput"]
