"""Checkpoints that are either complete and intact or ignored, and a JSONL log that a resume can rewind.

Layout of a run directory ``OUT``::

    OUT/checkpoints/step_000500/   accelerate's save_state (model as safetensors; optimizer, lr
                                   scheduler, RNG states as torch files read back with
                                   weights_only=True), hdiff_ema.safetensors (the EMA weights),
                                   hdiff_process_<i>.json (each process's noise generator and loop
                                   counters) and the marker hdiff_state.json
    OUT/log.jsonl                  one JSON record per line

A checkpoint is written into ``.tmp_step_XXXXXX`` and renamed when every process has finished:
a run killed mid-save leaves only a temp dir, which the next save or resume ignores. The marker
lists the SHA-256 of every file of the checkpoint, so a checkpoint truncated or edited after it
was written is found before anything of it is loaded, and a resume falls back to the previous
one (:func:`resumable_checkpoint`). Nothing here unpickles: hdiff's own files are JSON and
safetensors, and accelerate's torch files are loaded with ``weights_only=True``.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load_file, save_file

from hdiff.io import file_sha256, read_json, write_json_atomic, write_text_atomic

_NAME = re.compile(r"^step_(\d{6,})$")
_MARKER = "hdiff_state.json"
_EMA_FILE = "hdiff_ema.safetensors"
_FORMAT = 2  # 1: pickled EMA (custom_checkpoint_0.pkl) and hdiff_process_<i>.pt, no file hashes


def checkpoints_root(out: str | os.PathLike) -> Path:
    """``OUT/checkpoints``."""
    return Path(out) / "checkpoints"


def list_checkpoints(out: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints (those with a marker) of the run in ``out`` as ``(step, path)``, oldest first."""
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
    """The newest complete checkpoint, or None (not verified: see :func:`resumable_checkpoint`)."""
    found = list_checkpoints(out)
    return found[-1] if found else None


def verify_checkpoint(path: str | os.PathLike) -> str | None:
    """Why the checkpoint at ``path`` cannot be resumed from (one line), or None if it is intact.

    A checkpoint of format 2 is intact when every file its marker lists has the recorded
    SHA-256; one of format 1 (no hashes) is accepted as it is.
    """
    path = Path(path)
    try:
        marker = read_json(path / _MARKER)
    except (OSError, ValueError) as e:
        return str(e)
    if not isinstance(marker, dict) or not isinstance(marker.get("step"), int):
        return f"{path / _MARKER}: not a checkpoint marker"
    for name, digest in marker.get("files", {}).items():
        f = path / name
        if not f.is_file():
            return f"{f}: missing"
        if file_sha256(f) != digest:
            return f"{f}: changed or truncated since it was saved (SHA-256 differs)"
    return None


def resumable_checkpoint(out: str | os.PathLike) -> tuple[int, Path] | None:
    """The newest intact checkpoint of ``out``, or None.

    Each newer checkpoint that fails :func:`verify_checkpoint` is skipped with a
    ``RuntimeWarning`` naming the bad file; a resume then redoes the steps since the one it uses.
    """
    for step, path in reversed(list_checkpoints(out)):
        problem = verify_checkpoint(path)
        if problem is None:
            return step, path
        warnings.warn(f"checkpoint {path} is damaged and skipped: {problem}", RuntimeWarning, stacklevel=2)
    return None


def save_checkpoint(accelerator, out: str | os.PathLike, step: int, process_state: dict[str, Any],
                    *, keep: int, ema: Any) -> Path:
    """Write the training state at ``step`` atomically and keep only the newest ``keep`` checkpoints.

    Every process must call this (accelerate saves per-process RNG states).

    Args:
        accelerator: the run's ``Accelerator`` (its prepared model, optimizer and scheduler are saved).
        out: the run directory.
        step: the optimizer step just completed.
        process_state: this process's own state: JSON-able counters and ``noise_rng``, a
            generator state (``ByteTensor``), saved as ``hdiff_process_<process_index>.json``.
        keep: how many checkpoints to keep.
        ema: the run's diffusers ``EMAModel``, saved as ``hdiff_ema.safetensors`` plus its
            scalars in the marker.

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
    rng = process_state.get("noise_rng")
    mine = {**process_state, "noise_rng": None if rng is None else base64.b64encode(rng.numpy().tobytes()).decode()}
    write_json_atomic(tmp / f"hdiff_process_{accelerator.process_index}.json", mine)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = ema.state_dict()
        shadow = {f"shadow.{i}": t.detach().cpu().contiguous() for i, t in enumerate(state.pop("shadow_params"))}
        save_file(shadow, str(tmp / _EMA_FILE))
        files = {p.name: file_sha256(p) for p in sorted(tmp.iterdir()) if p.is_file() and not p.name.startswith(".")}
        marker = {"format": _FORMAT, "step": step, "num_processes": accelerator.num_processes, "ema": state,
                  "files": files}
        write_text_atomic(tmp / _MARKER, json.dumps(marker))
        if final.exists():  # re-saving a step after a resume: replace, never merge
            shutil.rmtree(final)
        os.replace(tmp, final)
        for _, old in list_checkpoints(out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: Path, ema: Any) -> dict[str, Any]:
    """Restore accelerate's state and the EMA from ``path``; return this process's own saved state.

    The state also holds ``num_processes``, how many processes saved the checkpoint (None if its
    marker does not say). A run resumed on more processes than it was saved with has no state file
    for the new ones; they get process 0's counters and ``noise_rng = None`` (the caller reseeds):
    the curve then continues, but not bit-identically. Checkpoints of format 1 load too, without unpickling:
    their EMA and process files are read with ``torch.load(weights_only=True)``.
    """
    marker = read_json(path / _MARKER)
    with _accelerate_view(path) as view:
        accelerator.load_state(str(view))
    if (path / _EMA_FILE).is_file():
        if "ema" not in marker:
            raise ValueError(f"{path / _MARKER}: has no EMA settings for {_EMA_FILE}")
        shadow = load_file(str(path / _EMA_FILE))
        ema_state = {**marker["ema"], "shadow_params": [shadow[f"shadow.{i}"] for i in range(len(shadow))]}
    else:  # format 1: accelerate's pickle of the EMA state dict; plain tensors and numbers, so weights_only works
        ema_state = _load_plain(path / "custom_checkpoint_0.pkl")
    ema.load_state_dict(ema_state)
    index = accelerator.process_index
    state = _process_state(path, index)
    if state is None:
        state = _process_state(path, 0)
        state["noise_rng"] = None
    return {**state, "num_processes": marker.get("num_processes")}


def _process_state(path: Path, index: int) -> dict[str, Any] | None:
    json_file, legacy = path / f"hdiff_process_{index}.json", path / f"hdiff_process_{index}.pt"
    if json_file.is_file():
        state = read_json(json_file)
        rng = state.get("noise_rng")
        if rng is not None:
            state["noise_rng"] = torch.frombuffer(bytearray(base64.b64decode(rng)), dtype=torch.uint8)
        return state
    if legacy.is_file():
        return _load_plain(legacy)
    return None


def _load_plain(path: Path) -> Any:
    """``torch.load(weights_only=True)``: tensors, numbers, strings and containers only; anything else
    (a pickle that would import or call code) is refused with a ``ValueError`` naming the file."""
    try:
        with warnings.catch_warnings():  # torch warns about unusual pickle protocols before refusing them
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError, ...
        raise ValueError(f"{path}: refused to load: not a plain tensor file ({type(e).__name__}); hdiff never "
                         "unpickles code from a checkpoint") from None


@contextmanager
def _accelerate_view(path: Path) -> Iterator[Path]:
    """``path`` itself, or for a format-1 checkpoint a view of it without the pickled EMA.

    accelerate loads a ``custom_checkpoint_<i>.pkl`` it finds with ``weights_only=False`` (and
    refuses a checkpoint with more of them than registered objects); hdiff registers none and
    reads the EMA itself, so those files are hidden from it behind symlinks.
    """
    pickled = [p for p in path.iterdir() if p.name.startswith("custom_checkpoint_")]
    if not pickled:
        yield path
        return
    view = Path(tempfile.mkdtemp(dir=path.parent, prefix=".view_"))
    try:
        for p in path.iterdir():
            if p not in pickled:
                (view / p.name).symlink_to(p.resolve())
        yield view
    finally:
        shutil.rmtree(view, ignore_errors=True)


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
