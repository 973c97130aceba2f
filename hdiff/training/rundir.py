"""What ``train`` checks before it writes: the config against the machine, and the run directory.

:func:`preflight` refuses settings this machine cannot honour before anything is written;
:func:`prepare_run_dir` decides, under the directory's lock, whether ``out`` starts a run,
continues one (``resume``) or replaces one (``overwrite``), and refuses everything else: a
finished run without either flag, a run of another config, a run whose GHM is not the one its
config builds now, a checkpoint past ``optim.max_steps``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from hdiff.ghm import GHM
from hdiff.runs import clear_directory
from hdiff.training.artifacts import MODEL_DIR
from hdiff.training.checkpoint import latest_checkpoint, resumable_checkpoint
from hdiff.training.config import TrainConfig, load_train_config

#: config fields a resumed run may change (cadences, the length); anything else changes what is trained
RESUMABLE_FIELDS = ("optim.max_steps", "run.checkpoint_every", "run.eval_every", "run.log_every",
                    "run.keep_checkpoints", "run.num_workers", "run.log_with", "run.project_name", "run.compile")


class TrainingDiverged(RuntimeError):
    """The loss, the gradients or the weights of a run became NaN or infinite.

    The run stops at that step: nothing computed from the bad step is saved, so the run's last
    checkpoint is the last good state (a resume from it diverges again unless the config changes).
    """


def flatten_config(d: dict, prefix: str = "") -> dict:
    """A nested config dict (``dataclasses.asdict`` of a :class:`TrainConfig`) as ``{"optim.lr": ...}``;
    ``model.options`` stays one value (a table of free-form constructor arguments)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "options":
            out.update(flatten_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(a: TrainConfig, b: TrainConfig) -> list[str]:
    """Dotted names of the fields where ``a`` and ``b`` differ."""
    fa, fb = flatten_config(dataclasses.asdict(a)), flatten_config(dataclasses.asdict(b))
    return sorted(k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k))


def preflight(cfg: TrainConfig) -> None:
    """Refuse what this machine would silently ignore (before any file is written).

    Raises:
        ValueError: ``run.mixed_precision = "fp16"`` without a CUDA device (accelerate then trains
            in float32 without a word, so the run would not be what its config says).
    """
    if cfg.run.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ValueError('run.mixed_precision = "fp16" needs a CUDA GPU and this machine has none '
                         '(it would be ignored): use "no" or "bf16"')


def holds_run(out: Path) -> bool:
    """Whether ``out`` holds a training run that got as far as a checkpoint or a saved model."""
    return latest_checkpoint(out) is not None or (out / MODEL_DIR).exists()


def prepare_run_dir(out: Path, cfg: TrainConfig, ghm: GHM, *, resume: bool,
                    overwrite: bool) -> tuple[int, Path] | None:
    """The checkpoint to resume from (or None for a fresh start); called under the directory's lock.

    Args:
        out: the run directory (claimed and locked by the caller).
        cfg: the run's config.
        ghm: the GHM ``cfg`` builds.
        resume: continue the run in ``out`` from its newest intact checkpoint (damaged newer ones
            are skipped with a warning); a fresh start if there is none.
        overwrite: delete the run in ``out`` first and start over.

    Raises:
        ValueError: ``out`` holds a run and neither flag is given; a resume with another config
            (outside :data:`RESUMABLE_FIELDS`), with a checkpoint past ``optim.max_steps``, or whose
            recorded GHM differs from the one ``cfg`` builds now.
    """
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other: continue the run or replace it")
    if overwrite:
        clear_directory(out)
        return None
    if not resume:
        if holds_run(out):
            raise ValueError(f"{str(out)!r} already holds a training run (checkpoints/ or {MODEL_DIR}/): pass "
                             "--resume to continue it, --overwrite to delete it and start over, or choose another --out")
        return None
    if (out / "config.toml").is_file():
        changed = [k for k in config_differences(load_train_config(out / "config.toml"), cfg)
                   if k not in RESUMABLE_FIELDS]
        if changed:
            raise ValueError(f"cannot resume {str(out)!r}: the config differs from its config.toml in {changed} "
                             f"(only {', '.join(RESUMABLE_FIELDS)} may change on resume; --overwrite starts over)")
    if (out / "ghm" / "ghm.json").is_file():
        try:
            recorded = GHM.load(out / "ghm").sha256()
        except ValueError as e:
            raise ValueError(f"cannot resume {str(out)!r}: {e} (delete {out / 'ghm'} to have it rewritten "
                             "from the config)") from None
        if recorded != ghm.sha256():
            raise ValueError(f"cannot resume {str(out)!r}: its ghm/ is not the GHM [ghm] builds now (content hash "
                             f"{recorded[:12]}... vs {ghm.sha256()[:12]}...): start a new run")
    latest = resumable_checkpoint(out)
    if latest is not None and latest[0] > cfg.optim.max_steps:
        raise ValueError(f"cannot resume {str(out)!r} with optim.max_steps = {cfg.optim.max_steps}: it is already "
                         f"at step {latest[0]} (a shorter run is a new run: --overwrite or another --out)")
    return latest
