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
the part of the cell in progress since its last checkpoint. Then ``metrics.json``,
``metrics.csv``, the plots and ``report.html`` / ``report.md`` are written (:mod:`.report`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from hdiff.denoisers import BPDenoiser
from hdiff.experiments.compare_config import CompareConfig, SamplerSpec
from hdiff.metrics.likelihood import nelbo
from hdiff.metrics import posterior_kl, sample_quality
from hdiff.ghm import GHM
from hdiff.sampling import sample
from hdiff.schedulers.factory import make_scheduler, scheduler_options
from hdiff.training import TrainConfig, load_train_config, load_trained, train
from hdiff.training.config import train_config_from_dict
from hdiff.io import atomic_write, write_csv_atomic, write_json_atomic, write_text_atomic
from hdiff.training.data import GHMDataset, stream_seed
from hdiff.tokens import row_keys
from hdiff.noise import get_process
from hdiff.training.trainer import RESUMABLE_FIELDS, config_differences

ORACLE = "oracle"
# sub-streams of compare.seed
_SAMPLE_STREAM, _NELBO_STREAM, _KL_STREAM = 100, 200, 300


def cell_name(denoiser: str, n: int) -> str:
    """The file stem of a cell, e.g. ``tree_unet_n512``."""
    return f"{denoiser}_n{n}"


def _fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


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
    """

    def __init__(self, cfg: CompareConfig, out: str | os.PathLike, *, progress: bool | None = None) -> None:
        self.cfg, self.out = cfg, Path(out)
        self.show = progress
        self.ghm = cfg.train.ghm.build()
        self.process = get_process(cfg.train.noise.process, self.ghm.vocab_size)
        self.oracle = BPDenoiser(self.ghm, self.process)
        c, d = cfg.compare, cfg.train.data
        # nested training sets (the set of n is a prefix of the largest); held-out data excludes all of them
        self.train_set, heldout = GHMDataset.split(self.ghm, max(c.n_train), d.n_heldout, seed=d.data_seed)
        self.heldout = heldout.tokens
        self.nelbo_data = self.heldout[:c.nelbo_samples]
        self._oracle_cache: dict[str, Any] = {}

    # ------------------------------------------------------------------ cells
    def cells(self) -> list[tuple[str, int]]:
        """``(denoiser, n)`` in sweep order: per size, the learned models then the oracle."""
        return [(name, n) for n in sorted(self.cfg.compare.n_train) for name in [*self.cfg.models, ORACLE]]

    def fingerprint(self, denoiser: str, n: int) -> str:
        """What a cell's result depends on: its training config (learned), the sweep's evaluation settings."""
        c = self.cfg.compare
        evaluation = {k: v for k, v in dataclasses.asdict(c).items()
                      if k not in ("n_train", "max_steps", "baseline", "baseline_model", "workers")}
        trained = None if denoiser == ORACLE else dataclasses.asdict(self.cfg.train_config(n, denoiser))
        return _fingerprint({"ghm": dataclasses.asdict(self.cfg.train.ghm), "noise": dataclasses.asdict(self.cfg.train.noise),
                             "data": [self.cfg.train.data.data_seed, self.cfg.train.data.n_heldout],
                             "n": n, "denoiser": denoiser, "trained": trained, "evaluation": evaluation})

    def load_cell(self, denoiser: str, n: int) -> dict | None:
        """A finished cell's row if its fingerprint matches, else None."""
        path = self.out / "cells" / f"{cell_name(denoiser, n)}.json"
        if not path.is_file():
            return None
        row = json.loads(path.read_text())
        return row if row.get("fingerprint") == self.fingerprint(denoiser, n) else None

    def run_cell(self, denoiser: str, n: int) -> dict:
        """Train (learned), sample, evaluate one cell and write ``cells/<name>.json``; return its row."""
        c, start = self.cfg.compare, time.monotonic()
        row: dict[str, Any] = {"n": n, "denoiser": denoiser}
        train_keys = set(row_keys(self.train_set.tokens[:n]))
        if denoiser == ORACLE:
            model = self.oracle
        else:
            run_dir = self.out / "runs" / cell_name(denoiser, n)
            meta = train_cell(self.cfg.train_config(n, denoiser), run_dir, progress=self.show)
            model, _, _ = load_trained(run_dir)
            model.requires_grad_(False)
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
            gen = torch.Generator().manual_seed(stream_seed(c.seed, _KL_STREAM))
            kl = posterior_kl(self.oracle, model, self.heldout[:c.kl_samples], num_bins=c.kl_bins, generator=gen)
            row["kl_per_bin"] = kl.compute().tolist()
            row["kl_mean"] = float(kl.kl_sum.sum() / kl.count.sum())
        row["eval_time_s"] = time.monotonic() - start
        row["fingerprint"] = self.fingerprint(denoiser, n)
        (self.out / "cells").mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.out / "cells" / f"{cell_name(denoiser, n)}.json", row)
        return row

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
        """Train the learned models of ``cells`` in ``compare.workers`` one-thread processes, longest first."""
        jobs = sorted(((self.cfg.train_config(n, d), self.out / "runs" / cell_name(d, n)) for d, n in cells
                       if d != ORACLE), key=lambda job: -job[0].optim.max_steps * job[0].optim.batch_size)
        jobs = [(tcfg, run_dir) for tcfg, run_dir in jobs if not _finished(tcfg, run_dir)]
        if len(jobs) < 2 or self.cfg.compare.workers < 2:
            return  # trained in order by run_cell
        context = multiprocessing.get_context("spawn")  # fork after torch's thread pools start is unsafe
        with ProcessPoolExecutor(max_workers=self.cfg.compare.workers, mp_context=context,
                                 initializer=_exit_with_parent, initargs=(os.getpid(),)) as pool:
            futures = [pool.submit(_train_worker, dataclasses.asdict(tcfg), str(run_dir)) for tcfg, run_dir in jobs]
            show = self.show if self.show is not None else os.isatty(2)
            for future in tqdm(as_completed(futures), total=len(futures), desc="train", disable=not show):
                future.result()  # re-raises a worker's error

    def run(self) -> dict[str, Any]:
        """Every cell (skipping finished ones), then the metrics files and the report."""
        self.out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.out / "config.toml", self.cfg.to_toml())
        self.train_all([cell for cell in self.cells() if self.load_cell(*cell) is None])
        rows, skipped, start = [], 0, time.monotonic()
        bar = tqdm(self.cells(), desc="compare", dynamic_ncols=True,
                   disable=not (self.show if self.show is not None else os.isatty(2)))
        for denoiser, n in bar:
            bar.set_postfix_str(cell_name(denoiser, n))
            row = self.load_cell(denoiser, n)
            skipped += row is not None
            rows.append(row if row is not None else self.run_cell(denoiser, n))
        bar.close()
        metrics = {**self.summary(), "rows": rows, "cells_skipped": skipped, "time_s": time.monotonic() - start}
        write_metrics(self.out, metrics)
        from hdiff.experiments.report import write_report

        write_report(self.out, metrics)
        return metrics


def _finished(cfg: TrainConfig, run_dir: Path) -> dict | None:
    """The ``train_meta.json`` of a finished run of exactly ``cfg`` in ``run_dir``, else None."""
    meta_path = run_dir / "train_meta.json"
    if not (meta_path.is_file() and (run_dir / "config.toml").is_file()):
        return None
    if config_differences(load_train_config(run_dir / "config.toml"), cfg):
        return None
    meta = json.loads(meta_path.read_text())
    return meta if meta.get("steps") == cfg.optim.max_steps else None


def train_cell(cfg: TrainConfig, run_dir: Path, *, progress: bool | None = None) -> dict:
    """Train one cell's model into ``run_dir`` unless it is there already; return its ``train_meta.json``.

    A half-finished run of the same config resumes from its last checkpoint; a run of another
    config (other than its length or cadences) is deleted and started over.
    """
    meta = _finished(cfg, run_dir)
    if meta is not None:
        return meta
    if (run_dir / "config.toml").is_file():
        changed = config_differences(load_train_config(run_dir / "config.toml"), cfg)
        if any(k not in RESUMABLE_FIELDS for k in changed):
            shutil.rmtree(run_dir)
    train(cfg, run_dir, resume=True, progress=progress)
    return json.loads((run_dir / "train_meta.json").read_text())


def _train_worker(cfg: dict, run_dir: str) -> None:
    """Process-pool entry point: one thread, then :func:`train_cell`."""
    from hdiff.runtime import keep_freed_memory

    torch.set_num_threads(1)
    keep_freed_memory()
    train_cell(train_config_from_dict(cfg), Path(run_dir), progress=False)


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


def run_compare(cfg: CompareConfig, out: str | os.PathLike, *, progress: bool | None = None) -> dict[str, Any]:
    """Run (or finish) the comparison into ``out``; returns what ``metrics.json`` holds."""
    return Sweep(cfg, out, progress=progress).run()


def write_metrics(out: Path, metrics: dict[str, Any]) -> None:
    """``metrics.json`` (everything) and ``metrics.csv`` (one row per (n, denoiser), scalars only)."""
    write_json_atomic(out / "metrics.json", metrics)
    write_csv_atomic(out / "metrics.csv", metrics["rows"])
