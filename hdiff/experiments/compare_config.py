"""The config of ``hdiff compare``: a training config plus a ``[compare]`` table for the sweep.

One TOML file (``configs/demo.toml``): the tables of a training config (``[ghm]``, ``[model]``,
``[noise]``, ``[data]``, ``[optim]``, ``[run]``; see :mod:`hdiff.training.config`) describe how
every learned denoiser is trained, and ``[compare]`` says for which training-set sizes, for how
many steps, with which samplers and how much evaluation. ``data.n_train`` is the sweep's job, so
it must not appear. Unknown keys and wrong types are errors naming the field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from hdiff.config import from_dict, read_toml, to_toml
from hdiff.noise import get_process
from hdiff.schedulers.factory import check_pair, check_steps
from hdiff.training.config import ModelConfig, TrainConfig, train_config_from_dict
from hdiff.models.registry import model_class


@dataclass
class SamplerSpec:
    """One way to sample: a scheduler by name (:func:`hdiff.schedulers.make_scheduler`) and a step count.

    ``steps = 0`` means one step per leaf (the fixed-count unmasking that is exact for the oracle).
    """

    name: str
    scheduler: str
    steps: int
    unmasking: Literal["bernoulli", "fixed"] = "bernoulli"
    prediction_type: Literal["epsilon", "sample", "v_prediction"] = "epsilon"


@dataclass
class BaselineConfig:
    """``[compare.baseline_model]`` or one ``[[compare.models]]`` table: another learned model of the sweep.

    The keys of a ``[model]`` table (``channels`` unset means the class default), plus ``lr``: this
    model's learning rate (unset: ``optim.lr``), since architectures differ in the rate they train at.
    """

    kind: str = "unet_baseline"
    channels: int | list[int] | None = None
    options: dict[str, Any] = field(default_factory=dict)
    lr: float | None = None


@dataclass
class SweepConfig:
    """The ``[compare]`` table.

    Attributes:
        n_train: training-set sizes (nested sets: each is a prefix of the next).
        max_steps: optimizer steps per size (one entry per ``n_train``, or one for all).
        samplers: ``[[compare.samplers]]`` tables; every denoiser samples with every one.
        baseline: also train the diffusers U-Net baseline (``[compare.baseline_model]``).
        baseline_model: the baseline's ``[model]`` table.
        num_samples: samples per (denoiser, sampler).
        nelbo_samples, nelbo_draws: held-out samples and Monte-Carlo draws for the likelihood bound.
        kl_samples, kl_bins: held-out samples and ``alpha`` bins for ``KL(oracle || learned)``.
        panel_size: samples drawn in each picture.
        seed: seeds the samplers and the estimators (the same draws for every denoiser).
        workers: trainings run at once, each in its own process with one thread (on a small CPU,
            two one-thread trainings beat one two-thread training: the tensors are small).
        models: ``[[compare.models]]``: more learned models (e.g. ``kind = "bp_unet"``), trained on
            every ``n`` like ``[model]``.
        reference_bp_unet: add the BP U-Net built from the GHM (:meth:`hdiff.models.BPUNet.from_ghm`),
            untrained, as a reference row beside the oracle (its KL to the oracle is ~0).
        decomposition: the gap decomposition of ``[model]`` (docs/experiments.md, "Diagnostics"):
            ``"fresh"`` adds a run on fresh samples every step (``n = inf``) evaluated at every
            ``n``'s budget, ``"fresh_rb"`` also one against the oracle's posteriors. Needs a schedule
            that does not depend on ``max_steps`` (``optim.schedule = "constant"`` or ``"inverse_sqrt"``),
            so that one run's snapshot at ``S`` steps is a run of ``S`` steps.
        snapshots: EMA snapshots per learned cell, evenly spaced, evaluated for the training-time
            axis on ``snapshot_samples`` samples of the first sampler (0: off).
        probes: fit linear probes from each level's activations to BP's messages
            (:mod:`hdiff.metrics.message_probes`) on ``probe_samples`` held-out samples, ``probe_bins`` noise bins.
    """

    n_train: list[int]
    max_steps: list[int]
    samplers: list[SamplerSpec]
    baseline: bool = False
    baseline_model: BaselineConfig = field(default_factory=BaselineConfig)
    num_samples: int = 1000
    nelbo_samples: int = 256
    nelbo_draws: int = 16
    kl_samples: int = 256
    kl_bins: int = 10
    panel_size: int = 12
    seed: int = 0
    workers: int = 1
    models: list[BaselineConfig] = field(default_factory=list)
    reference_bp_unet: bool = False
    decomposition: Literal["none", "fresh", "fresh_rb"] = "none"
    snapshots: int = 0
    snapshot_samples: int = 256
    probes: bool = False
    probe_samples: int = 512
    probe_bins: int = 4


@dataclass
class CompareConfig:
    """A training config (``train``) and the sweep (``compare``)."""

    train: TrainConfig
    compare: SweepConfig

    def __post_init__(self) -> None:
        self.validate()

    @property
    def models(self) -> dict[str, ModelConfig | BaselineConfig]:
        """The learned denoisers of the sweep by name: ``[model]`` and, if asked, the baseline."""
        out = {self.train.model.kind: self.train.model}
        if self.compare.baseline:
            out[self.compare.baseline_model.kind] = self.compare.baseline_model
        for m in self.compare.models:
            out[m.kind] = m
        return out

    def diagnostic_runs(self) -> list[str]:
        """The data kinds of the gap decomposition of ``[model]``: ``[]``, ``["fresh"]`` or ``["fresh", "fresh_rb"]``."""
        return {"none": [], "fresh": ["fresh"], "fresh_rb": ["fresh", "fresh_rb"]}[self.compare.decomposition]

    def snapshot_steps(self, steps: int) -> list[int]:
        """The time axis of a run of ``steps``: ``compare.snapshots`` evenly spaced steps before the end."""
        k = self.compare.snapshots
        return sorted({max(1, round(steps * i / (k + 1))) for i in range(1, k + 1)} - {steps}) if k else []

    def fresh_config(self, data: str) -> TrainConfig:
        """The one run of ``[model]`` on fresh data (``data = "fresh"``, or ``"fresh_rb"``: oracle targets)
        for the largest budget, with a snapshot at every other ``n``'s budget."""
        n_max = max(self.compare.n_train)
        base = self.train_config(n_max, self.train.model.kind)
        budgets = {self.steps_for(n) for n in self.compare.n_train}
        snaps = sorted((budgets | set(self.snapshot_steps(base.optim.max_steps))) - {base.optim.max_steps})
        return base.replace(**{"data.fresh": True, "noise.target": "oracle" if data == "fresh_rb" else "x0",
                               "run.snapshot_steps": snaps})

    def steps_for(self, n: int) -> int:
        """Optimizer steps for training-set size ``n``."""
        c = self.compare
        return c.max_steps[0] if len(c.max_steps) == 1 else c.max_steps[c.n_train.index(n)]

    def train_config(self, n: int, model: str) -> TrainConfig:
        """The training config of one cell: size ``n``, the named model, its steps; batch at most ``n``."""
        m = self.models[model]
        steps = self.steps_for(n)
        return self.train.replace(**{
            "data.n_train": n, "optim.max_steps": steps, "optim.batch_size": min(self.train.optim.batch_size, n),
            "optim.warmup_steps": min(self.train.optim.warmup_steps, steps // 4),
            "model.kind": m.kind, "model.channels": m.channels, "model.options": dict(m.options),
            "run.checkpoint_every": min(self.train.run.checkpoint_every, steps),
            "run.snapshot_steps": self.snapshot_steps(steps),
            **({"optim.lr": m.lr} if getattr(m, "lr", None) is not None else {}),
        })

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad ``compare.*`` field."""
        c = self.compare
        if not c.n_train or any(n < 1 for n in c.n_train) or len(set(c.n_train)) != len(c.n_train):
            raise ValueError(f"compare.n_train must be distinct positive sizes, got {c.n_train}")
        if len(c.max_steps) not in (1, len(c.n_train)) or any(s < 1 for s in c.max_steps):
            raise ValueError(f"compare.max_steps must hold one positive count, or one per compare.n_train, got {c.max_steps}")
        if not c.samplers:
            raise ValueError("compare.samplers: give at least one [[compare.samplers]] table")
        names = [s.name for s in c.samplers]
        if len(set(names)) != len(names) or not all(n.replace("-", "").replace("_", "").isalnum() for n in names):
            raise ValueError(f"compare.samplers.name must be distinct words (letters, digits, - and _), got {names}")
        process = get_process(self.train.noise.process, 2)
        for s in c.samplers:
            try:
                check_pair(process, s.scheduler)
            except ValueError as e:
                raise ValueError(f"compare.samplers.scheduler: {e}") from None
            if s.steps < 0:
                raise ValueError(f"compare.samplers.steps must be >= 0 (0: one per leaf), got {s.steps}")
            g = self.train.ghm
            steps = s.steps or g.branching**g.depth  # 0: one step per leaf
            kwargs = {"schedule": self.train.schedule} if s.scheduler != "discrete-ddim" else {}
            try:  # what the scheduler would refuse after training, refused now
                check_steps(s.scheduler, steps, prediction_type=s.prediction_type, unmasking=s.unmasking, **kwargs)
            except ValueError as e:
                raise ValueError(f"compare.samplers ({s.name}).steps = {s.steps}: {e}") from None
        for name in ("num_samples", "nelbo_samples", "kl_samples", "kl_bins", "panel_size", "workers"):
            if getattr(c, name) < 1:
                raise ValueError(f"compare.{name} must be >= 1, got {getattr(c, name)}")
        if c.seed < 0:
            raise ValueError(f"compare.seed must be >= 0, got {c.seed}")
        if c.nelbo_draws < 2:
            raise ValueError(f"compare.nelbo_draws must be >= 2 (for a standard error), got {c.nelbo_draws}")
        if c.baseline and c.baseline_model.kind == self.train.model.kind:
            raise ValueError("compare.baseline_model.kind must differ from model.kind")
        kinds = [self.train.model.kind] + ([c.baseline_model.kind] if c.baseline else []) + [m.kind for m in c.models]
        if len(set(kinds)) != len(kinds):
            raise ValueError(f"compare.models: every learned model needs its own kind, got {kinds}")
        for name in ("snapshots", "snapshot_samples", "probe_samples", "probe_bins"):
            if getattr(c, name) < (0 if name == "snapshots" else 1):
                raise ValueError(f"compare.{name} must be >= {0 if name == 'snapshots' else 1}, got {getattr(c, name)}")
        if c.probe_samples < 4:
            raise ValueError(f"compare.probe_samples must be >= 4 (half fit, half score), got {c.probe_samples}")
        if c.decomposition != "none" and self.train.optim.schedule == "cosine":
            raise ValueError('compare.decomposition needs optim.schedule = "constant" or "inverse_sqrt" (not "cosine", '
                             "which depends on max_steps): the n = inf reference is one run whose snapshot at each "
                             "n's budget must equal a run of that many steps")
        for model in self.models.values():
            model_class(model.kind, self.train.ghm.layout)  # names model.kind if unknown
        for n in c.n_train:
            for model in self.models:
                self.train_config(n, model)  # every cell's config is valid
        for data in self.diagnostic_runs():
            self.fresh_config(data)

    def to_toml(self) -> str:
        """The resolved config in the file's own format (training tables plus ``[compare]``)."""
        train = dataclasses.asdict(self.train)
        del train["data"]["n_train"]  # the sweep's sizes are compare.n_train
        return to_toml({**train, "compare": dataclasses.asdict(self.compare)})


def compare_config_from_dict(data: dict[str, Any], name: str = "config") -> CompareConfig:
    """Build and validate a :class:`CompareConfig` from the parsed TOML."""
    data = dict(data)
    if "compare" not in data:
        raise ValueError(f"{name}: missing the [compare] table")
    sweep = from_dict(SweepConfig, data.pop("compare"), f"{name}.compare")
    if "n_train" in data.get("data", {}):
        raise ValueError(f"{name}.data.n_train: the training-set sizes are compare.n_train in a compare config")
    # the training tables need some n_train >= batch_size to validate; every cell sets its own
    batch = data.get("optim", {}).get("batch_size", 1)
    n_max = max([*sweep.n_train, batch if isinstance(batch, int) else 1, 1])
    train = train_config_from_dict({**data, "data": {**data.get("data", {}), "n_train": n_max}})
    return CompareConfig(train, sweep)


def load_compare_config(path: str | Path) -> CompareConfig:
    """Read ``configs/demo.toml``-style files (see the module docstring; a missing file or bad TOML names the file)."""
    return compare_config_from_dict(read_toml(path), Path(path).name)
