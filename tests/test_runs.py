"""Output directories (hdiff.runs): one owning command, one writer at a time, stale locks taken over."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hdiff.runs import (LOCK_FILE, OWNER_FILE, DirectoryLocked, DirLock, check_output_dir, claim, legacy_owner,
                        output_dir, owner)

REPO = Path(__file__).resolve().parents[1]


def test_a_directory_belongs_to_the_command_that_claimed_it(tmp_path: Path) -> None:
    run = claim(tmp_path / "run", "train")
    assert owner(run) == "train" and json.loads((run / OWNER_FILE).read_text())["command"] == "train"
    (run / "config.toml").write_text("x = 1\n")
    check_output_dir(run, "train")  # its own command may come back (resume, rerun)
    for other in ("compare", "sample", "classify", "probe", "demo"):
        with pytest.raises(ValueError, match=r"--out .*belongs to hdiff train.*choose another --out"):
            check_output_dir(run, other)
    assert (run / "config.toml").read_text() == "x = 1\n"  # nothing was touched


def test_directories_without_an_owner_file(tmp_path: Path) -> None:
    legacy = tmp_path / "legacy_run"  # written by an hdiff older than owner files
    (legacy / "model").mkdir(parents=True)
    (legacy / "config.toml").write_text("")
    (legacy / "train_meta.json").write_text("{}")
    assert legacy_owner(legacy) == "train"
    check_output_dir(legacy, "train")
    with pytest.raises(ValueError, match="holds the output of hdiff train"):
        check_output_dir(legacy, "compare")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("")
    with pytest.raises(ValueError, match="files hdiff did not write"):
        check_output_dir(foreign, "sample")
    (tmp_path / "empty").mkdir()
    check_output_dir(tmp_path / "empty", "probe")


def test_out_that_is_a_file_or_not_writable(tmp_path: Path) -> None:
    f = tmp_path / "f.txt"
    f.write_text("")
    with pytest.raises(ValueError, match=r"--out .*f\.txt' is a file"):
        check_output_dir(f, "train")
    with pytest.raises(ValueError, match="is a file, so the directory cannot be created"):
        check_output_dir(f / "sub", "train")
    with pytest.raises(ValueError, match="not writable"):  # /proc/self refuses writes even to root
        check_output_dir("/proc/self/hdiff-out", "train")


def test_a_corrupt_owner_file_is_named(tmp_path: Path) -> None:
    (tmp_path / OWNER_FILE).write_text('{"command": ')
    with pytest.raises(ValueError, match=r"\.hdiff-owner\.json: corrupt owner file"):
        check_output_dir(tmp_path, "train")


def test_a_failed_command_leaves_no_stub_directory(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with output_dir(tmp_path / "new", "sample"):
            raise RuntimeError("boom")
    assert not (tmp_path / "new").exists()
    with output_dir(tmp_path / "kept", "sample") as d:
        (d / "tokens.pt").write_bytes(b"")
        with DirLock(d, "sample"):  # re-entrant within one process
            pass
        assert (d / LOCK_FILE).exists()
    assert owner(d) == "sample" and not (d / LOCK_FILE).exists()


def test_lock_is_exclusive_between_processes_and_a_dead_holder_is_taken_over(tmp_path: Path) -> None:
    holder = ("import sys, time; from hdiff.runs import DirLock\n"
              "with DirLock(sys.argv[1], 'compare'):\n"
              "    print('locked', flush=True); time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", holder, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                            cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert proc.stdout.readline().strip() == "locked"
        info = json.loads((tmp_path / LOCK_FILE).read_text())
        assert info["pid"] == proc.pid and info["command"] == "compare" and info["host"]
        start = time.monotonic()
        with pytest.raises(DirectoryLocked, match=rf"in use by hdiff compare \(pid {proc.pid} on "):
            DirLock(tmp_path, "compare").acquire()
        assert time.monotonic() - start < 1.0  # refused at once, never waits
        os.kill(proc.pid, signal.SIGKILL)  # dies holding the lock: the lock file stays behind
        proc.wait(timeout=30)
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == proc.pid
        with DirLock(tmp_path, "train"):  # the dead holder's lock is taken over
            assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    finally:
        proc.kill()
        proc.wait(timeout=30)
