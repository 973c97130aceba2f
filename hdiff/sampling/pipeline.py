"""``HierarchicalDiffusionPipeline``: reverse diffusion on GHM leaves as a diffusers pipeline."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput

from hdiff.denoisers.base import Denoiser
from hdiff.noise.base import NoiseProcess
from hdiff.sampling.loop import sample


@dataclass
class HierarchicalPipelineOutput(BaseOutput):
    """Output of :class:`HierarchicalDiffusionPipeline`.

    Attributes:
        tokens: ``(B, *leaf_shape)`` long, the generated clean leaves.
    """

    tokens: torch.Tensor


class HierarchicalDiffusionPipeline(DiffusionPipeline):
    """Generate GHM leaves with any denoiser (the BP oracle or a learned net) and any scheduler.

    Args:
        denoiser: a :class:`~hdiff.denoisers.Denoiser`; needs ``leaf_shape``.
        scheduler: a diffusers scheduler (DDPM, DDIM, Euler, DPM-Solver for Gaussian noise) or
            hdiff's ``MaskedDiffusionScheduler`` / ``UniformDiffusionScheduler``.
        process: the noise process; must be the denoiser's.

    Example:
        >>> pipe = HierarchicalDiffusionPipeline(BPDenoiser(ghm, MaskingProcess(8)), MaskedDiffusionScheduler(), MaskingProcess(8))
        >>> tokens = pipe(batch_size=64, num_inference_steps=16, generator=torch.Generator().manual_seed(0)).tokens
    """

    def __init__(self, denoiser: Denoiser, scheduler, process: NoiseProcess) -> None:
        super().__init__()
        if not isinstance(process, NoiseProcess):
            raise TypeError(f"process must be a NoiseProcess, got {type(process).__name__}")
        if type(process) is not type(denoiser.process) or process.vocab_size != denoiser.process.vocab_size:
            raise ValueError(f"process {process!r} does not match the denoiser's {denoiser.process!r}")
        self.register_modules(denoiser=denoiser, scheduler=scheduler)
        self.process = process

    @torch.no_grad()
    def __call__(self, batch_size: int = 16, num_inference_steps: int = 50, *,
                 generator: torch.Generator | None = None, x0_mode: str = "marginal",
                 step_kwargs: dict | None = None, alpha_fn=None, channels_last: bool = False,
                 return_dict: bool = True) -> HierarchicalPipelineOutput | tuple[torch.Tensor]:
        """Sample ``batch_size`` leaf configurations; see :func:`hdiff.sampling.sample` for the arguments."""
        tokens = sample(self.denoiser, self.scheduler, batch_size=batch_size, num_inference_steps=num_inference_steps,
                        generator=generator, x0_mode=x0_mode, step_kwargs=step_kwargs, alpha_fn=alpha_fn,
                        channels_last=channels_last, device=self._execution_device_or_cpu(generator),
                        progress=self.progress_bar)
        return HierarchicalPipelineOutput(tokens=tokens) if return_dict else (tokens,)

    def _execution_device_or_cpu(self, generator: torch.Generator | None) -> torch.device:
        # The oracle has no parameters for diffusers to locate; follow the generator, else the GHM.
        if generator is not None:
            return generator.device
        ghm = getattr(self.denoiser, "ghm", None)
        return ghm.device if ghm is not None else torch.device("cpu")
