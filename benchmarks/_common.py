"""Shared by the benchmark scripts: machine facts and an atomic JSON writer."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

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


def bench(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, dict[str, float]]:
    """Median and min ms of each call: one warm-up each, then ``repeats`` rounds, calls interleaved
    within a round so that load from other processes hits every implementation alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(1e3 * (time.perf_counter() - start))
    return {name: {"median": statistics.median(t), "min": min(t)} for name, t in times.items()}


def prepare_run() -> tuple[bool, float]:
    """Keep freed memory (as the CLI does) and warn when the machine is busy: (tuned, 1-min load)."""
    from hdiff.runtime import keep_freed_memory

    tuned = keep_freed_memory()
    load = os.getloadavg()[0]
    if load > 0.5:
        print(f"warning: 1-min load average {load:.2f} before the run; timings may be inflated", flush=True)
    return tuned, load
