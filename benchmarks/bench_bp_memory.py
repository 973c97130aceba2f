"""BP time and peak memory on large GHMs (up to 2^16 leaves), with and without a memory budget.

Model: a sequence RHM v=8, m=2, s=2 at depth L = 10, 12, 14, 16 (1,024 to 65,536 leaves), float32
soft evidence (a GHM sample through N(0, 1) noise, as in ``bench_bp.py``), batch 32. Each
measurement runs in a fresh subprocess, because torch's CPU allocations are invisible to
tracemalloc: the subprocess builds the model and the evidence, resets the kernel's peak-RSS mark
(``/proc/self/clear_refs``; without it, the peak so far from ``resource.getrusage``), runs
``hdiff.bp.posterior`` (one warm-up call, then ``--repeats`` timed calls) and reads the peak
resident set size. ``bp_peak_mib`` is the growth of the
peak, i.e. what BP needed on top of the model, the evidence and the interpreter, including the
returned marginals (``result_mib``, which the budget does not count); ``working_mib`` is the
difference, BP's own working memory. With ``keep_freed_memory()`` (as the CLI runs) glibc keeps
freed blocks for reuse, so that peak is the heap's extent, which fragmentation can push above what
is alive at any moment; a second run per setting (``live_working_mib``, not timed) maps every block
of 64 KiB or more on its own and unmaps it when freed, so its peak RSS is the peak of live memory.
``estimate_mib`` is ``hdiff.bp.row_bytes`` times the rows of one chunk, the estimate BP uses to
choose chunks before allocating anything; the live working memory stays below it.

Each depth runs with the default budget (``hdiff.bp.DEFAULT_MAX_BYTES``, 1 GiB: no chunking at
these sizes) and with ``max_bytes`` a quarter of the unchunked estimate, which splits the batch into
4 chunks; both give the same results (bit-identical for these production kernels; checked here
on the log-evidence).

Writes ``benchmarks/results/bp_memory.json``. Run: ``.venv/bin/python benchmarks/bench_bp_memory.py
[--repeats 3] [--depths 10 12 14 16] [--batch 32] [--threads N]`` (about a minute on a 2-core machine;
on a machine shared with other processes ``--threads 1`` keeps the timings meaningful, since a
multi-threaded op waits for its slowest, possibly descheduled, thread).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine_info, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, resource, statistics, sys, time
import torch
from hdiff.bp import posterior, row_bytes
from hdiff.bp.propagation import _rows_per_chunk
from hdiff.ghm import GHM
from hdiff.runtime import keep_freed_memory

cfg = json.loads(sys.argv[1])
if cfg["threads"]:
    torch.set_num_threads(cfg["threads"])
if cfg["keep_freed"]:
    keep_freed_memory()
ghm = GHM.random_hierarchy(8, 2, 2, cfg["depth"], seed=0)
g = torch.Generator().manual_seed(1)
x = ghm.sample(cfg["batch"], generator=g)
ll = torch.nn.functional.one_hot(x, ghm.vocab_size).float() + torch.randn((*x.shape, ghm.vocab_size), generator=g)
del x
def status_kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None

try:  # reset the peak (VmHWM) to the current RSS, so the sampling and one-hot temporaries above do not count
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    reset = True
except OSError:
    reset = False
kib = (lambda: status_kib("VmHWM")) if reset else (lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
before = status_kib("VmRSS") if reset else kib()
per_row = row_bytes(ghm, ll.dtype)
budget = cfg["max_bytes"]
rows = min(cfg["batch"], _rows_per_chunk(per_row, budget))
with torch.inference_mode():
    start = time.perf_counter()
    res = posterior(ghm, ll, max_bytes=budget)
    first = time.perf_counter() - start
    times = []
    for _ in range(cfg["repeats"]):
        start = time.perf_counter()
        res = posterior(ghm, ll, max_bytes=budget)
        times.append(time.perf_counter() - start)
after = kib()
print(json.dumps({
    "depth": cfg["depth"], "leaves": ghm.num_leaves, "batch": cfg["batch"], "max_bytes": budget,
    "rows_per_chunk": rows, "chunks": -(-cfg["batch"] // rows),
    "evidence_mib": ll.numel() * ll.element_size() / 2**20,
    "estimate_mib": per_row * rows / 2**20, "estimate_unchunked_mib": per_row * cfg["batch"] / 2**20,
    "rss_before_mib": before / 1024, "rss_peak_mib": after / 1024, "bp_peak_mib": (after - before) / 1024,
    "result_mib": sum(t.numel() * t.element_size() for t in (res.leaf_marginals, res.log_evidence, res.root_marginals))
                  / 2**20,
    "first_call_ms": 1e3 * first, "ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times),
    "us_per_batch_leaf": 1e6 * statistics.median(times) / (cfg["batch"] * ghm.num_leaves),
    "log_evidence_head": res.log_evidence[:4].tolist(), "threads": torch.get_num_threads(),
    "peak_source": "VmHWM after /proc/self/clear_refs reset" if reset else "ru_maxrss",
}))
"""


def measure(depth: int, batch: int, repeats: int, max_bytes: float | None, threads: int | None,
            keep_freed: bool = True, live: bool = False) -> dict:
    """One subprocess run. ``live``: glibc maps every block of 64 KiB or more on its own and unmaps it when
    freed (no ``keep_freed_memory``), so the peak RSS is the peak of live memory, not of the heap."""
    from hdiff.bp.propagation import DEFAULT_MAX_BYTES

    cfg = {"depth": depth, "batch": batch, "repeats": repeats, "threads": threads, "keep_freed": keep_freed and not live,
           "max_bytes": DEFAULT_MAX_BYTES if max_bytes is None else max_bytes}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if live:
        env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg)], check=True, capture_output=True, text=True,
                         cwd=ROOT, env=env, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[10, 12, 14, 16])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-keep-freed", action="store_true",
                        help="leave glibc's defaults (the CLI and the benchmarks call hdiff.runtime.keep_freed_memory)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads in the measuring subprocesses (default: torch's own choice)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "bp_memory.json"))
    args = parser.parse_args()
    import torch

    from hdiff.bp import row_bytes
    from hdiff.ghm import GHM

    load_before = os.getloadavg()[0]
    rows = []
    print(f"{'L':>3} {'leaves':>7} {'batch':>5} {'chunks':>6} {'ms':>9} {'us/leaf':>8} {'BP peak MiB':>12} "
          f"{'result MiB':>11} {'working MiB':>12} {'live MiB':>12} {'estimate MiB':>13} {'evidence MiB':>13}",
          flush=True)
    for depth in args.depths:
        per_row = row_bytes(GHM.random_hierarchy(8, 2, 2, depth, seed=0), torch.float32)
        for budget in (None, per_row * args.batch / 4):
            r = measure(depth, args.batch, args.repeats, budget, args.threads, not args.no_keep_freed)
            live = measure(depth, args.batch, 1, budget, args.threads, live=True)
            r["budget"] = "default" if budget is None else "quarter of the estimate"
            r["working_mib"] = r["bp_peak_mib"] - r["result_mib"]
            r["live_working_mib"] = live["bp_peak_mib"] - live["result_mib"]
            rows.append(r)
            print(f"{depth:3} {r['leaves']:7} {r['batch']:5} {r['chunks']:6} {r['ms']:9.1f} {r['us_per_batch_leaf']:8.3f} "
                  f"{r['bp_peak_mib']:12.1f} {r['result_mib']:11.1f} {r['working_mib']:12.1f} "
                  f"{r['live_working_mib']:12.1f} {r['estimate_mib']:13.1f} {r['evidence_mib']:13.1f}", flush=True)
        whole, parts = rows[-2], rows[-1]
        if whole["log_evidence_head"] != parts["log_evidence_head"]:
            raise RuntimeError(f"L={depth}: chunked log-evidence differs from unchunked")
    result = {
        "benchmark": "hdiff.bp.posterior on a sequence RHM v=8 m=2 s=2, float32 soft evidence: ms per call and "
                     "peak memory (ru_maxrss growth in a fresh subprocess), unchunked and with a quarter budget",
        "repeats": args.repeats, "statistic": "median (and min) of the timed calls after one warm-up", "rows": rows,
        "threads": rows[0]["threads"] if rows else None, "keep_freed_memory": not args.no_keep_freed,
        "machine": machine_info(loadavg_1min_before_after=[load_before, os.getloadavg()[0]],
                                loadavg_1_5_15_after=list(os.getloadavg())),
    }
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
