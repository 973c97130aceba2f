"""``HierarchicalDiffusionPipeline``: reverse diffusion on GHM leaves as a diffusers pipeline.

A pipeline directory (``save_pretrained``) holds everything needed to sample again bit-identically:

- ``pipeline.json``: the format, the noise process (:meth:`~hdiff.noise.NoiseProcess.config`) and
  what the denoiser is: ``{"type": "oracle"}`` (rebuilt from the GHM) or ``{"type": "learned",
  "kind": <model kind>, "path": "model"}`` (a ``save_pretrained`` model, found through
  :mod:`hdiff.models.registry`);
- ``scheduler/``: the scheduler's ``save_pretrained``;
- ``ghm/``: :meth:`hdiff.ghm.GHM.save` (required for the oracle, optional for a learned model);
- ``model/``: the learned model's weights (safetensors) and config.

A ``hdiff train`` run directory has the same layout (``model/``, ``ghm/``, plus ``pipeline.json``
and ``scheduler/`` written at the end of training), so ``from_pretrained(run_dir)`` loads it too.
Nothing is unpickled: JSON and safetensors only.
"""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput

from hdiff.denoisers.base import Denoiser
from hdiff.denoisers.oracle import BPDenoiser
from hdiff.ghm import GHM
from hdiff.io import write_json_atomic
from hdiff.models.registry import model_class
from hdiff.noise import NoiseProcess, process_from_config
from hdiff.sampling.loop import sample

PIPELINE_FILE = "pipeline.json"
FORMAT = "hdiff.pipeline/1"


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
        ghm: the GHM the data come from (the oracle's own by default); saved with the pipeline.

    Example:
        >>> pipe = HierarchicalDiffusionPipeline(BPDenoiser(ghm, MaskingProcess(8)), MaskedDiffusionScheduler(), MaskingProcess(8))
        >>> tokens = pipe(batch_size=64, num_inference_steps=16, generator=torch.Generator().manual_seed(0)).tokens
        >>> pipe.save_pretrained("my_pipeline")
        >>> again = HierarchicalDiffusionPipeline.from_pretrained("my_pipeline")
    """

    def __init__(self, denoiser: Denoiser, scheduler, process: NoiseProcess, ghm: GHM | None = None) -> None:
        super().__init__()
        if not isinstance(process, NoiseProcess):
            raise TypeError(f"process must be a NoiseProcess, got {type(process).__name__}")
        if process != denoiser.process:
            raise ValueError(f"process {process!r} does not match the denoiser's {denoiser.process!r}")
        if ghm is not None and not isinstance(ghm, GHM):
            raise TypeError(f"ghm must be a GHM or None, got {type(ghm).__name__}")
        self.register_modules(denoiser=denoiser, scheduler=scheduler)
        self.process = process
        self.ghm = ghm if ghm is not None else getattr(denoiser, "ghm", None)

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

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Write the pipeline directory (module docstring): process, scheduler, GHM, and the model if learned."""
        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        save_pipeline_description(out, self.denoiser, self.scheduler, self.process, self.ghm)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *, scheduler=None,
                        device: torch.device | str = "cpu", **kwargs: Any) -> "HierarchicalDiffusionPipeline":
        """Load a directory written by :meth:`save_pretrained` (or a ``hdiff train`` run directory).

        Args:
            pretrained_model_name_or_path: the local directory (hdiff never reaches a hub).
            scheduler: use this scheduler instead of the saved one.
            device: where the GHM and the model are loaded.

        Raises:
            ValueError: naming the file that is missing, malformed, or of an unknown format.
        """
        d = Path(pretrained_model_name_or_path)
        meta = _read_json(d / PIPELINE_FILE)
        if meta.get("format") != FORMAT:
            raise ValueError(f"{d / PIPELINE_FILE}: format must be {FORMAT!r}, got {meta.get('format')!r}")
        process = process_from_config(meta["process"])
        ghm = GHM.load(d / "ghm", device=device) if (d / "ghm" / "ghm.json").is_file() else None
        den = meta.get("denoiser", {})
        if den.get("type") == "oracle":
            if ghm is None:
                raise ValueError(f"{d}: an oracle pipeline needs its GHM in {d / 'ghm'}")
            denoiser: Any = BPDenoiser(ghm, process)
        elif den.get("type") == "learned":
            model_cls = model_class(den["kind"], den.get("layout", "sequence"))
            denoiser = model_cls.from_pretrained(str(d / den.get("path", "model"))).to(device)
            denoiser.eval().requires_grad_(False)
        else:
            raise ValueError(f"{d / PIPELINE_FILE}: denoiser.type must be 'oracle' or 'learned', got {den.get('type')!r}")
        if scheduler is None:
            scheduler = load_scheduler(d / "scheduler")
        return cls(denoiser, scheduler, process, ghm)


def save_pipeline_description(out: Path, denoiser: Any, scheduler: Any, process: NoiseProcess, ghm: GHM | None, *,
                              model_kind: str | None = None, model_path: str = "model") -> None:
    """Write ``pipeline.json``, ``scheduler/``, ``ghm/`` and (for a learned model not saved yet) ``model/``.

    ``model_kind`` names a learned model's registry kind (found from its class when None).
    """
    if isinstance(denoiser, BPDenoiser):
        den: dict[str, Any] = {"type": "oracle"}
    else:
        kind, layout = _kind_of(denoiser, model_kind)
        den = {"type": "learned", "kind": kind, "layout": layout, "path": model_path}
        if not (out / model_path / "config.json").is_file():
            denoiser.save_pretrained(str(out / model_path))
    if ghm is not None and not (out / "ghm" / "ghm.json").is_file():
        ghm.save(out / "ghm")
    scheduler.save_pretrained(str(out / "scheduler"))
    write_json_atomic(out / PIPELINE_FILE, {"format": FORMAT, "process": process.config(), "denoiser": den})


def load_scheduler(directory: Path) -> Any:
    """A scheduler saved by ``save_pretrained``: its class from ``_class_name`` (hdiff's or diffusers')."""
    config = _read_json(directory / "scheduler_config.json")
    name = config.get("_class_name")
    for module in ("hdiff.schedulers", "diffusers"):
        cls = getattr(importlib.import_module(module), str(name), None)
        if cls is not None and hasattr(cls, "from_pretrained"):
            return cls.from_pretrained(str(directory))
    raise ValueError(f"{directory / 'scheduler_config.json'}: unknown scheduler class {name!r}")


def _kind_of(model: Any, kind: str | None) -> tuple[str, str]:
    """``(kind, layout)`` under which the registry gives ``type(model)`` (``kind`` if given)."""
    from hdiff.ghm.layout import LAYOUTS
    from hdiff.models.registry import model_kinds

    for k in [kind] if kind is not None else model_kinds():
        for layout in LAYOUTS:
            try:
                if model_class(k, layout) is type(model):
                    return k, layout
            except ValueError:
                continue
    raise ValueError(f"{type(model).__name__} is not a registered model kind (hdiff.models.register_model)")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ValueError(f"{path}: missing")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data
