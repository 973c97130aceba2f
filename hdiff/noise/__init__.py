"""Forward noise processes, their schedules, and the one registry of both.

``get_process(name, vocab_size)`` is how configs, the CLI, learned models and saved pipelines turn a
process name into an object; ``get_schedule(name)`` does the same for schedules (docs/noise.md).
"""

from __future__ import annotations

from typing import Any

import torch

from hdiff.noise.base import NoiseProcess
from hdiff.noise.discrete import MaskingProcess, UniformProcess
from hdiff.noise.gaussian import GaussianProcess
from hdiff.noise.schedules import SCHEDULE_NAMES, Schedule, get_schedule

_PROCESSES: dict[str, type[NoiseProcess]] = {c.name: c for c in (MaskingProcess, UniformProcess, GaussianProcess)}
#: the names configs and the CLI use
PROCESS_NAMES: tuple[str, ...] = tuple(_PROCESSES)


def get_process(name: str, vocab_size: int, **options: Any) -> NoiseProcess:
    """The noise process called ``name`` over ``vocab_size`` symbols.

    Args:
        name: one of :data:`PROCESS_NAMES` (``masking``, ``uniform``, ``gaussian``).
        vocab_size: ``v >= 2``.
        options: process-specific settings, e.g. ``embedding`` (``(v, k)``, tensor or nested lists)
            for ``gaussian``.

    Raises:
        ValueError: naming the valid names when ``name`` is unknown, or a bad option.
    """
    if name not in _PROCESSES:
        raise ValueError(f"process must be one of {PROCESS_NAMES}, got {name!r}")
    if "embedding" in options and options["embedding"] is not None and not isinstance(options["embedding"], torch.Tensor):
        options = {**options, "embedding": torch.tensor(options["embedding"], dtype=torch.float32)}
    try:
        return _PROCESSES[name](vocab_size, **options)
    except TypeError as e:
        raise ValueError(f"process {name!r}: unknown option(s) {sorted(options)}") from e


def process_from_config(config: dict[str, Any]) -> NoiseProcess:
    """Inverse of :meth:`NoiseProcess.config`."""
    if not isinstance(config, dict) or "name" not in config or "vocab_size" not in config:
        raise ValueError(f"a process config needs 'name' and 'vocab_size', got {config!r}")
    options = {k: v for k, v in config.items() if k not in ("name", "vocab_size")}
    return get_process(config["name"], config["vocab_size"], **options)


def resolve_schedule(schedule: str, process: NoiseProcess) -> Schedule:
    """``auto`` -> the process's default schedule; any other name -> :func:`get_schedule`."""
    return get_schedule(process.default_schedule if schedule == "auto" else schedule)


__all__ = ["NoiseProcess", "GaussianProcess", "MaskingProcess", "UniformProcess", "get_process",
           "process_from_config", "PROCESS_NAMES", "Schedule", "get_schedule", "resolve_schedule", "SCHEDULE_NAMES"]
