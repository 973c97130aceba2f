"""Shared by the benchmark scripts: machine facts and an atomic JSON writer."""

from __future__ import annotations

import json
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch


def machine_info(**extra) -> dict:
    """torch version, threads, cores, python, platform and the 1-min load average, plus ``extra``."""
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cores": os.cpu_count(),
            "python": sys.version.split()[0], "platform": platform.platform(), **extra}


def write_result(path: str | os.PathLike, result: dict) -> Path:
    """Write ``result`` (with a UTC ``date`` added) to ``path`` atomically; returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({**result, "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}, indent=2))
    os.replace(tmp, out)
    print(f"wrote {out}")
    return out
