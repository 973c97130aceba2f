"""Checkpoints that are either complete or absent, and a JSONL log that a resume can rewind.

Layout of a run directory ``OUT``::

    OUT/checkpoints/step_000500/   accelerate's save_state (model, optimizer, lr scheduler, RNGs,
                                   the EMA as a registered object) + hdiff_process_<i>.pt (each
                                   process's noise generator and loop counters) + hdiff_state.json
    OUT/log.jsonl                  one JSON record per line

A checkpoint is written into ``.tmp_step_XXXXXX`` and renamed when every process has finished:
a run killed mid-save leaves only a temp dir, which the next save or resume ignores.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from hdiff.io import write_text_atomic

_NAME = re.compile(r"^step_(\d{6,})$")
_MARKER = "hdiff_state.json"


def checkpoints_root(out: str | os.PathLike) -> Path:
    """``OUT/checkpoints``."""
    return Path(out) / "checkpoints"


def list_checkpoints(out: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints of the run in ``out`` as ``(step, path)``, oldest first."""
    root = checkpoints_root(out)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and (p / _MARKER).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(out: str | os.PathLike) -> tuple[int, Path] | None:
    """The newest complete checkpoint, or None."""
    found = list_checkpoints(out)
    return found[-1] if found else None


def save_checkpoint(accelerator, out: str | os.PathLike, step: int, process_state: dict[str, Any],
                    *, keep: int) -> Path:
    """Write the training state at ``step`` atomically and keep only the newest ``keep`` checkpoints.

    Every process must call this (accelerate saves per-process RNG states).

    Args:
        accelerator: the run's ``Accelerator`` (its prepared objects and registered EMA are saved).
        out: the run directory.
        step: the optimizer step just completed.
        process_state: this process's own state (noise generator, loop counters), saved as
            ``hdiff_process_<process_index>.pt``.
        keep: how many checkpoints to keep.

    Returns:
        The checkpoint directory.
    """
    root = checkpoints_root(out)
    final = root / f"step_{step:06d}"
    tmp = root / f".tmp_step_{step:06d}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp_step_*"):  # leftovers of a run killed mid-save
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    torch.save(process_state, tmp / f"hdiff_process_{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / _MARKER).write_text(json.dumps({"step": step, "num_processes": accelerator.num_processes}))
        if final.exists():  # re-saving a step after a resume: replace, never merge
            shutil.rmtree(final)
        os.replace(tmp, final)
        for _, old in list_checkpoints(out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: Path) -> dict[str, Any]:
    """Restore accelerate's state from ``path`` and return this process's own saved state.

    A run resumed on more processes than it was saved with has no state file for the new ones;
    they get process 0's counters and ``noise_rng = None`` (the caller reseeds): the curve then
    continues, but not bit-identically.
    """
    accelerator.load_state(str(path))
    mine = path / f"hdiff_process_{accelerator.process_index}.pt"
    if mine.is_file():
        return torch.load(mine, map_location="cpu", weights_only=False)
    state = torch.load(path / "hdiff_process_0.pt", map_location="cpu", weights_only=False)
    state["noise_rng"] = None
    return state


class JsonlLog:
    """Append-only JSON-lines log of training records (``{"step", "loss", "lr", ...}``).

    Each record is one ``write`` of a whole line on an ``O_APPEND`` descriptor, then ``fsync``: a
    crash leaves at most a torn last line, which :meth:`read` skips.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def append(self, record: dict[str, Any]) -> None:
        """Append one record."""
        line = (json.dumps(record) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)

    def read(self) -> list[dict[str, Any]]:
        """All complete records, in order."""
        if not self.path.is_file():
            return []
        records = []
        for line in self.path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a torn line from a crash
        return records

    def truncate_after(self, step: int) -> None:
        """Drop records with ``step > step`` (resuming from that checkpoint redoes them), atomically."""
        kept = [r for r in self.read() if r.get("step", 0) <= step]
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
