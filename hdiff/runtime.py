"""Process-level settings that make CPU runs fast. Opt-in: the CLI and the benchmarks call them.

BP and sampling allocate tens of MB of temporaries per call. By default glibc serves large
blocks with fresh ``mmap`` pages and hands freed heap back to the OS, so every call page-faults
its working set in again; on the 2-core CI machines that doubled BP's time (measured with
``benchmarks/bench_bp.py``). :func:`keep_freed_memory` asks glibc to keep freed memory for reuse.

On a machine that other processes keep busy, torch's default threading (one thread per core,
spinning while it waits for the others) makes small-tensor work several times slower;
:func:`configure_threads` picks the thread count and the OpenMP wait policy (docs/performance.md).
This module does not import torch at import time, so that the wait policy can be set before it is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

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


# ---------------------------------------------------------------- threads and the OpenMP wait policy
#: environment variables through which the user sets threads or the wait policy; hdiff never overrides them
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
#: ``HDIFF_THREADS``: ``auto`` (default), ``torch`` (leave torch's defaults) or a thread count
POLICY_VARIABLE = "HDIFF_THREADS"
_OFF = ("torch", "off", "none", "default")
_configured: "ThreadPolicy | None" = None


@dataclass(frozen=True)
class ThreadPolicy:
    """What :func:`configure_threads` decided, and why.

    Attributes:
        threads: torch intra-op threads now (after the decision).
        set_threads: whether hdiff chose the thread count (False: the user's or torch's is kept).
        wait_policy: ``OMP_WAIT_POLICY`` in the environment now (None: OpenMP's default).
        wait_policy_effective: whether that value reaches this process's OpenMP runtime (it is read
            once, when torch is first imported; set later it only reaches child processes).
        usable_cores: CPUs this process may run on (affinity mask, cgroup quota).
        busy_cores: CPUs kept busy by other processes, measured at the decision (None: not measured).
        reason: one line for humans.
    """

    threads: int
    set_threads: bool
    wait_policy: str | None
    wait_policy_effective: bool
    usable_cores: int
    busy_cores: float | None
    reason: str

    def describe(self) -> str:
        """One line, e.g. ``hdiff: 1 thread (2 usable cores, 0.0 busy; one per idle core, one spare);
        OMP_WAIT_POLICY=PASSIVE (children only: torch was imported before)``."""
        busy = "" if self.busy_cores is None else f", {self.busy_cores:.1f} busy"
        wait = f"OMP_WAIT_POLICY={self.wait_policy or 'unset'}"
        if self.wait_policy and not self.wait_policy_effective:
            wait += " (children only: torch was imported before)"
        return (f"hdiff: {self.threads} thread{'s' if self.threads != 1 else ''} ({self.usable_cores} usable "
                f"cores{busy}; {self.reason}); {wait}")


def usable_cores() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup CPU quota if there is one."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return max(1, cores)


def _cgroup_quota() -> float | None:
    """The cgroup CPU quota in CPUs (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``), None when unlimited or unknown."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


def _cpu_ticks(cpus: set[int] | None) -> tuple[int, int] | None:
    """(busy, total) clock ticks summed over ``cpus`` (all when None) from /proc/stat; None if unreadable.

    Busy counts user, nice, system, irq, softirq and steal time (a hypervisor's steal is a CPU we do not get)."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    busy = total = 0
    for line in lines:
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu") or name == "cpu" or (cpus is not None and int(name[3:]) not in cpus):
            continue
        f = [int(x) for x in rest.split()[:8]]
        total += sum(f)
        busy += sum(f) - f[3] - f[4]  # minus idle and iowait
    return (busy, total) if total else None


def busy_cores(window: float = 0.1) -> float | None:
    """CPUs (of this process's affinity mask) that other processes keep busy, measured over ``window`` s.

    The instantaneous load, not the 1-minute load average: that one lags by a minute, so it misses a
    job that just started and still counts one that just ended (our own previous run included).
    Linux only (/proc/stat); None elsewhere. This process's own CPU time in the window is subtracted.
    """
    try:
        cpus: set[int] | None = set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = None
    before, own_before, t0 = _cpu_ticks(cpus), _own_cpu_seconds(), time.monotonic()
    if before is None:
        return None
    time.sleep(window)
    after, own_after, t1 = _cpu_ticks(cpus), _own_cpu_seconds(), time.monotonic()
    if after is None or after[1] <= before[1]:
        return None
    n = len(cpus) if cpus is not None else (os.cpu_count() or 1)
    ticks_per_cpu = (after[1] - before[1]) / n  # elapsed ticks as the kernel counted them
    own = (own_after - own_before) * (after[1] - before[1]) / (n * max(t1 - t0, 1e-9))
    return max(0.0, (after[0] - before[0] - own) / ticks_per_cpu)


def _own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def _openmp_loaded() -> bool:
    """Whether the OpenMP runtime has read its environment already (torch imported, or libgomp/libiomp mapped)."""
    if "torch" in sys.modules:
        return True
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return False
    return "libgomp" in maps or "libiomp" in maps


def configure_threads(*, force: bool = False, verbose: bool | None = None,
                      wait_policy: str | None = "PASSIVE") -> ThreadPolicy:
    """Choose torch's intra-op threads and the OpenMP wait policy so that a busy machine slows hdiff gracefully.

    The policy, measured with ``benchmarks/bench_contention.py`` (see docs/performance.md): on a
    machine where another process keeps cores busy, torch's default (one thread per core, each
    spinning while it waits for the others) makes ``hdiff train`` several times slower, because every
    parallel region waits for a thread the scheduler has parked. So:

    - threads = usable cores minus the cores other processes keep busy right now, minus one spare
      core for a process that starts later (at least 1, at most torch's default: one per physical
      core), see :func:`threads_for`;
    - ``OMP_WAIT_POLICY=PASSIVE`` (waiting threads sleep instead of spinning), set in the environment
      when the user has not set ``OMP_WAIT_POLICY`` / ``GOMP_SPINCOUNT``. OpenMP reads it once, when
      torch is first imported: in this process it takes effect only if that has not happened yet,
      otherwise it reaches child processes (workers, ``accelerate launch``) only.

    What the user set is respected: ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` in the environment or a
    ``torch.set_num_threads`` call before this one (to a count other than torch's default, which
    cannot be told from it) keeps the thread count; ``OMP_WAIT_POLICY`` /
    ``GOMP_SPINCOUNT`` keep the wait policy; ``HDIFF_THREADS=torch`` turns the policy off and
    ``HDIFF_THREADS=N`` asks for N threads. Called once per process (by the CLI at start); later calls
    return the first decision unless ``force``.

    Args:
        force: decide again even if this process has decided already.
        verbose: print the decision on stderr; None reads ``HDIFF_SHOW_THREADS`` (``1`` shows it).
        wait_policy: the OpenMP wait policy to set when the user has set none (None: leave it).

    Returns:
        The :class:`ThreadPolicy`.

    Raises:
        ValueError: ``HDIFF_THREADS`` is neither ``auto``, ``torch`` nor a positive integer.
    """
    global _configured
    if _configured is not None and not force:
        return _configured
    if verbose is None:
        verbose = os.environ.get("HDIFF_SHOW_THREADS", "").strip() not in ("", "0")
    mode = os.environ.get(POLICY_VARIABLE, "auto").strip().lower() or "auto"
    requested: int | None = None
    if mode not in ("auto", *_OFF):
        try:
            requested = int(mode)
        except ValueError:
            requested = 0
        if requested < 1:
            raise ValueError(f"{POLICY_VARIABLE} must be 'auto', 'torch' or a positive number of threads, "
                             f"got {os.environ[POLICY_VARIABLE]!r}")
    loaded = _openmp_loaded()  # before torch is imported below
    cores = usable_cores()

    # the wait policy: before torch is imported, or it only reaches child processes
    user_wait = any(v in os.environ for v in WAIT_VARIABLES)
    if mode not in _OFF and not user_wait and wait_policy is not None:
        os.environ["OMP_WAIT_POLICY"] = wait_policy
    effective = not loaded or user_wait  # a user's variable was there when OpenMP started (if it has)

    import torch

    user_threads = [v for v in THREAD_VARIABLES if v in os.environ]
    busy: float | None = None
    if mode in _OFF:
        set_threads, reason = False, f"{POLICY_VARIABLE}={mode}: torch's default kept"
    elif user_threads:
        set_threads, reason = False, f"{user_threads[0]}={os.environ[user_threads[0]]} kept"
    elif requested is not None:
        set_threads, reason = True, f"{POLICY_VARIABLE}={requested}"
        torch.set_num_threads(requested)
    elif loaded and torch.get_num_threads() not in _torch_default_threads():
        set_threads, reason = False, "torch.set_num_threads was called before: kept"
    else:
        busy = busy_cores()
        if busy is None:  # not Linux: fall back to the 1-minute load average
            busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        threads = min(threads_for(cores, busy), min(_torch_default_threads()))  # never more than torch's default
        set_threads, reason = True, "one per idle core, one spare"
        torch.set_num_threads(threads)
    policy = ThreadPolicy(threads=torch.get_num_threads(), set_threads=set_threads,
                          wait_policy=os.environ.get("OMP_WAIT_POLICY"), wait_policy_effective=effective,
                          usable_cores=cores, busy_cores=busy, reason=reason)
    if verbose:
        print(policy.describe(), file=sys.stderr, flush=True)
    _configured = policy
    return policy


def threads_for(cores: int, busy: float) -> int:
    """One thread per core that other processes leave idle, less one spare, at least one.

    A core counts as busy from half a core of load on. The spare core is for a process that starts
    after the decision: without it, that process takes a core from one of our threads and every
    parallel region waits for the parked thread (measured: 4-15x slower, docs/performance.md); with
    it, the newcomer runs beside us. ``threads_for(2, 0.0) == 1``, ``threads_for(16, 3.2) == 12``.
    """
    return max(1, min(cores, cores - int(busy + 0.5)) - 1)


def _torch_default_threads() -> set[int]:
    """The intra-op thread counts torch may start with when nothing is set: one per CPU of the affinity
    mask (OpenMP's default) or one per physical core among them (MKL's, which torch adopts when it is
    built with MKL). A ``torch.set_num_threads`` to one of these cannot be told from the default."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return {os.cpu_count() or 1}
    cores = set()
    for cpu in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add((topo / "physical_package_id").read_text().strip() + ":" + (topo / "core_id").read_text().strip())
        except OSError:
            cores.add(str(cpu))
    return {len(cpus), max(1, len(cores))}
