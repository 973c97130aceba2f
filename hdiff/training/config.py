"""The training config: one TOML file, one dataclass per table, validated on construction.

``TrainConfig`` is built with :func:`hdiff.config.from_dict` / :func:`load_toml` (unknown keys:
``ValueError`` naming the key; wrong types: ``TypeError``) and then checked for values that are
well-typed but meaningless (``n_train < batch_size``, a negative learning rate, ...), each error
naming its field as ``table.key``. The resolved config is written back with :func:`to_toml` next
to every trained model, so a run directory says exactly how it was made.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal

from hdiff.config import GHMConfig, from_dict, load_toml, to_toml


@dataclass
class ModelConfig:
    """The network. ``kind`` picks a class from :mod:`hdiff.models.registry` (``tree_unet``:
    :class:`~hdiff.models.TreeUNet`; ``bp_unet``: :class:`~hdiff.models.BPUNet`; ``unet_baseline``: ``UNet1DBaseline`` / ``UNet2DBaseline`` by
    layout). The GHM's ``vocab_size``, ``branching``, ``depth``, ``layout`` and the noise ``process``
    are filled in from the other tables (where the class takes them); ``channels`` (one width, or one
    per level; unset: the class default) and every entry of ``options`` go to the constructor as
    they are, e.g. ``options.block_out_channels`` for the baselines."""

    kind: str = "tree_unet"
    channels: int | list[int] | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class NoiseConfig:
    """The forward process and how training draws noise levels.

    ``t ~ U(t_min, 1)``; ``schedule`` maps it to the signal level ``alpha`` (a name of
    :func:`hdiff.noise.get_schedule`: ``linear`` ``alpha = 1 - t``, ``cosine`` ``cos(pi t / 2)``,
    ``cosine_squared`` ``cos^2(pi t / 2)``, ``cosine_squared_shifted`` Nichol & Dhariwal's
    ``alpha_bar``), or ``auto``: the process's default (linear for masking and uniform, the shifted
    cosine-squared for Gaussian). Training, the schedulers and the bounds all use this one schedule.
    ``elbo_weight`` (masking only) weights the cross-entropy of masked leaves by
    ``-alpha'(t) / (1 - alpha(t))`` (``1/t`` for linear): the MDLM bound (Sahoo et al. 2024).
    ``target = "oracle"`` trains against the BP oracle's exact posteriors instead of the clean
    tokens (the Rao-Blackwellised loss, no label noise; a diagnostic, docs/experiments.md).
    ``target = "empirical"`` trains against the exact posterior under the *training set*
    (:class:`~hdiff.denoisers.EmpiricalDenoiser`): the same expected loss and minimiser as ``x0``,
    with less variance, and no knowledge of the GHM (not with ``data.fresh``).
    ``t_sampling = "stratified"`` spreads each batch's ``t`` evenly over ``[t_min, 1)`` (VDM's
    low-discrepancy sampler: unbiased, lower-variance gradients); ``"uniform"`` draws them i.i.d.
    """

    process: Literal["gaussian", "masking", "uniform"] = "masking"
    schedule: Literal["auto", "linear", "cosine", "cosine_squared", "cosine_squared_shifted"] = "auto"
    elbo_weight: bool = False
    t_min: float = 1e-3
    target: Literal["x0", "oracle", "empirical"] = "x0"
    t_sampling: Literal["uniform", "stratified"] = "uniform"


@dataclass
class DataConfig:
    """``n_train`` GHM samples drawn with ``data_seed`` (the training set) and ``n_heldout`` others
    from a separate stream, disjoint from the training set (:mod:`hdiff.training.data`).

    ``fresh = true``: every step draws a new batch from the GHM instead (unlimited data, "n = inf";
    :mod:`hdiff.training.fresh`); ``n_train`` then only sizes the set the training loss is logged on.
    """

    n_train: int = 512
    n_heldout: int = 512
    data_seed: int = 0
    fresh: bool = False


@dataclass
class OptimConfig:
    """AdamW with linear warmup then a cosine decay to 0 (or a constant rate), gradient clipping, EMA.

    ``max_steps`` counts optimizer steps; ``batch_size`` is per process. ``grad_clip = 0`` turns
    clipping off; ``ema_decay`` is the EMA's ceiling (diffusers ``EMAModel`` ramps up to it).
    ``schedule = "constant"`` keeps the rate after warmup, and ``"inverse_sqrt"`` decays it as
    ``lr * sqrt(tau / (tau + step - warmup_steps))`` with ``tau = decay_timescale`` (Vaswani et al.
    2017's decay, which does not depend on ``max_steps``): with either, the run's state at step ``S``
    is what a run of ``S`` steps would end with, so its snapshots are a budget axis (``hdiff compare``
    diagnostics). ``"cosine"`` decays to 0 at ``max_steps``.
    """

    lr: float = 2e-3
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 100
    max_steps: int = 2000
    batch_size: int = 128
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    schedule: Literal["cosine", "constant", "inverse_sqrt"] = "cosine"
    decay_timescale: int = 1000


@dataclass
class RunConfig:
    """Seeds and cadences. ``seed`` drives the weight init, the data order and the noise draws.

    ``snapshot_steps``: steps at which the EMA weights are also saved to ``OUT/snapshots/step_XXXXXX/``
    (``save_pretrained``), for evaluating a run along its training time.

    ``log_with``: experiment tracking besides ``log.jsonl``: ``"none"`` (the default: nothing else),
    or the name of a tracker accelerate supports (``"tensorboard"``, ``"wandb"``, ``"mlflow"``, ...),
    or a list of them. Every ``log.jsonl`` record goes to each tracker at its step; trackers that
    write files write under ``OUT/tracking/`` (TensorBoard: ``OUT/tracking/<project_name>/``).
    ``project_name``: the trackers' project (the wandb / comet project, the TensorBoard folder).

    ``mixed_precision``: ``"bf16"`` / ``"fp16"`` autocast of the model's forward pass (accelerate);
    fp16 needs a CUDA GPU (its gradient scaler skips overflowing steps), bf16 also runs on CPU.
    ``compile``: ``torch.compile`` the model for training (never the default: compiling costs tens
    of seconds up front; evaluation and the saved weights are unaffected).
    """

    seed: int = 0
    checkpoint_every: int = 500
    eval_every: int = 250
    log_every: int = 50
    keep_checkpoints: int = 2
    num_workers: int = 0
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    compile: bool = False  # opt-in torch.compile of the training step's model (docs/performance.md)
    snapshot_steps: list[int] = field(default_factory=list)
    log_with: str | list[str] = "none"
    project_name: str = "hdiff"


@dataclass
class TrainConfig:
    """Everything a training run needs; the tables of ``configs/train_*.toml``."""

    ghm: GHMConfig = field(default_factory=GHMConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` / ``TypeError`` naming the first bad field."""
        if not isinstance(self.model.options, dict):
            raise TypeError(f"model.options must be a table, got {type(self.model.options).__name__}")
        ch = self.model.channels
        if ch is not None and not all(c >= 1 for c in (ch if isinstance(ch, list) else [ch])):
            raise ValueError(f"model.channels must be positive, got {ch}")
        for name in ("data.n_train", "data.n_heldout", "optim.max_steps", "optim.batch_size", "optim.decay_timescale",
                     "run.checkpoint_every", "run.eval_every", "run.log_every", "run.keep_checkpoints"):
            _positive(self, name)
        for name in ("optim.warmup_steps", "run.num_workers", "run.seed", "data.data_seed"):
            if _get(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {_get(self, name)}")
        steps = self.run.snapshot_steps
        if not all(isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= self.optim.max_steps for k in steps):
            raise ValueError(f"run.snapshot_steps must be steps in [1, optim.max_steps = {self.optim.max_steps}], got {steps}")
        if self.noise.target == "empirical" and self.data.fresh:
            raise ValueError('noise.target = "empirical" needs a training set: it cannot be used with data.fresh = true')
        if self.data.n_train < self.optim.batch_size and not self.data.fresh:
            raise ValueError(f"data.n_train ({self.data.n_train}) must be at least optim.batch_size "
                             f"({self.optim.batch_size}): every step draws a full batch from the training set")
        tracker_names(self.run.log_with)  # raises naming run.log_with
        if not _NAME.match(self.run.project_name):
            raise ValueError("run.project_name must be a name of letters, digits, '.', '_' and '-' (it names a "
                             f"folder), got {self.run.project_name!r}")
        o = self.optim
        if not o.lr > 0:
            raise ValueError(f"optim.lr must be > 0, got {o.lr}")
        if o.weight_decay < 0 or o.eps <= 0 or o.grad_clip < 0:
            raise ValueError("optim.weight_decay and optim.grad_clip must be >= 0 and optim.eps > 0")
        if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
            raise ValueError(f"optim.betas must be two numbers in [0, 1), got {o.betas}")
        if not 0 <= o.ema_decay < 1:
            raise ValueError(f"optim.ema_decay must lie in [0, 1), got {o.ema_decay}")
        if not 0 <= self.noise.t_min < 1:
            raise ValueError(f"noise.t_min must lie in [0, 1), got {self.noise.t_min}")
        from hdiff.noise import get_process

        if self.noise.elbo_weight and not get_process(self.noise.process, 2).elbo_loss:
            # the uniform and Gaussian bounds are not weighted cross-entropies; refuse rather than fake one
            raise ValueError("noise.elbo_weight is only defined for noise.process = 'masking'")
        if self.noise.elbo_weight and self.noise.t_min <= 0:
            raise ValueError("noise.t_min must be > 0 with noise.elbo_weight (the weight 1/t diverges at t = 0)")

    @property
    def schedule(self) -> str:
        """The resolved schedule name (``auto`` -> the process's default)."""
        from hdiff.noise import get_process, resolve_schedule

        return resolve_schedule(self.noise.schedule, get_process(self.noise.process, 2)).name

    def replace(self, **dotted: Any) -> "TrainConfig":
        """A validated copy with fields overridden by dotted names, e.g. ``replace(**{"data.n_train": 64})``."""
        new = copy.deepcopy(self)
        for name, value in dotted.items():
            table, _, key = name.rpartition(".")
            try:
                target = _get(new, table) if table else new
            except AttributeError:
                target = None
            if not is_dataclass(target) or key not in {f.name for f in fields(target)}:
                raise ValueError(f"unknown config field {name!r}")
            setattr(target, key, value)
        return from_dict(TrainConfig, dataclasses.asdict(new), "config")  # re-checks types and values


def tracker_names(log_with: str | list[str]) -> list[str]:
    """The trackers ``run.log_with`` names, as a list (``[]`` for ``"none"``).

    Raises:
        ValueError: naming ``run.log_with``: a name accelerate does not know (or ``"none"`` / ``"all"``
            in a list, or a name twice).
    """
    names = [log_with] if isinstance(log_with, str) else list(log_with)
    if names in ([], ["none"]):
        return []
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    known = sorted(LOGGER_TYPE_TO_CLASS)
    if any(n not in known for n in names) or len(set(names)) != len(names):
        raise ValueError(f'run.log_with must be "none" or one of {known} (or a list of distinct ones), '
                         f"got {log_with!r}")
    return names


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _positive(cfg: TrainConfig, dotted: str) -> None:
    if _get(cfg, dotted) < 1:
        raise ValueError(f"{dotted} must be >= 1, got {_get(cfg, dotted)}")


def load_train_config(path: str | Path) -> TrainConfig:
    """Read and validate a training config from a TOML file."""
    return load_toml(TrainConfig, path)


def train_config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """Build and validate a training config from a nested dict (the parsed TOML)."""
    return from_dict(TrainConfig, data, "config")


def train_config_to_toml(cfg: TrainConfig) -> str:
    """The resolved config as TOML (what ``OUT/config.toml`` holds)."""
    return to_toml(cfg)
