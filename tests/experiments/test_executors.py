"""``hdiff compare``'s executors: the Ray one gives the local sweep's results and resumes like it.

The Ray tests share one local Ray (2 CPUs, no dashboard, a small object store) started here; they
are skipped when Ray is not installed (``make test`` installs it: ``pip install -e '.[dev,ray]'``).
"""

import json
import os
import sys

import pytest

from hdiff.cli import main
from hdiff.config import to_toml
from hdiff.experiments import compare as compare_module
from hdiff.experiments.compare import Sweep, run_compare
from hdiff.experiments.compare_config import compare_config_from_dict
from hdiff.experiments.executors import Executor, LocalExecutor, RayExecutor, make_executor
from hdiff.runs import output_dir

from .test_compare import TINY, _one, _rows


@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # "local": a new Ray of our own, never a cluster another process started on this machine
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=100 << 20,
             logging_level="WARNING", log_to_driver=False)
    yield ray
    ray.shutdown()


def _no_training_here(*args, **kwargs):
    raise AssertionError("a cell was trained in the sweep's own process, not by the executor")


@pytest.mark.slow
def test_ray_sweep_equals_the_local_one_and_resumes_like_it(tmp_path, monkeypatch, capsys, ray_session):
    cfg = compare_config_from_dict(TINY)
    # the reference: the local executor, its two cells trained at once in its process pool
    local = compare_config_from_dict({**TINY, "compare": {**TINY["compare"], "workers": 2}})
    run_compare(local, tmp_path / "local", progress=False)

    out = tmp_path / "ray"
    sweep = Sweep(cfg, out, executor=RayExecutor())
    with output_dir(out, "compare"):  # a sweep killed once the Ray task of its first cell had finished
        sweep.train_all([("tree_unet", 8), ("oracle", 8)])
    n8 = sweep.run_dir("tree_unet", 8) / "train_meta.json"
    assert json.loads(n8.read_text())["steps"] == 12 and not sweep.run_dir("tree_unet", 32).exists()
    stamp = n8.stat().st_mtime_ns

    # the next try, on the command line, trains n = 32 on Ray, reuses n = 8, and is stopped again
    # after two cells are evaluated; no cell is ever trained in the sweep's own process
    monkeypatch.setattr(compare_module, "train", _no_training_here)
    real, calls = Sweep.run_cell, []

    def stop_at_third(self, denoiser, n):
        calls.append((denoiser, n))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, denoiser, n)

    monkeypatch.setattr(Sweep, "run_cell", stop_at_third)
    path = tmp_path / "tiny.toml"
    path.write_text(to_toml(TINY))
    assert main(["compare", "--config", str(path), "--out", str(out), "--quiet", "--executor", "ray"]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "cells").iterdir()) == ["oracle_n8.json", "tree_unet_n8.json"]
    assert json.loads((sweep.run_dir("tree_unet", 32) / "train_meta.json").read_text())["steps"] == 20
    assert n8.stat().st_mtime_ns == stamp  # the finished run was reused, not trained again

    monkeypatch.setattr(Sweep, "run_cell", real)
    metrics = run_compare(cfg, out, progress=False, executor=RayExecutor())
    assert metrics["cells_skipped"] == 2
    assert _rows(out) == _rows(tmp_path / "local")  # the same sweep, modulo timings
    assert (out / "report.html").is_file()


def test_a_diverging_cell_is_named_on_ray(tmp_path, ray_session):
    from hdiff.training import TrainingDiverged

    with pytest.raises(TrainingDiverged, match=r"compare cell tree_unet_n8: training diverged"):
        run_compare(_one(lr=1e30), tmp_path / "out", progress=False, executor=RayExecutor())


def test_address_is_passed_to_ray_init(tmp_path, monkeypatch, capsys):
    ray = pytest.importorskip("ray")
    seen = []

    def fake_init(**kwargs):
        seen.append(kwargs)
        raise ConnectionError("no cluster here")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fake_init)
    path = tmp_path / "one.toml"
    path.write_text(to_toml({**TINY, "compare": {**TINY["compare"], "n_train": [8], "max_steps": [4]}}))
    argv = ["compare", "--config", str(path), "--out", str(tmp_path / "out"), "--quiet", "--executor", "ray",
            "--address", "10.1.2.3:6379", "--cpus-per-task", "2"]
    assert main(argv) == 1
    assert "no cluster here" in capsys.readouterr().err
    assert seen == [{"address": "10.1.2.3:6379", "include_dashboard": False, "log_to_driver": True}]
    assert RayExecutor(num_cpus=3).init_kwargs()["num_cpus"] == 3


def test_missing_ray_is_one_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if it were not installed
    with pytest.raises(ImportError, match=r"pip install 'hdiff\[ray\]'"):
        RayExecutor()
    path = tmp_path / "tiny.toml"
    path.write_text(to_toml(TINY))
    out = tmp_path / "out"
    assert main(["compare", "--config", str(path), "--out", str(out), "--executor", "ray"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--executor ray" in err and "pip install 'hdiff[ray]'" in err
    assert not out.exists()  # refused before any work


@pytest.mark.parametrize("argv, match", [
    (["--address", "auto"], "--address .* needs --executor ray"),
    (["--gpus-per-task", "1"], "need --executor ray"),
    (["--executor", "dask"], "invalid choice"),
])
def test_ray_options_need_the_ray_executor(tmp_path, capsys, argv, match):
    import re

    path = tmp_path / "tiny.toml"
    path.write_text(to_toml(TINY))
    assert main(["compare", "--config", str(path), "--out", str(tmp_path / "out"), *argv]) == 2
    assert re.search(match, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_executor_choice():
    assert isinstance(make_executor("local", workers=2), LocalExecutor)
    assert isinstance(LocalExecutor(2), Executor)
    # the local executor leaves a lone job, or a one-worker sweep, to run_cell, as before
    assert LocalExecutor(2).takes(2) and not LocalExecutor(2).takes(1) and not LocalExecutor(1).takes(5)
    with pytest.raises(ValueError, match="workers"):
        LocalExecutor(0)
    with pytest.raises(ValueError, match="unknown executor"):
        make_executor("dask")
    pytest.importorskip("ray")
    ray = make_executor("ray", address="auto", num_cpus_per_task=2, num_gpus_per_task=0.5)
    assert isinstance(ray, Executor) and ray.takes(1) and not ray.takes(0)
    assert (ray.address, ray.num_cpus_per_task, ray.num_gpus_per_task) == ("auto", 2, 0.5)
    with pytest.raises(ValueError, match="num_cpus_per_task"):
        RayExecutor(num_cpus_per_task=0)
