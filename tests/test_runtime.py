"""The runtime thread policy (:func:`hdiff.runtime.configure_threads`), as the CLI applies it.

Each case starts a fresh interpreter, because torch's thread pool and OpenMP's wait policy are
process-wide and set once: the CLI's real start-up (``hdiff.cli.main``) runs with ``hdiff demo``'s
work replaced by a report of what the process ended up with.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hdiff import runtime

REPO = Path(__file__).resolve().parents[1]
CLEARED = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "HDIFF_THREADS",
           "HDIFF_SHOW_THREADS")

#: runs ``hdiff demo`` through hdiff.cli.main with the demo replaced by a report; ``BEFORE`` runs first
REPORT = """
import json, os, sys
{before}
import torch
import hdiff.cli as cli
from hdiff import runtime

def report(args):
    p = runtime.configure_threads()  # the decision main() made (cached), not a new one
    print(json.dumps({{"threads": torch.get_num_threads(), "wait": os.environ.get("OMP_WAIT_POLICY"),
                      "set_threads": p.set_threads, "effective": p.wait_policy_effective,
                      "busy": p.busy_cores, "cores": p.usable_cores, "reason": p.reason}}))
    return 0

cli._demo = report
sys.exit(cli.main(["demo"]))
"""


def run_cli(env: dict[str, str], before: str = "") -> dict:
    """The report of a fresh ``hdiff demo`` process under ``env`` (on top of a cleared environment)."""
    full = {k: v for k, v in os.environ.items() if k not in CLEARED}
    full.update(env, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", REPORT.format(before=before)], cwd=REPO, env=full,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_cli_applies_the_policy() -> None:
    """Nothing set: threads = idle cores less a spare (at least 1), measured at start; OMP_WAIT_POLICY=PASSIVE
    exported (it reaches only child processes: importing hdiff imports torch, and OpenMP read its
    environment then)."""
    r = run_cli({})
    assert r["set_threads"] and r["reason"] == "one per idle core, one spare"
    assert 1 <= r["threads"] <= r["cores"]
    assert r["threads"] == min(runtime.threads_for(r["cores"], r["busy"]), min(runtime._torch_default_threads()))
    assert r["wait"] == "PASSIVE" and r["effective"] is False


def test_user_environment_is_respected() -> None:
    r = run_cli({"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "ACTIVE"})
    assert r == {**r, "threads": 1, "wait": "ACTIVE", "set_threads": False, "effective": True}
    assert r["reason"] == "OMP_NUM_THREADS=1 kept"
    r = run_cli({"GOMP_SPINCOUNT": "1000"})  # a wait setting of the user's: no OMP_WAIT_POLICY added
    assert r["wait"] is None and r["set_threads"]


def test_user_set_num_threads_is_respected() -> None:
    """A torch.set_num_threads before the CLI starts (an embedding program) is kept."""
    r = run_cli({}, before="import torch; torch.set_num_threads(5)")
    assert r["threads"] == 5 and not r["set_threads"]


@pytest.mark.parametrize("value, threads", [("1", 1), ("3", 3)])
def test_hdiff_threads_asks_for_a_count(value: str, threads: int) -> None:
    r = run_cli({"HDIFF_THREADS": value})
    assert r["threads"] == threads and r["set_threads"] and r["wait"] == "PASSIVE"


def test_hdiff_threads_torch_turns_the_policy_off() -> None:
    r = run_cli({"HDIFF_THREADS": "torch"})
    assert r["threads"] == runtime.usable_cores() and not r["set_threads"] and r["wait"] is None


def test_bad_hdiff_threads_is_a_usage_error() -> None:
    env = {k: v for k, v in os.environ.items() if k not in CLEARED}
    proc = subprocess.run([sys.executable, "-m", "hdiff.cli", "demo", "--out", "never-written"], cwd=REPO,
                          env={**env, "HDIFF_THREADS": "many", "HF_HUB_OFFLINE": "1"},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "HDIFF_THREADS must be 'auto', 'torch' or a positive number of threads, got 'many'" in proc.stderr
    assert not (REPO / "never-written").exists()


def test_wait_policy_takes_effect_before_torch() -> None:
    """Called before torch is imported (runtime.py loaded on its own, as a launcher would), the wait
    policy is in the environment when OpenMP starts: the policy says so."""
    code = f"""
import importlib.util, json, os, sys
spec = importlib.util.spec_from_file_location("rt", {str(REPO / "hdiff" / "runtime.py")!r})
rt = sys.modules["rt"] = importlib.util.module_from_spec(spec); spec.loader.exec_module(rt)
assert "torch" not in sys.modules
p = rt.configure_threads()
import torch
print(json.dumps({{"effective": p.wait_policy_effective, "wait": os.environ.get("OMP_WAIT_POLICY"),
                  "threads": torch.get_num_threads(), "policy_threads": p.threads}}))
"""
    env = {k: v for k, v in os.environ.items() if k not in CLEARED}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r == {"effective": True, "wait": "PASSIVE", "threads": r["policy_threads"], "policy_threads": r["threads"]}


@pytest.mark.parametrize("cores, busy, threads", [(2, 0.0, 1), (2, 1.0, 1), (2, 3.5, 1), (1, 0.0, 1), (4, 0.0, 3),
                                                  (4, 0.4, 3), (4, 0.6, 2), (16, 3.2, 12), (16, 40.0, 1)])
def test_threads_for(cores: int, busy: float, threads: int) -> None:
    assert runtime.threads_for(cores, busy) == threads


def test_measurements_are_sane() -> None:
    cores = runtime.usable_cores()
    assert 1 <= cores <= (os.cpu_count() or 1)
    busy = runtime.busy_cores(0.05)
    if sys.platform.startswith("linux"):
        assert busy is not None and 0.0 <= busy <= (os.cpu_count() or 1) + 0.5
    text = runtime.ThreadPolicy(1, True, "PASSIVE", False, 2, 1.0, "one per idle core").describe()
    assert text.startswith("hdiff: 1 thread (2 usable cores, 1.0 busy") and "children only" in text
