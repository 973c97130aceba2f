"""The one way hdiff writes files: atomically, so a reader (or a resumed run) never sees half a file.

Every writer goes through :func:`atomic_write`: the content is written to a uniquely named
temporary file in the destination's directory (``mkstemp``, so two processes never share one),
flushed to disk, and renamed onto the destination (``os.replace`` is atomic on POSIX). A crash or a
kill leaves either the old file or the new one, plus at worst a stray ``.name.*`` temporary.
Directories (a ``save_pretrained`` model) are swapped in the same way by :func:`atomic_directory`.
The readers here (:func:`read_json`, :func:`load_tensor`) are the other half: they unpickle nothing
and turn a truncated or edited file into one ``ValueError`` naming it. See docs/guarantees.md.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> None:
    """Call ``write(tmp_path)`` on a fresh temporary file beside ``path``, then rename it onto ``path``.

    Args:
        path: the destination file (its directory must exist).
        write: writes the whole content to the path it is given (e.g. ``torch.save``, ``savefig``).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:  # the rename must not land before the data does
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    write_bytes_atomic(path, text.encode())


def write_json_atomic(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> None:
    """``json.dumps(obj)`` to ``path`` atomically (``NaN`` / ``inf`` are written as JSON allows them)."""
    write_text_atomic(path, json.dumps(obj, indent=indent))


def write_csv_atomic(path: str | os.PathLike, rows: list[dict[str, Any]]) -> None:
    """Rows of scalars as CSV (columns in order of first appearance; lists and dicts left out), atomically."""
    columns = list(dict.fromkeys(k for row in rows for k, v in row.items() if not isinstance(v, (list, dict))))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, restval="", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buf.getvalue())


@contextmanager
def atomic_directory(directory: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``directory``; on success swap it in, never half a directory.

    Example:
        >>> with atomic_directory(out / "model") as tmp:
        ...     model.save_pretrained(tmp)
    """
    directory = Path(directory)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
    try:
        yield tmp
        old = None
        if directory.exists():  # rename the old one away first: a directory cannot be replaced in one step
            old = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.old."))
            os.replace(directory, old / "d")
        os.replace(tmp, directory)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def read_json(path: str | os.PathLike) -> Any:
    """The JSON value in ``path``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not valid JSON (truncated, edited), naming it.
    """
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: corrupt or truncated JSON ({e})") from None


def load_tensor(path: str | os.PathLike) -> Any:
    """A tensor saved with ``torch.save``, loaded with ``weights_only=True`` (no code runs on load).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is truncated, corrupt, a pickle of anything but tensors, or not a
            tensor, naming it.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        value = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file; all mean "not a tensor file"
        raise ValueError(f"{path}: not a readable tensor file ({type(e).__name__}: {_first_line(e)})") from None
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{path}: holds a {type(value).__name__}, expected a tensor")
    return value


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
