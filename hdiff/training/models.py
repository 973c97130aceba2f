"""Which network class a ``[model] kind`` names, and how a config becomes an instance.

Every trainable denoiser is a diffusers ``ModelMixin`` + ``ConfigMixin`` whose
``forward(x_t, alpha)`` returns ``log p(x0 | x_t)`` ``(B, v, *leaf_shape)`` and which exposes
``process`` and ``leaf_shape``; that is all the training loop and the sampler rely on. Classes are
looked up lazily (the learned models live in :mod:`hdiff.denoisers`), and tests or notebooks may
:func:`register_model` their own.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable

import torch

from hdiff.ghm import GHM
from hdiff.noise import GaussianProcess, MaskingProcess, NoiseProcess, UniformProcess
from hdiff.training.config import TrainConfig

#: kind -> {layout: "module:attribute"} of the class, imported on first use
_BUILTIN = {
    "tree_unet": {"sequence": "hdiff.denoisers:TreeUNet", "image": "hdiff.denoisers:TreeUNet"},
    "unet_baseline": {"sequence": "hdiff.denoisers:UNet1DBaseline", "image": "hdiff.denoisers:UNet2DBaseline"},
}
_REGISTERED: dict[str, type] = {}

PROCESSES: dict[str, Callable[[int], NoiseProcess]] = {
    "gaussian": GaussianProcess, "masking": MaskingProcess, "uniform": UniformProcess,
}


def register_model(kind: str, cls: type) -> None:
    """Make ``[model] kind = "<kind>"`` build ``cls`` (a ModelMixin with the denoiser interface)."""
    _REGISTERED[kind] = cls


def model_kinds() -> list[str]:
    """Every kind a config may name."""
    return sorted(set(_BUILTIN) | set(_REGISTERED))


def model_class(kind: str, layout: str = "sequence") -> type:
    """The class for ``kind`` on leaves of ``layout`` (the diffusers baselines differ by layout).

    Raises:
        ValueError: naming ``model.kind`` when the kind is unknown or its class cannot be imported.
    """
    if kind in _REGISTERED:
        return _REGISTERED[kind]
    if kind not in _BUILTIN:
        raise ValueError(f"model.kind must be one of {model_kinds()}, got {kind!r}")
    spec = _BUILTIN[kind][layout]
    module, _, attr = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"model.kind = {kind!r}: {spec} is not available ({e})") from e


def model_kwargs(cfg: TrainConfig, ghm: GHM, cls: type) -> dict[str, Any]:
    """Constructor arguments: the GHM's shape and the noise process (those the class takes),
    ``model.channels`` (unless unset) and ``model.options``.

    Raises:
        ValueError: ``model.options`` sets a derived argument, or an argument is not the class's.
    """
    derived = {"vocab_size": ghm.vocab_size, "branching": ghm.branching, "depth": ghm.depth,
               "layout": ghm.layout, "process": cfg.noise.process}
    clash = sorted(set(derived) & set(cfg.model.options))
    if clash:
        raise ValueError(f"model.options must not set {clash}: they come from [ghm] and [noise]")
    params = inspect.signature(cls.__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    # the baselines fix what they cannot vary (UNet2DBaseline: branching 4, image layout): pass only what is taken
    kwargs = {k: v for k, v in derived.items() if takes_any or k in params}
    chosen = dict(cfg.model.options)
    if cfg.model.channels is not None:
        chosen["channels"] = cfg.model.channels
    unknown = sorted(k for k in chosen if not takes_any and k not in params)
    if unknown:
        names = ", ".join("model." + k if k == "channels" else "model.options." + k for k in unknown)
        raise ValueError(f"{names}: not an argument of {cls.__name__} (it takes {sorted(set(params) - {'self'})})")
    return {**kwargs, **chosen}


def build_model(cfg: TrainConfig, ghm: GHM) -> torch.nn.Module:
    """A freshly initialised model for ``cfg``; the init draws from a generator seeded with ``run.seed``.

    The global RNG is forked, not reseeded, so callers' random streams are left as they were.
    """
    cls = model_class(cfg.model.kind, ghm.layout)
    kwargs = model_kwargs(cfg, ghm, cls)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.run.seed)
        model = cls(**kwargs)
    check_model(model, cfg, ghm)
    return model


def check_model(model: torch.nn.Module, cfg: TrainConfig, ghm: GHM) -> None:
    """Raise ``ValueError`` when the model's ``process`` disagrees with ``[noise] process``."""
    kind = process_of(model, ghm.vocab_size).kind
    if kind != cfg.noise.process:
        raise ValueError(f"the model's process is {kind!r} but noise.process is {cfg.noise.process!r}")


def process_of(model: Any, vocab_size: int) -> NoiseProcess:
    """The model's noise process: its ``process`` attribute if a NoiseProcess, else built from the name."""
    p = getattr(model, "process", None)
    if isinstance(p, NoiseProcess):
        return p
    if isinstance(p, str) and p in PROCESSES:
        return PROCESSES[p](vocab_size)
    raise ValueError(f"{type(model).__name__}.process must be a NoiseProcess or one of {sorted(PROCESSES)}, got {p!r}")
