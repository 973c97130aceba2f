"""Output directories: which command owns one, and one writer at a time (docs/guarantees.md).

Every hdiff command that writes a directory (``train``, ``compare``, ``sample``, ``classify``,
``probe``, ``demo``) goes through :func:`output_dir`, which

1. checks the directory before anything is written (:func:`check_output_dir`): it must not be a
   file, must be writable, and must not belong to another command;
2. takes an exclusive lock on it (:class:`DirLock`), so two processes never write one directory
   at once: the second one fails at once with :class:`DirectoryLocked`, naming the holder;
3. records the owning command in ``.hdiff-owner.json`` the first time it claims the directory, so
   a later command of another kind refuses it instead of overwriting its files.

Why a lock and an owner: a sweep and a training run share file names (``config.toml``,
``metrics.json``); without them one command silently replaced the other's files, and two sweeps
on one directory trained the same cells twice and deleted each other's temporaries.

The lock is ``fcntl.flock`` on ``.hdiff.lock``, which also records the holder (pid, host, command,
time) for the error message. The kernel drops an flock when its holder dies, SIGKILL included,
so the lock of a dead process is taken over without any staleness guess, and two processes can
never both take over one stale lock (the race an ``O_EXCL`` file plus a pid check has).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

OWNER_FILE = ".hdiff-owner.json"
LOCK_FILE = ".hdiff.lock"
FORMAT = "hdiff.outdir/1"
#: the commands of ``hdiff`` that write directories (any other name may own a directory too, e.g. a new experiment)
COMMANDS = ("train", "compare", "sample", "classify", "probe", "demo", "width")
#: what each command writes at the top of its directory (``*.png`` stands for any PNG), and the entries
#: that identify a directory written before owner files existed as that command's (a legacy directory)
_OUTPUTS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "train": (frozenset({"config.toml", "ghm", "log.jsonl", "train_meta.json", "checkpoints", "model", "model_raw",
                         "pipeline.json", "scheduler", "snapshots", "tracking"}),
              frozenset({"train_meta.json", "checkpoints", "model", "log.jsonl"})),
    "compare": (frozenset({"config.toml", "cells", "runs", "samples", "metrics.json", "metrics.csv", "report.html",
                           "report.md", "*.png"}), frozenset({"cells", "runs"})),
    "sample": (frozenset({"tokens.pt", "tokens.npy", "metrics.json", "samples.png"}),
               frozenset({"tokens.pt", "tokens.npy"})),
    "classify": (frozenset({"config.toml", "metrics.json", "metrics.csv", "accuracy.png"}), frozenset({"accuracy.png"})),
    "probe": (frozenset({"config.toml", "metrics.json", "metrics.csv", "probe.png"}), frozenset({"probe.png"})),
    "demo": (frozenset({"summary.json", "samples.png"}), frozenset({"summary.json"})),
    "width": (frozenset({"config.toml", "metrics.json", "metrics.csv", "width.png"}), frozenset({"width.png"})),
}


class DirectoryLocked(RuntimeError):
    """Another live process holds the lock of an output directory."""


def _visible(directory: Path) -> list[str]:
    """Entries of ``directory`` except hidden ones (owner, lock, atomic writers' temporaries)."""
    return sorted(p.name for p in directory.iterdir() if not p.name.startswith("."))


def _mkdir(directory: Path, flag: str) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{flag} {str(directory)!r}: cannot create the directory ({e.strerror})") from None


def owner(directory: str | os.PathLike) -> str | None:
    """The command recorded in ``directory/.hdiff-owner.json``, or None when there is none.

    Raises:
        ValueError: the owner file is not the JSON hdiff writes (naming the file).
    """
    path = Path(directory) / OWNER_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        command = data["command"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: corrupt owner file ({type(e).__name__}); it should hold "
                         f'{{"command": ...}}: delete it only if you know which command wrote {directory}') from None
    if not isinstance(command, str) or not command:
        raise ValueError(f"{path}: corrupt owner file (command {command!r} is not a command name)")
    return command


def legacy_owner(directory: str | os.PathLike) -> str | None:
    """The command that wrote ``directory`` judged from its files (for directories without an owner file)."""
    names = _visible(Path(directory))
    for command, (outputs, marks) in _OUTPUTS.items():
        known = all(n in outputs or ("*.png" in outputs and n.endswith(".png")) for n in names)
        if known and marks & set(names):
            return command
    return None


def check_output_dir(directory: str | os.PathLike, command: str, *, flag: str = "--out") -> Path:
    """Refuse ``directory`` as ``command``'s output before anything is written; return it as a Path.

    Accepted: a path that does not exist yet (its nearest existing parent writable), an empty
    directory, a directory owned by ``command``, or a directory without owner file that holds
    only what ``command`` writes (written by an hdiff older than owner files).

    Raises:
        ValueError: one line naming ``flag``, the directory and, if any, its owner.
    """
    if not isinstance(command, str) or not command.replace("-", "_").isidentifier():
        raise ValueError(f"command must be a command name such as {COMMANDS}, got {command!r}")
    d = Path(directory)
    if d.exists() and not d.is_dir():
        raise ValueError(f"{flag} {str(d)!r} is a file; expected a directory (new or written by hdiff {command})")
    existing = d
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise ValueError(f"{flag} {str(d)!r}: {str(existing)!r} is a file, so the directory cannot be created")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {str(d)!r} is not writable ({str(existing)!r} denies write access)")
    if not d.is_dir():
        return d
    found = owner(d)
    if found is not None and found != command:
        raise ValueError(f"{flag} {str(d)!r} belongs to hdiff {found} (see {OWNER_FILE}); hdiff {command} "
                         f"will not write into it: choose another {flag}")
    if found is None and _visible(d):
        legacy = legacy_owner(d)
        if legacy != command:
            what = f"the output of hdiff {legacy}" if legacy else "files hdiff did not write"
            raise ValueError(f"{flag} {str(d)!r} is not empty and holds {what}; hdiff {command} "
                             f"will not write into it: choose another {flag}")
    return d


def claim(directory: str | os.PathLike, command: str, *, flag: str = "--out") -> Path:
    """Check ``directory`` (:func:`check_output_dir`), create it, and record ``command`` as its owner."""
    d = check_output_dir(directory, command, flag=flag)
    _mkdir(d, flag)
    if owner(d) is None:
        from hdiff.io import write_json_atomic

        write_json_atomic(d / OWNER_FILE, {"format": FORMAT, "command": command,
                                           "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    return d


class DirLock:
    """An exclusive, process-wide lock on a directory (``.hdiff.lock``); a context manager.

    Re-entrant within one process (the CLI and the library function it calls may both take it).
    Taking it fails at once, never waits: a second writer is a mistake to report, not to queue.

    Args:
        directory: the directory to lock (created if missing).
        command: the holder's command, recorded for the other process's error message.
        flag: how the directory was given, for messages.

    Raises:
        DirectoryLocked: another live process holds the lock (naming its pid, host and command).
    """

    _held: dict[str, list] = {}  # realpath -> [fd, count]
    _mutex = threading.Lock()

    def __init__(self, directory: str | os.PathLike, command: str, *, flag: str = "--out") -> None:
        self.directory, self.command, self.flag = Path(directory), command, flag
        self._key: str | None = None

    def __enter__(self) -> "DirLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock (see the class)."""
        _mkdir(self.directory, self.flag)
        key = os.path.realpath(self.directory)
        with DirLock._mutex:
            if key in DirLock._held:
                DirLock._held[key][1] += 1
            else:
                DirLock._held[key] = [self._open(), 1]
        self._key = key

    def release(self) -> None:
        """Give the lock back (the last release of a re-entered lock removes the lock file)."""
        if self._key is None:
            return
        with DirLock._mutex:
            entry = DirLock._held.get(self._key)
            self._key, key = None, self._key
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] > 0:
                return
            del DirLock._held[key]
        fd, path = entry[0], Path(key) / LOCK_FILE
        try:
            if path.exists() and os.stat(path).st_ino == os.fstat(fd).st_ino:
                path.unlink()  # unlink while still locked: a newcomer then locks a fresh file
        except OSError:
            pass
        os.close(fd)

    def _open(self) -> int:
        path = self.directory / LOCK_FILE
        for _ in range(100):
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise DirectoryLocked(self._busy_message(path)) from None
                raise
            try:  # a releasing holder unlinks the file: the one we locked must still be the one at `path`
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            info = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                    "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
            os.fsync(fd)
            return fd
        raise DirectoryLocked(f"{self.flag} {str(self.directory)!r}: could not take {LOCK_FILE} (it keeps changing)")

    def _busy_message(self, path: Path) -> str:
        try:
            info = json.loads(path.read_text())
            who = (f"hdiff {info.get('command')} (pid {info.get('pid')} on {info.get('host')}, "
                   f"since {info.get('time')})")
        except (OSError, ValueError):
            who = "another process"
        return (f"{self.flag} {str(self.directory)!r} is in use by {who}: {path} is locked; "
                f"wait for it to finish or choose another {self.flag}")


@contextmanager
def output_dir(directory: str | os.PathLike, command: str, *, flag: str = "--out") -> Iterator[Path]:
    """Check, lock and claim ``directory`` for ``command`` for the duration of the block.

    If the block fails and the directory did not exist before, it is removed again when it holds
    nothing but the owner file: a failed command leaves no stub directory behind.

    Raises:
        ValueError: the directory cannot be ``command``'s (see :func:`check_output_dir`).
        DirectoryLocked: another process is writing it.
    """
    d = check_output_dir(directory, command, flag=flag)
    created = not d.exists()
    lock = DirLock(d, command, flag=flag)
    lock.acquire()
    ok = False
    try:
        claim(d, command, flag=flag)  # re-checked under the lock: a racing command of another kind may have won
        yield d
        ok = True
    finally:
        lock.release()
        if not ok and created and d.is_dir() and not _visible(d):
            shutil.rmtree(d, ignore_errors=True)


def clear_directory(directory: str | os.PathLike) -> None:
    """Delete everything in ``directory`` but its owner and lock files (``--overwrite``)."""
    for p in Path(directory).iterdir():
        if p.name in (OWNER_FILE, LOCK_FILE):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


__all__ = ["OWNER_FILE", "LOCK_FILE", "COMMANDS", "DirectoryLocked", "DirLock", "owner", "legacy_owner",
           "check_output_dir", "claim", "output_dir", "clear_directory"]
