"""What a finished run leaves behind, and how to load it back.

``OUT/model/`` (``save_pretrained`` of the EMA weights: the model to sample with),
``OUT/model_raw/`` (the raw weights of the last step), ``OUT/config.toml`` (the resolved
:class:`TrainConfig`), ``OUT/ghm/`` (``GHM.save``: the data distribution, for the oracle and the
metrics), ``OUT/train_meta.json`` (training-set seed and size, steps, final losses, time, and
``ghm_sha256``, the content hash of the GHM trained on). :func:`load_trained` checks every one of
them and names the file that is missing, truncated or not the run's own.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from hdiff.ghm import GHM
from hdiff.io import atomic_directory, read_json, write_json_atomic, write_text_atomic
from hdiff.training.config import TrainConfig, load_train_config, train_config_to_toml
from hdiff.models.registry import model_class
from hdiff.noise import get_process
from hdiff.sampling.pipeline import save_pipeline_description
from hdiff.schedulers.factory import make_scheduler

MODEL_DIR = "model"
RAW_MODEL_DIR = "model_raw"
SNAPSHOT_DIR = "snapshots"  # snapshots/step_XXXXXX/: EMA weights at run.snapshot_steps


def save_pretrained_atomic(model: Any, directory: Path) -> None:
    """``model.save_pretrained`` into a temporary directory, then swap it in: never half a model."""
    with atomic_directory(directory) as tmp:
        model.save_pretrained(str(tmp))


def write_run_description(out: Path, cfg: TrainConfig, ghm: GHM) -> None:
    """``OUT/config.toml`` and ``OUT/ghm/``: written when a run starts, so even a crashed run says what it was."""
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "config.toml", train_config_to_toml(cfg))
    ghm.save(out / "ghm")


def save_final(out: Path, cfg: TrainConfig, ghm: GHM, ema_model: Any, raw_model: Any, meta: dict[str, Any]) -> None:
    """Write every final artifact of a run (main process only)."""
    write_run_description(out, cfg, ghm)
    save_pretrained_atomic(ema_model, out / MODEL_DIR)
    save_pretrained_atomic(raw_model, out / RAW_MODEL_DIR)
    # pipeline.json + scheduler/: HierarchicalDiffusionPipeline.from_pretrained(out) loads the run
    process = get_process(cfg.noise.process, ghm.vocab_size)
    scheduler = make_scheduler(process.schedulers[0], schedule=cfg.schedule)
    save_pipeline_description(out, ema_model, scheduler, process, ghm, model_kind=cfg.model.kind, model_path=MODEL_DIR)
    write_json_atomic(out / "train_meta.json", meta)


def is_run_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a finished training run (``config.toml`` and ``model/``)."""
    p = Path(path)
    return (p / "config.toml").is_file() and (p / MODEL_DIR).is_dir()


def load_trained(out: str | os.PathLike, *, raw: bool = False, snapshot: int | None = None,
                 device: torch.device | str = "cpu") -> tuple[torch.nn.Module, GHM, TrainConfig]:
    """Load a finished run, checking that its parts belong together.

    Args:
        out: the run directory written by :func:`hdiff.training.train`.
        raw: load the last step's raw weights instead of the EMA weights.
        snapshot: load the EMA weights saved at this step (``run.snapshot_steps``) instead.
        device: where to put the model and the GHM.

    Returns:
        ``(model, ghm, config)``; the model is in eval mode: ``model(x_t, alpha)`` gives
        ``log p(x0 | x_t)`` ``(B, v, *leaf_shape)``.

    Raises:
        ValueError: ``out`` is not a finished run directory, or one of its files is corrupt or
            truncated, or its ``ghm/`` is not the GHM the run recorded in ``train_meta.json``
            (each naming the file).
    """
    p = Path(out)
    if not is_run_dir(p):
        raise ValueError(f"{str(p)!r} is not a trained run directory (expected config.toml and {MODEL_DIR}/)")
    cfg = load_train_config(p / "config.toml")
    meta = read_json(p / "train_meta.json") if (p / "train_meta.json").is_file() else {}
    weights = p / (RAW_MODEL_DIR if raw else MODEL_DIR)
    if snapshot is not None:
        weights = p / SNAPSHOT_DIR / f"step_{snapshot:06d}"
        if not weights.is_dir():
            raise ValueError(f"{weights}: no snapshot at step {snapshot} (run.snapshot_steps = {cfg.run.snapshot_steps})")
    try:
        model = model_class(cfg.model.kind, cfg.ghm.layout).from_pretrained(str(weights))
    except Exception as e:  # noqa: BLE001 - diffusers and safetensors raise many types for a bad file
        text = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{weights}: cannot load the model ({type(e).__name__}: {text})") from None
    model = model.to(device).eval()
    ghm = GHM.load(p / "ghm", device=device)
    recorded = meta.get("ghm_sha256") if isinstance(meta, dict) else None
    if recorded is not None and ghm.sha256() != recorded:
        raise ValueError(f"{p / 'ghm'}: not the GHM this run was trained on (content hash {ghm.sha256()[:12]}..., "
                         f"train_meta.json records {str(recorded)[:12]}...)")
    return model, ghm, cfg
