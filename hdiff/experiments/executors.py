"""Where ``hdiff compare`` trains its learned cells: a local process pool, or a Ray cluster.

An *executor* takes the sweep's training jobs, ``(train_config_dict, run_dir, overwrite)`` each
(the dict is ``dataclasses.asdict`` of the cell's :class:`~hdiff.training.TrainConfig`), and runs
:func:`hdiff.experiments.compare._train_worker` for every one: it trains the cell into its run
directory (or resumes it from its last checkpoint; a finished run is left as it is). Results and
checkpoints go to the run directories under the sweep's ``--out``, so the sweep itself (sampling,
evaluation, the report) reads them from there whichever executor trained them, and the finished
sweep is the same. The first error of a job is re-raised as it was raised in the worker (a
divergence names its cell, ``compare cell tree_unet_n8: training diverged ...``).

- :class:`LocalExecutor` (the default): ``compare.workers`` one-thread processes on this machine.
- :class:`RayExecutor`: one Ray task per cell, each with its CPU/GPU request, on a local Ray or on
  a cluster (``ray.init(address=...)``) whose nodes see ``--out`` at the same path (a shared
  file system) and have hdiff installed. Needs the optional extra: ``pip install 'hdiff[ray]'``.

``hdiff compare --executor ray [--address HOST:PORT] [--cpus-per-task C] [--gpus-per-task G]``
picks Ray on the command line; from Python, ``run_compare(cfg, out, executor=RayExecutor(...))``.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any, Protocol, Sequence, runtime_checkable

from tqdm.auto import tqdm

#: one training job: the cell's training config as a dict, its run directory, and ``overwrite``
Job = tuple[dict, str, bool]

RAY_INSTALL_HINT = "pip install 'hdiff[ray]'"


@runtime_checkable
class Executor(Protocol):
    """What :meth:`hdiff.experiments.compare.Sweep.train_all` needs of an executor."""

    def takes(self, num_jobs: int) -> bool:
        """Whether to run ``num_jobs`` jobs here before the sweep evaluates its cells; if not, the
        sweep trains each cell in its own process when it reaches it (``run_cell``)."""

    def run(self, jobs: Sequence[Job], *, progress: bool = False) -> None:
        """Train every job; re-raise the first job's error."""


def _show(progress: bool | None) -> bool:
    return progress if progress is not None else os.isatty(2)


class LocalExecutor:
    """``workers`` one-thread processes on this machine (``spawn``), each ending with the sweep's process.

    With fewer than two workers or two jobs it :meth:`takes` nothing: the sweep then trains each
    cell in its own process when it reaches it, so an interrupted sweep loses the least.

    Args:
        workers: trainings at once (``compare.workers``).
    """

    def __init__(self, workers: int = 1) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers = workers

    def __repr__(self) -> str:
        return f"LocalExecutor(workers={self.workers})"

    def takes(self, num_jobs: int) -> bool:
        """A pool pays off only with two jobs and two workers; else the sweep trains in order."""
        return num_jobs >= 2 and self.workers >= 2

    def run(self, jobs: Sequence[Job], *, progress: bool | None = False) -> None:
        """Train every job in the process pool, longest first; re-raise the first job's error."""
        from hdiff.experiments.compare import _train_worker

        context = multiprocessing.get_context("spawn")  # fork after torch's thread pools start is unsafe
        with ProcessPoolExecutor(max_workers=self.workers, mp_context=context,
                                 initializer=_exit_with_parent, initargs=(os.getpid(),)) as pool:
            futures = [pool.submit(_train_worker, cfg, run_dir, overwrite) for cfg, run_dir, overwrite in jobs]
            for future in tqdm(as_completed(futures), total=len(futures), desc="train", disable=not _show(progress)):
                future.result()  # re-raises a worker's error (a divergence names its cell)


def _exit_with_parent(parent: int) -> None:
    """Pool initializer: a daemon thread ends this worker once the sweep's process is gone.

    A sweep killed by a signal (not Ctrl-C, which reaches the whole process group) would otherwise
    leave its workers training, or blocked forever waiting for work; checkpoints already on disk
    survive, and the next run resumes from them.
    """
    import threading

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _ray_train(cfg: dict, run_dir: str, overwrite: bool, threads: int) -> str:
    """The Ray task: :func:`~hdiff.experiments.compare._train_worker` in a Ray worker; returns ``run_dir``.

    The worker imports hdiff itself (it must be installed on every node, as on the driver). A task
    that asked for no GPU sees none: recent Ray (``RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO``) no longer
    hides them, and the trainer would take one it was not given.
    """
    import ray

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # as the CLI sets it: hdiff never needs a hub
    if not ray.get_gpu_ids():
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    from hdiff.experiments.compare import _train_worker

    _train_worker(cfg, run_dir, overwrite, threads=threads)
    return run_dir


class RayExecutor:
    """One Ray task per training job, each asking for ``num_cpus_per_task`` CPUs and ``num_gpus_per_task`` GPUs.

    Ray is initialised by :meth:`run` unless it already is (then that session is used as it is and
    left running): ``ray.init(address=address)`` joins a running cluster; without an address, Ray's
    own rule applies (``RAY_ADDRESS``, else a cluster ``ray start`` started on this machine, else a
    new local Ray with ``num_cpus`` CPUs, None: all of them), with no dashboard and, for a local
    Ray, no usage statistics. A Ray initialised here is shut down when the jobs are done. Every
    node must see the run directories at the same path (they are made absolute here) and have
    hdiff installed. How many cells train at once is up to Ray (the resources free in the
    cluster), not ``compare.workers``. A task whose worker dies (a lost node) is retried by Ray
    (``max_retries``) and resumes from the cell's last checkpoint; an error raised by the training
    (a divergence, a run directory of another config) is not retried: the other tasks are
    cancelled and the error is re-raised. So is Ctrl-C, after cancelling the tasks.

    Args:
        address: a Ray cluster's address (``"auto"``, ``"HOST:PORT"``, ``"ray://HOST:10001"``,
            ``"local"`` for a new local Ray), or None (Ray's rule, above).
        num_cpus_per_task: CPUs per training; also its torch threads (at least 1).
        num_gpus_per_task: GPUs per training (fractions share one); a task with GPUs trains on one.
        num_cpus: CPUs of a local Ray started here (None: Ray's default, all of them).
        max_retries: retries of a task whose worker died.

    Raises:
        ImportError: Ray is not installed (naming ``pip install 'hdiff[ray]'``).
        ValueError: a negative or zero resource request.
    """

    def __init__(self, address: str | None = None, num_cpus_per_task: float = 1, num_gpus_per_task: float = 0, *,
                 num_cpus: int | None = None, max_retries: int = 3) -> None:
        try:
            import ray  # noqa: F401
        except ImportError as e:
            if isinstance(e, ModuleNotFoundError) and e.name not in (None, "ray"):  # ray is there, a dependency is not
                raise ImportError(f"Ray is installed but does not import ({e}): reinstall it with "
                                  f"{RAY_INSTALL_HINT}") from e
            raise ImportError(f"the Ray executor needs Ray, which is not installed: {RAY_INSTALL_HINT} "
                              "(or pip install -e '.[ray]' in a checkout)") from None
        if not num_cpus_per_task > 0:
            raise ValueError(f"num_cpus_per_task must be > 0, got {num_cpus_per_task}")
        if not num_gpus_per_task >= 0:
            raise ValueError(f"num_gpus_per_task must be >= 0, got {num_gpus_per_task}")
        if num_cpus is not None and num_cpus < 1:
            raise ValueError(f"num_cpus must be >= 1, got {num_cpus}")
        self.address, self.num_cpus = address or None, num_cpus
        self.num_cpus_per_task, self.num_gpus_per_task, self.max_retries = num_cpus_per_task, num_gpus_per_task, max_retries

    def __repr__(self) -> str:
        return (f"RayExecutor(address={self.address!r}, num_cpus_per_task={self.num_cpus_per_task}, "
                f"num_gpus_per_task={self.num_gpus_per_task})")

    def takes(self, num_jobs: int) -> bool:
        """Every job goes to Ray, even one: it may belong on another node, or on a GPU."""
        return num_jobs >= 1

    def init_kwargs(self) -> dict[str, Any]:
        """The arguments of ``ray.init`` when Ray is not initialised yet (``num_cpus`` only when given:
        a cluster that is joined has its own)."""
        return {"address": self.address, "include_dashboard": False, "log_to_driver": True,
                **({"num_cpus": self.num_cpus} if self.num_cpus is not None else {})}

    def run(self, jobs: Sequence[Job], *, progress: bool | None = False) -> None:
        """One Ray task per job with its CPU/GPU request; cancel the rest and re-raise on the first error."""
        import ray

        if not jobs:
            return
        started = not ray.is_initialized()
        if started:
            if self.address is None:  # a local Ray may be started: it makes no network calls (usage statistics)
                os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            ray.init(**self.init_kwargs())
        try:
            self._run(ray, jobs, progress)
        finally:
            if started:
                ray.shutdown()

    def _run(self, ray: Any, jobs: Sequence[Job], progress: bool | None) -> None:
        threads = max(1, math.floor(self.num_cpus_per_task))
        task = ray.remote(_ray_train)
        options = {"num_cpus": self.num_cpus_per_task, "num_gpus": self.num_gpus_per_task,
                   "max_retries": self.max_retries, "retry_exceptions": False}
        pending = [task.options(**options, name=f"hdiff train {os.path.basename(os.path.normpath(run_dir))}")
                   .remote(cfg, os.path.abspath(run_dir), bool(overwrite), threads) for cfg, run_dir, overwrite in jobs]
        bar = tqdm(total=len(pending), desc="train", disable=not _show(progress))
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                try:
                    ray.get(done[0])
                except ray.exceptions.RayTaskError as e:
                    cause = getattr(e, "cause", None)
                    if isinstance(cause, BaseException):  # the training's own error, as raised in the worker
                        raise cause from e
                    raise
                bar.update(1)
        except BaseException:
            for ref in pending:  # an error or Ctrl-C: the other cells stop (their checkpoints stay)
                ray.cancel(ref, force=True)
            raise
        finally:
            bar.close()


def make_executor(name: str = "local", *, workers: int = 1, address: str | None = None,
                  num_cpus_per_task: float = 1, num_gpus_per_task: float = 0) -> LocalExecutor | RayExecutor:
    """An executor by name: ``"local"`` (``workers`` processes) or ``"ray"`` (the other arguments).

    Raises:
        ValueError: an unknown name, or Ray's options given to the local executor.
        ImportError: ``"ray"`` without Ray installed.
    """
    if name == "local":
        if address is not None:
            raise ValueError("--address is the address of a Ray cluster: it needs --executor ray")
        return LocalExecutor(workers)
    if name == "ray":
        return RayExecutor(address, num_cpus_per_task, num_gpus_per_task)
    raise ValueError(f"unknown executor {name!r}: expected 'local' or 'ray'")


__all__ = ["Job", "Executor", "LocalExecutor", "RayExecutor", "make_executor", "RAY_INSTALL_HINT"]
