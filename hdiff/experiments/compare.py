"""``hdiff compare``: the BP oracle and learned denoisers as the training set grows.

For every training-set size ``n`` of the config and every learned model, train it on the first
``n`` samples (:func:`hdiff.training.train`), then let every denoiser (the learned ones and the
exact oracle) sample through the *same* schedulers with the *same* random draws, and measure:

- sample quality (:func:`~hdiff.metrics.sample_quality`): validity and per-level
  validity, exact NLL of the samples, memorisation of the size-``n`` training set, novelty,
  diversity, root-class TV, leaf-marginal KL;
- the likelihood bound of the noise process (:func:`~hdiff.metrics.likelihood.nelbo`) on
  held-out data, beside the exact NLL of the same data (BP) and the exact entropy;
- ``KL(oracle || learned)`` of the leaf posteriors per noise level (learned models).

Each (n, denoiser) is a *cell* whose result is written atomically to ``OUT/cells/<name>.json``
with a fingerprint of everything it depends on; a rerun skips finished cells whose fingerprint
matches, and training resumes from its last checkpoint, so an interrupted sweep loses at most
the part of the cell in progress since its last checkpoint. A learned cell trains in
``OUT/runs/<model>_n<n>-<hash>``, the hash covering its whole training config and the GHM's
content: a changed cell (another ``max_steps``, ``lr``, ...) trains from scratch in a directory of
its own, and the runs of earlier configs are left as they are (docs/guarantees.md). ``OUT`` is
owned by ``compare`` and locked while the sweep runs (:mod:`hdiff.runs`). Then ``metrics.json``,
``metrics.csv``, the plots and ``report.html`` / ``report.md`` are written (:mod:`.report`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from hdiff.denoisers import BPDenoiser
from hdiff.experiments.compare_config import CompareConfig, SamplerSpec
from hdiff.experiments.executors import Executor, LocalExecutor, _show
from hdiff.metrics.likelihood import nelbo
from hdiff.metrics import posterior_kl, sample_quality
from hdiff.metrics.message_probes import message_probes, summarise_probes
from hdiff.ghm import GHM
from hdiff.sampling import sample
from hdiff.schedulers.factory import make_scheduler, scheduler_options
from hdiff.training import TrainConfig, TrainingDiverged, load_train_config, load_trained, train
from hdiff.training.config import train_config_from_dict
from hdiff.io import atomic_write, load_tensor, read_json, write_csv_atomic, write_json_atomic, write_text_atomic
from hdiff.runs import check_output_dir, clear_directory, output_dir
from hdiff.training.data import GHMDataset, stream_seed
from hdiff.tokens import row_keys
from hdiff.noise import get_process
from hdiff.training.trainer import config_differences

ORACLE = "oracle"
REFERENCE = "bp_unet_ghm"  # the BP U-Net built from the GHM (compare.reference_bp_unet): untrained, like the oracle
# sub-streams of compare.seed
_SAMPLE_STREAM, _NELBO_STREAM, _KL_STREAM, _SNAPSHOT_STREAM, _PROBE_STREAM = 100, 200, 300, 400, 500


def cell_name(denoiser: str, n: int) -> str:
    """The file stem of a cell, e.g. ``tree_unet_n512``."""
    return f"{denoiser}_n{n}"


def _fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_name(denoiser: str, n: int, cfg: TrainConfig, ghm_sha256: str) -> str:
    """The run directory name of a learned cell, e.g. ``tree_unet_n512-3f9a1c2e``.

    The suffix hashes the cell's whole training config (``max_steps`` and ``lr`` included: the
    learning-rate schedule depends on both) and the GHM's content, so two configs never share,
    resume or overwrite one run directory.
    """
    digest = _fingerprint({"train": dataclasses.asdict(cfg), "ghm_sha256": ghm_sha256})[:8]
    return f"{cell_name(denoiser, n)}-{digest}"


def _steps(spec: SamplerSpec, ghm: GHM) -> int:
    return spec.steps or ghm.num_leaves


def draw_samples(denoiser: Any, spec: SamplerSpec, ghm: GHM, num: int, seed: int, schedule: str) -> torch.Tensor:
    """``num`` samples ``(num, *leaf_shape)`` of ``denoiser`` through the sampler ``spec``, seeded by ``seed``."""
    # the training schedule everywhere, except diffusers' DiscreteDDIMScheduler, which has its own fixed one
    kwargs = {"schedule": schedule} if spec.scheduler != "discrete-ddim" else {}
    scheduler = make_scheduler(spec.scheduler, prediction_type=spec.prediction_type, unmasking=spec.unmasking, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    return sample(denoiser, scheduler, batch_size=num, num_inference_steps=_steps(spec, ghm), generator=gen,
                  leaf_shape=ghm.leaf_shape, **scheduler_options(spec.scheduler))


class Sweep:
    """The state of one ``hdiff compare`` run (see the module docstring); :meth:`run` does it all.

    Args:
        cfg: the config.
        out: the output directory.
        progress: show progress bars (None: on a terminal only).
        executor: where the learned cells train (:mod:`.executors`); None: a
            :class:`~hdiff.experiments.executors.LocalExecutor` of ``compare.workers`` processes.
    """

    def __init__(self, cfg: CompareConfig, out: str | os.PathLike, *, progress: bool | None = None,
                 overwrite: bool = False, executor: Executor | None = None) -> None:
        self.cfg, self.out = cfg, check_output_dir(out, "compare")  # refused before any work or write
        self.show, self.overwrite = progress, overwrite
        self.executor = executor if executor is not None else LocalExecutor(cfg.compare.workers)
        self.ghm = cfg.train.ghm.build()
        self.ghm_sha256 = self.ghm.sha256()
        self.process = get_process(cfg.train.noise.process, self.ghm.vocab_size)
        self.oracle = BPDenoiser(self.ghm, self.process)
        c, d = cfg.compare, cfg.train.data
        # nested training sets (the set of n is a prefix of the largest); held-out data excludes all of them
        self.train_set, heldout = GHMDataset.split(self.ghm, max(c.n_train), d.n_heldout, seed=d.data_seed)
        self.heldout = heldout.tokens
        self.nelbo_data = self.heldout[:c.nelbo_samples]
        self._oracle_cache: dict[str, Any] = {}
        self.reference = None
        if c.reference_bp_unet:
            from hdiff.models import BPUNet

            self.reference = BPUNet.from_ghm(self.ghm, self.process).eval().requires_grad_(False)

    # ------------------------------------------------------------------ cells
    def cells(self) -> list[tuple[str, int]]:
        """``(denoiser, n)`` in sweep order: per size, the learned models, the reference, the oracle;
        then the diagnostic cells ``("<model>+fresh", n)`` (and ``+fresh_rb``) of the gap decomposition."""
        fixed = [*self.cfg.models, *([REFERENCE] if self.reference is not None else []), ORACLE]
        model = self.cfg.train.model.kind
        diagnostic = [f"{model}+{data}" for data in self.cfg.diagnostic_runs()]
        return [(name, n) for n in sorted(self.cfg.compare.n_train) for name in [*fixed, *diagnostic]]

    def train_config(self, denoiser: str, n: int) -> TrainConfig:
        """The training config of a learned cell (a diagnostic cell: the one run on fresh data)."""
        base, _, data = denoiser.partition("+")
        return self.cfg.fresh_config(data) if data else self.cfg.train_config(n, base)

    def run_dir(self, denoiser: str, n: int) -> Path:
        """Where a learned cell trains: ``OUT/runs/<model>_n<n>-<hash>`` (:func:`run_name`); every
        diagnostic cell of a kind shares one run, ``OUT/runs/<model>+<data>_n<n_max>-<hash>``."""
        if "+" in denoiser:
            n = max(self.cfg.compare.n_train)
        return self.out / "runs" / run_name(denoiser, n, self.train_config(denoiser, n), self.ghm_sha256)

    def fingerprint(self, denoiser: str, n: int) -> str:
        """What a cell's result depends on: the GHM (config and content), the noise, the data seeds,
        its whole training config (learned), and the sweep's evaluation settings."""
        c = self.cfg.compare
        evaluation = {k: v for k, v in dataclasses.asdict(c).items()
                      if k not in ("n_train", "max_steps", "baseline", "baseline_model", "workers")}
        trained = None if denoiser in (ORACLE, REFERENCE) else dataclasses.asdict(self.train_config(denoiser, n))
        return _fingerprint({"ghm": dataclasses.asdict(self.cfg.train.ghm), "ghm_sha256": self.ghm_sha256,
                             "noise": dataclasses.asdict(self.cfg.train.noise),
                             # the held-out set excludes the largest training set, so it depends on max(n_train)
                             "data": [self.cfg.train.data.data_seed, self.cfg.train.data.n_heldout, max(c.n_train)],
                             "n": n, "denoiser": denoiser, "trained": trained, "evaluation": evaluation})

    def load_cell(self, denoiser: str, n: int) -> dict | None:
        """A finished cell's row if its fingerprint matches and its sample files are intact, else None.

        A damaged cell (its JSON or one of its sample panels truncated or edited) is recomputed,
        with a ``RuntimeWarning`` naming the file: cells hold results, never trained weights.
        """
        name = cell_name(denoiser, n)
        path = self.out / "cells" / f"{name}.json"
        if not path.is_file():
            return None
        try:
            row = read_json(path)
            if not isinstance(row, dict):
                raise ValueError(f"{path}: holds a {type(row).__name__}, expected a JSON object")
            if row.get("fingerprint") != self.fingerprint(denoiser, n):
                return None
            for spec in self.cfg.compare.samplers if "+" not in denoiser else []:  # diagnostic cells keep no samples
                load_tensor(self.out / "samples" / f"{name}.{spec.name}.pt")
        except (OSError, ValueError) as e:
            warnings.warn(f"compare cell {name} is recomputed: {e}", RuntimeWarning, stacklevel=2)
            return None
        return row

    def run_cell(self, denoiser: str, n: int) -> dict:
        """Train (learned), sample, evaluate one cell and write ``cells/<name>.json``; return its row."""
        c, start = self.cfg.compare, time.monotonic()
        if "+" in denoiser:
            return self._finish_cell(denoiser, n, self.run_diagnostic_cell(denoiser, n), start)
        row: dict[str, Any] = {"n": n, "denoiser": denoiser}
        train_keys = set(row_keys(self.train_set.tokens[:n]))
        learned = denoiser not in (ORACLE, REFERENCE)
        if denoiser == ORACLE:
            model = self.oracle
        elif denoiser == REFERENCE:
            model = self.reference
            row["params"] = sum(p.numel() for p in model.parameters())
        else:
            run_dir = self.run_dir(denoiser, n)
            meta = train_cell(self.train_config(denoiser, n), run_dir, progress=self.show, overwrite=self.overwrite)
            model = self._load_run(run_dir, denoiser, n)
            row.update(params=sum(p.numel() for p in model.parameters()), steps=meta["steps"],
                       train_time_s=meta["time_s"], heldout_loss=meta["final_heldout_loss"])
            start = time.monotonic()  # evaluation time from here (training may have run in a worker)
        for k, spec in enumerate(c.samplers):
            tokens = self._samples(model, denoiser, spec, k)
            self._save_samples(denoiser, n, spec.name, tokens)
            quality = sample_quality(self.ghm, tokens, train_keys)
            for key, value in quality.items():
                if key == "level_validity":
                    row.update({f"{spec.name}.level_validity_{l + 1}": v for l, v in enumerate(value)})
                elif key != "num_samples":
                    row[f"{spec.name}.{key}"] = value
        row.update(self._bound(model, denoiser))
        if denoiser != ORACLE:
            row.update(self._kl(model, c.kl_samples))
        if learned and c.snapshots:
            first = c.samplers[0].name
            final = {"step": row["steps"], "validity": row[f"{first}.validity"], "kl_mean": row["kl_mean"],
                     "level_validity": [row[f"{first}.level_validity_{l}"] for l in range(1, self.ghm.depth + 1)]}
            row["time_axis"] = [*self._time_axis(denoiser, n), final]
        if learned and c.probes and hasattr(model, "tree_features"):
            gen = torch.Generator().manual_seed(stream_seed(c.seed, _PROBE_STREAM))
            probe_rows = message_probes(model, self.ghm, self.heldout[:c.probe_samples], num_bins=c.probe_bins,
                                        generator=gen)
            row["probes"] = {**summarise_probes(probe_rows), "rows": probe_rows}
        return self._finish_cell(denoiser, n, row, start)

    def _finish_cell(self, denoiser: str, n: int, row: dict, start: float) -> dict:
        row["eval_time_s"] = time.monotonic() - start
        row["fingerprint"] = self.fingerprint(denoiser, n)
        (self.out / "cells").mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.out / "cells" / f"{cell_name(denoiser, n)}.json", row)
        return row

    def _load_run(self, run_dir: Path, denoiser: str, n: int, snapshot: int | None = None) -> Any:
        model, run_ghm, _ = load_trained(run_dir, snapshot=snapshot)
        if run_ghm.sha256() != self.ghm_sha256:
            raise ValueError(f"{run_dir / 'ghm'}: compare cell {cell_name(denoiser, n)} was trained on another "
                             "GHM than the sweep's [ghm]")
        return model.requires_grad_(False)

    def _kl(self, model: Any, num: int) -> dict[str, Any]:
        c = self.cfg.compare
        gen = torch.Generator().manual_seed(stream_seed(c.seed, _KL_STREAM))
        kl = posterior_kl(self.oracle, model, self.heldout[:num], num_bins=c.kl_bins, generator=gen)
        return {"kl_per_bin": kl.compute().tolist(), "kl_mean": float(kl.kl_sum.sum() / kl.count.sum())}

    def _quick_quality(self, model: Any, n: int | None) -> dict[str, Any]:
        """Validity and per-level validity of ``compare.snapshot_samples`` samples of the first sampler."""
        c = self.cfg.compare
        seed = stream_seed(c.seed, _SNAPSHOT_STREAM)
        tokens = draw_samples(model, c.samplers[0], self.ghm, c.snapshot_samples, seed, self.cfg.train.schedule)
        keys = set(row_keys(self.train_set.tokens[:n])) if n is not None else None
        q = sample_quality(self.ghm, tokens, keys)
        return {"validity": q["validity"], "level_validity": q["level_validity"], "memorisation": q["memorisation"]}

    def _time_axis(self, denoiser: str, n: int) -> list[dict[str, Any]]:
        """The EMA snapshots of a learned cell, evaluated cheaply (the training-time axis)."""
        run_dir, points = self.run_dir(denoiser, n), []
        for step in self.train_config(denoiser, n).run.snapshot_steps:
            model = self._load_run(run_dir, denoiser, n, snapshot=step)
            kl = self._kl(model, min(self.cfg.compare.kl_samples, self.cfg.compare.snapshot_samples))
            points.append({"step": step, **self._quick_quality(model, n), "kl_mean": kl["kl_mean"]})
        return points

    def run_diagnostic_cell(self, denoiser: str, n: int) -> dict[str, Any]:
        """A cell of the gap decomposition: the fresh-data run of ``[model]`` at ``n``'s budget."""
        base, _, data = denoiser.partition("+")
        cfg, steps = self.train_config(denoiser, n), self.cfg.steps_for(n)
        run_dir = self.run_dir(denoiser, n)
        train_cell(cfg, run_dir, progress=self.show, overwrite=self.overwrite)
        model = self._load_run(run_dir, denoiser, n, snapshot=None if steps == cfg.optim.max_steps else steps)
        q = self._quick_quality(model, None)
        return {"n": n, "denoiser": base, "data": data, "steps": steps, **self._kl(model, self.cfg.compare.kl_samples),
                "validity": q["validity"], "level_validity": q["level_validity"]}

    def _samples(self, model: Any, denoiser: str, spec: SamplerSpec, k: int) -> torch.Tensor:
        seed = stream_seed(self.cfg.compare.seed, _SAMPLE_STREAM + k)  # same draws for every denoiser
        if denoiser == ORACLE:  # the oracle's samples do not depend on n: draw them once per run
            key = f"samples/{spec.name}"
            if key not in self._oracle_cache:
                self._oracle_cache[key] = draw_samples(model, spec, self.ghm, self.cfg.compare.num_samples, seed,
                                                       self.cfg.train.schedule)
            return self._oracle_cache[key]
        return draw_samples(model, spec, self.ghm, self.cfg.compare.num_samples, seed, self.cfg.train.schedule)

    def _bound(self, model: Any, denoiser: str) -> dict[str, float]:
        if denoiser == ORACLE and "bound" in self._oracle_cache:
            return self._oracle_cache["bound"]
        c = self.cfg.compare
        gen = torch.Generator().manual_seed(stream_seed(c.seed, _NELBO_STREAM))
        mean, se = nelbo(model, self.nelbo_data, num_draws=c.nelbo_draws, schedule=self.cfg.train.schedule,
                           generator=gen).bits_per_leaf(self.ghm.num_leaves)
        out = {"nelbo_bits_per_leaf": mean, "nelbo_se": se}
        if denoiser == ORACLE:
            self._oracle_cache["bound"] = out
        return out

    def _save_samples(self, denoiser: str, n: int, sampler: str, tokens: torch.Tensor) -> None:
        path = self.out / "samples" / f"{cell_name(denoiser, n)}.{sampler}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        panel = tokens[:self.cfg.compare.panel_size].clone()
        atomic_write(path, lambda tmp: torch.save(panel, tmp))

    # ------------------------------------------------------------------ the sweep
    def summary(self) -> dict[str, Any]:
        """Exact reference values: the entropy and the exact NLL of the bound's held-out data."""
        entropy = self.ghm.entropy()
        exact = -self.ghm.log_prob(self.nelbo_data) / (self.ghm.num_leaves * math.log(2))
        return {"ghm": repr(self.ghm), "entropy_bits_per_leaf": entropy.bits_per_leaf, "entropy_exact": entropy.exact,
                "entropy_se_bits_per_leaf": entropy.stderr / (self.ghm.num_leaves * math.log(2)),
                "heldout_nll_bits_per_leaf": float(exact.mean()),
                "heldout_nll_se": float(exact.std() / math.sqrt(len(exact))),
                "num_leaves": self.ghm.num_leaves, "depth": self.ghm.depth, "vocab_size": self.ghm.vocab_size,
                "layout": self.ghm.layout, "process": self.process.name,
                "samplers": [{"name": s.name, "scheduler": s.scheduler, "steps": _steps(s, self.ghm),
                              "unmasking": s.unmasking} for s in self.cfg.compare.samplers]}

    def train_all(self, cells: list[tuple[str, int]]) -> None:
        """Train the unfinished learned models of ``cells`` with the sweep's executor, longest first.

        The local executor (the default) runs ``compare.workers`` one-thread processes, and nothing
        with fewer than two workers or two jobs (``run_cell`` then trains each cell in order); the
        Ray executor runs one task per cell (:mod:`.executors`). Each job takes its own run
        directory's lock (``train`` owns those), under the sweep's lock.
        """
        unique = {self.run_dir(d, n): self.train_config(d, n) for d, n in cells if d not in (ORACLE, REFERENCE)}
        jobs = sorted(((tcfg, run_dir) for run_dir, tcfg in unique.items()),
                      key=lambda job: -job[0].optim.max_steps * job[0].optim.batch_size)
        jobs = [(tcfg, run_dir) for tcfg, run_dir in jobs if not _finished(tcfg, run_dir)]
        if not self.executor.takes(len(jobs)):
            return  # trained in order by run_cell
        self.executor.run([(dataclasses.asdict(tcfg), str(run_dir), self.overwrite) for tcfg, run_dir in jobs],
                          progress=self.show)

    def run(self) -> dict[str, Any]:
        """Every cell (skipping finished ones), then the metrics files and the report, under ``OUT``'s lock."""
        with output_dir(self.out, "compare"):
            return self._run()

    def _run(self) -> dict[str, Any]:
        start = time.monotonic()  # the whole sweep: training and evaluation
        write_text_atomic(self.out / "config.toml", self.cfg.to_toml())
        self.train_all([cell for cell in self.cells() if self.load_cell(*cell) is None])
        trained = time.monotonic()
        rows, skipped = [], 0
        bar = tqdm(self.cells(), desc="compare", dynamic_ncols=True,
                   disable=not _show(self.show))
        diagnostic_rows = []
        for denoiser, n in bar:
            bar.set_postfix_str(cell_name(denoiser, n))
            row = self.load_cell(denoiser, n)
            skipped += row is not None
            (diagnostic_rows if "+" in denoiser else rows).append(row if row is not None else self.run_cell(denoiser, n))
        bar.close()
        metrics = {**self.summary(), "rows": rows, "diagnostic_rows": diagnostic_rows, "cells_skipped": skipped,
                   "time_s": time.monotonic() - start, "training_time_s": trained - start}
        write_metrics(self.out, metrics)
        from hdiff.experiments.report import write_report

        write_report(self.out, metrics)
        return metrics


def _finished(cfg: TrainConfig, run_dir: Path) -> dict | None:
    """The ``train_meta.json`` of a finished run of exactly ``cfg`` in ``run_dir``, else None.

    Exactly: every field of the config (``max_steps`` included) and the step count match. A damaged
    ``train_meta.json`` counts as unfinished: resuming the run at its last step writes it again.
    """
    meta_path = run_dir / "train_meta.json"
    if not (meta_path.is_file() and (run_dir / "config.toml").is_file() and (run_dir / "model").is_dir()):
        return None
    if config_differences(load_train_config(run_dir / "config.toml"), cfg):
        return None
    try:
        meta = read_json(meta_path)
    except ValueError as e:
        warnings.warn(f"{e}: the run is resumed to write it again", RuntimeWarning, stacklevel=2)
        return None
    return meta if isinstance(meta, dict) and meta.get("steps") == cfg.optim.max_steps else None


def train_cell(cfg: TrainConfig, run_dir: Path, *, progress: bool | None = None, overwrite: bool = False) -> dict:
    """Train one cell's model into ``run_dir`` unless it is there already; return its ``train_meta.json``.

    A half-finished run of exactly ``cfg`` resumes from its last intact checkpoint (its learning-rate
    schedule is the one a fresh run of ``cfg`` has, since ``max_steps`` is part of the match). Anything
    else in ``run_dir`` is never deleted silently: with ``overwrite`` it is, and the cell trains from
    scratch; without, that is an error naming ``--overwrite``.

    Raises:
        ValueError: ``run_dir`` holds a run of another config and ``overwrite`` is False.
        TrainingDiverged: the cell's training diverged (naming the cell).
    """
    meta = _finished(cfg, run_dir)
    if meta is not None:
        return meta
    if (run_dir / "config.toml").is_file():
        changed = config_differences(load_train_config(run_dir / "config.toml"), cfg)
        if changed and not overwrite:
            raise ValueError(f"{run_dir} holds a run of another config (it differs in {changed}); it is kept: "
                             "pass --overwrite (overwrite=True) to delete it and train this cell from scratch")
        if changed:
            clear_directory(run_dir)
    try:
        train(cfg, run_dir, resume=True, progress=progress)
    except TrainingDiverged as e:
        raise TrainingDiverged(f"compare cell {run_dir.name.rsplit('-', 1)[0]}: {e}") from None
    return read_json(run_dir / "train_meta.json")


def _train_worker(cfg: dict, run_dir: str, overwrite: bool = False, *, threads: int = 1) -> None:
    """An executor's entry point (:mod:`.executors`): ``threads`` torch threads, then :func:`train_cell`."""
    from hdiff.runtime import keep_freed_memory

    torch.set_num_threads(threads)
    keep_freed_memory()
    train_cell(train_config_from_dict(cfg), Path(run_dir), progress=False, overwrite=overwrite)


def run_compare(cfg: CompareConfig, out: str | os.PathLike, *, progress: bool | None = None,
                overwrite: bool = False, executor: Executor | None = None) -> dict[str, Any]:
    """Run (or finish) the comparison into ``out``; returns what ``metrics.json`` holds.

    Args:
        cfg: the sweep.
        out: the output directory (owned by ``compare``, locked while the sweep runs).
        progress: show progress bars (None: on a terminal only).
        overwrite: a cell's run directory holding another config's run is deleted and retrained
            (without it, that is an error); nothing else is ever deleted.
        executor: where the learned cells train (:mod:`.executors`: ``LocalExecutor``, ``RayExecutor``);
            None: ``compare.workers`` local processes. The results do not depend on it.
    """
    return Sweep(cfg, out, progress=progress, overwrite=overwrite, executor=executor).run()


def write_metrics(out: Path, metrics: dict[str, Any]) -> None:
    """``metrics.json`` (everything) and ``metrics.csv`` (one row per (n, denoiser), scalars only)."""
    write_json_atomic(out / "metrics.json", metrics)
    write_csv_atomic(out / "metrics.csv", metrics["rows"])
