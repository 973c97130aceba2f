"""Process-level settings that make CPU runs fast. Opt-in: the CLI and the benchmarks call them.

BP and sampling allocate tens of MB of temporaries per call. By default glibc serves large
blocks with fresh ``mmap`` pages and hands freed heap back to the OS, so every call page-faults
its working set in again; on the 2-core CI machines that doubled BP's time (measured with
``benchmarks/bench_bp.py``). :func:`keep_freed_memory` asks glibc to keep freed memory for reuse.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_freed_memory(trim_threshold: int = 1 << 30, mmap_threshold: int = 32 << 20) -> bool:
    """Tell glibc to reuse freed memory instead of returning it to the OS.

    Args:
        trim_threshold: free heap kept before trimming (bytes).
        mmap_threshold: blocks at least this big get their own mmap (glibc caps it at 32 MiB).

    Returns:
        True when the settings were applied (glibc on Linux), False elsewhere (nothing changed).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1
    ok = (mallopt(_M_TRIM_THRESHOLD, trim_threshold) == 1) and ok
    return ok
