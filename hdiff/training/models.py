"""How a training config becomes a model instance (the class comes from :mod:`hdiff.models.registry`)."""

from __future__ import annotations

import inspect
from typing import Any

import torch

from hdiff.ghm import GHM
from hdiff.models.registry import model_class
from hdiff.noise import PROCESS_NAMES, NoiseProcess, get_process
from hdiff.training.config import TrainConfig


def ghm_sizes(ghm: GHM) -> dict[str, Any]:
    """The GHM's sizes a model may take as defaults (never its rules or probabilities): alphabets, rule counts.

    Unlike the tree's shape, these are capacity choices: ``model.options`` may override them (e.g.
    a BPUNet with more rules or latent symbols than the GHM has).
    """
    from hdiff.ghm import ProductionKernel

    return {"num_classes": ghm.num_classes, "inner_vocab_sizes": [ghm.symbols(l) for l in range(1, ghm.depth)],
            "kernels": ["production" if isinstance(k, ProductionKernel) else "factorized" for k in ghm.kernels],
            "num_rules": [k.num_rules if isinstance(k, ProductionKernel) else 1 for k in ghm.kernels]}


def model_kwargs(cfg: TrainConfig, ghm: GHM, cls: type) -> dict[str, Any]:
    """Constructor arguments: the GHM's sizes and the noise process (those the class takes),
    ``model.channels`` (unless unset: then the class's default) and
    ``model.options`` (``init`` is not a constructor argument: see :func:`build_model`).

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
    kwargs = {k: v for k, v in {**ghm_sizes(ghm), **derived}.items() if k in params}
    kwargs.update({k: v for k, v in derived.items() if takes_any})
    chosen = {k: v for k, v in cfg.model.options.items() if k != "init"}
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
    ``model.options.init = "ghm"`` starts from the model the GHM itself defines, for classes that
    have a ``from_ghm(ghm, process, **options)`` constructor (:class:`~hdiff.models.BPUNet`: the U-Net
    that is exactly BP); ``"random"`` (the default) is a fresh initialisation.
    """
    cls = model_class(cfg.model.kind, ghm.layout)
    kwargs = model_kwargs(cfg, ghm, cls)
    init = cfg.model.options.get("init", "random")
    if init not in ("random", "ghm"):
        raise ValueError(f"model.options.init must be 'random' or 'ghm', got {init!r}")
    if init == "ghm" and not hasattr(cls, "from_ghm"):
        raise ValueError(f"model.options.init = 'ghm': {cls.__name__} has no from_ghm construction")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.run.seed)
        if init == "ghm":
            options = {k: v for k, v in kwargs.items() if k in ("width", "activation", "d_max")}
            model = cls.from_ghm(ghm, cfg.noise.process, **options)
        else:
            model = cls(**kwargs)
    check_model(model, cfg, ghm)
    return model


def check_model(model: torch.nn.Module, cfg: TrainConfig, ghm: GHM) -> None:
    """Raise ``ValueError`` when the model's ``process`` disagrees with ``[noise] process``."""
    name = process_of(model, ghm.vocab_size).name
    if name != cfg.noise.process:
        raise ValueError(f"the model's process is {name!r} but noise.process is {cfg.noise.process!r}")


def process_of(model: Any, vocab_size: int) -> NoiseProcess:
    """The model's noise process: its ``process`` attribute if a NoiseProcess, else built from the name."""
    p = getattr(model, "process", None)
    if isinstance(p, NoiseProcess):
        return p
    if isinstance(p, str) and p in PROCESS_NAMES:
        return get_process(p, vocab_size)
    raise ValueError(f"{type(model).__name__}.process must be a NoiseProcess or one of {PROCESS_NAMES}, got {p!r}")
