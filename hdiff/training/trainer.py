"""The training loop: accelerate, AdamW, warmup + cosine, clipping, EMA, checkpoints, resume.

Single CPU process by default; the same code runs under ``torchrun`` / ``accelerate launch`` on
several processes, GPUs or nodes (docs/scaling.md): each process trains on ``optim.batch_size``
samples per step, so the global batch is that times the number of processes ``P``. On a fixed
training set the global batch of step ``s`` is batch ``s`` of the data order of a one-process run
with ``optim.batch_size * P`` (:class:`_GlobalBatchShards`), cut into ``P`` disjoint shards, one per
process; DDP averages the gradients, so ``P`` processes train like one process with the global
batch (the noise draws differ: each process has its own generator). Only the main process writes
files (``log.jsonl``, trackers, ``model/``, ``train_meta.json``, checkpoints' shared parts) and
reports. Structure after diffusers' ``train_unconditional.py``.

Experiment tracking: ``[run] log_with = "tensorboard"`` (or any tracker accelerate supports, or a
list of them) also sends every ``log.jsonl`` record to that tracker, with the same names and steps;
local trackers write under ``OUT/tracking/`` (TensorBoard: ``OUT/tracking/<run.project_name>/``).

Reproducibility: every random draw of a step comes from state the checkpoint holds: the weights
init (``run.seed``), the data order (a pure function of ``(run.seed, batch index)``, see
:class:`~hdiff.training.data.StepBatchSampler`), the noise and time draws (one ``torch.Generator``
per process, saved), and accelerate's global RNG states (dropout, if any). So a run interrupted
and resumed from its latest checkpoint ends bit-identical (on the same hardware) to an
uninterrupted one, and its ``log.jsonl`` has the same records.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

from hdiff.denoisers import BPDenoiser, EmpiricalDenoiser
from hdiff.noise import get_process, get_schedule
from hdiff.runs import check_output_dir, output_dir
from hdiff.training.artifacts import (MODEL_DIR, RAW_MODEL_DIR, SNAPSHOT_DIR, save_final, save_pretrained_atomic,
                                     write_run_description)
from hdiff.training.checkpoint import JsonlLog, load_checkpoint, save_checkpoint
from hdiff.training.config import TrainConfig, tracker_names
from hdiff.training.data import GHMDataset, StepBatchSampler, identity_collate, stream_seed
from hdiff.training.fresh import FreshBatchSampler, FreshGHMDataset, stack_collate
from hdiff.training.loss import diffusion_loss, evaluation_loss
from hdiff.training.models import build_model
from hdiff.training.rundir import (RESUMABLE_FIELDS, TrainingDiverged, config_differences, flatten_config, preflight,
                                   prepare_run_dir)

# sub-streams of run.seed, so that no two random sources share a sequence
_NOISE_STREAM, _EVAL_STREAM = 1000, 999
#: where trackers that write files (TensorBoard, ...) write, inside the run directory
TRACKING_DIR = "tracking"
# RESUMABLE_FIELDS and config_differences live in rundir; re-exported here, where callers found them before
__all__ = ["train", "TrainResult", "TrainingDiverged", "RESUMABLE_FIELDS", "config_differences"]


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        out: the run directory.
        step: optimizer steps completed.
        loss: the last logged training loss (nats per leaf), None if nothing was logged.
        heldout_loss: held-out loss of the EMA weights at the end.
        heldout_loss_raw: held-out loss of the raw weights at the end.
        time_s: training wall time, summed over resumed segments.
    """

    out: Path
    step: int
    loss: float | None
    heldout_loss: float | None
    heldout_loss_raw: float | None
    time_s: float


def _make_accelerator(cfg: TrainConfig, out: Path):
    from accelerate import Accelerator

    kw = {}
    if tracker_names(cfg.run.log_with):
        from accelerate.utils import ProjectConfiguration

        kw = dict(log_with=tracker_names(cfg.run.log_with),
                  project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / TRACKING_DIR)))
    _reset_precision(cfg.run.mixed_precision)
    # cpu=True when there is no GPU keeps accelerate from probing other backends
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=cfg.run.mixed_precision, **kw)


def _reset_precision(mixed_precision: str) -> None:
    """Let a run in this process use another ``run.mixed_precision`` than an earlier one did.

    accelerate keeps one precision per process (its ``AcceleratorState`` is a singleton and refuses a
    change); a second ``train`` with another precision (a notebook, a test) drops that state first.
    The distributed ``PartialState`` (process group, device) is kept.
    """
    from accelerate.state import AcceleratorState

    shared = AcceleratorState._shared_state
    if shared and shared.get("_mixed_precision") not in (None, mixed_precision):
        AcceleratorState._reset_state(reset_partial_state=False)


def check_trackers(cfg: TrainConfig) -> None:
    """Refuse a ``run.log_with`` tracker whose package is not installed (accelerate would drop it silently).

    Raises:
        ValueError: naming ``run.log_with``, the tracker and what to install.
    """
    names = tracker_names(cfg.run.log_with)
    if not names:
        return
    import accelerate.tracking

    available = {str(t) for t in accelerate.tracking.get_available_trackers()}
    for name in names:
        if name not in available:
            raise ValueError(f"run.log_with = {cfg.run.log_with!r}: the {name} tracker is not installed in this "
                             f"environment (pip install {name}; TensorBoard also comes with `pip install -e \".[dev]\"`), "
                             'or set run.log_with = "none"')


def _check_processes(cfg: TrainConfig, num_processes: int) -> None:
    """Refuse a global batch larger than the training set (every step draws distinct samples)."""
    if not cfg.data.fresh and cfg.optim.batch_size * num_processes > cfg.data.n_train:
        raise ValueError(f"data.n_train ({cfg.data.n_train}) must be at least the global batch: optim.batch_size "
                         f"({cfg.optim.batch_size}) x {num_processes} processes = {cfg.optim.batch_size * num_processes} "
                         "(each step trains on distinct samples): lower optim.batch_size or use fewer processes")


def train(cfg: TrainConfig, out: str | os.PathLike, *, resume: bool = False, overwrite: bool = False,
          callback: Callable[[int], None] | None = None, progress: bool | None = None) -> TrainResult:
    """Train a denoiser on ``cfg.data.n_train`` samples of ``cfg.ghm`` and save it in ``out``.

    Everything that can be checked is checked before the first file is written (the config on
    this machine, ``out``, the GHM, the model); then ``out`` is claimed for ``train`` and locked
    for the whole run (:mod:`hdiff.runs`), so no other command or second ``train`` writes it meanwhile.

    Args:
        cfg: the resolved config.
        out: the run directory (created); see :mod:`hdiff.training.artifacts` for its contents.
        resume: continue from the newest intact checkpoint in ``out`` (a fresh start if there is
            none); without it (or ``overwrite``), ``out`` must not hold a run already.
        overwrite: delete the run in ``out`` and start over.
        callback: called with the step number after every step (after logging and checkpointing);
            an exception raised there interrupts the run like a crash would.
        progress: show the tqdm bar; None shows it on an interactive terminal only.

    Returns:
        A :class:`TrainResult`.

    Raises:
        ValueError: a bad ``out`` or config (see :func:`~hdiff.training.rundir.prepare_run_dir`).
        hdiff.runs.DirectoryLocked: another process is writing ``out``.
        TrainingDiverged: the loss, gradients or weights became non-finite (naming ``out`` and the step).
    """
    out = Path(out)
    preflight(cfg)
    check_trackers(cfg)
    check_output_dir(out, "train")
    ghm = cfg.ghm.build()
    model = build_model(cfg, ghm)  # a bad model.options fails here, before any directory exists
    acc = _make_accelerator(cfg, out)
    _check_processes(cfg, acc.num_processes)
    # one writer per run directory; under `accelerate launch` the main process holds the lock for all
    with output_dir(out, "train") if acc.is_main_process else nullcontext(out):
        latest = prepare_run_dir(out, cfg, ghm, resume=resume, overwrite=overwrite) if acc.is_main_process else None
        latest = _broadcast(acc, latest)
        try:
            _start_trackers(acc, cfg, out, latest)
            return _train(cfg, out, ghm, model, acc, latest, callback, progress)
        finally:
            _finish_trackers(acc)


def _start_trackers(acc, cfg: TrainConfig, out: Path, latest: tuple[int, Path] | None) -> None:
    """``init_trackers`` with the flattened config as hyperparameters (no-op without ``run.log_with``).

    A resumed run hides the TensorBoard events past its checkpoint (``purge_step``), as
    ``log.jsonl`` drops its records past it: the steps redone are not shown twice.
    """
    if not tracker_names(cfg.run.log_with):
        return
    kwargs = {"wandb": {"name": out.name, "dir": str(out / TRACKING_DIR)}, "mlflow": {"run_name": out.name}}
    if latest is not None:
        kwargs["tensorboard"] = {"purge_step": latest[0] + 1}
    if acc.is_main_process:
        (out / TRACKING_DIR).mkdir(parents=True, exist_ok=True)
    hparams = {**_flat_hparams(dataclasses.asdict(cfg)), "num_processes": acc.num_processes,
               "global_batch_size": cfg.optim.batch_size * acc.num_processes}
    acc.init_trackers(cfg.run.project_name, config=hparams, init_kwargs=kwargs)


def _flat_hparams(d: dict) -> dict[str, bool | int | float | str]:
    """A nested config as ``{"optim.lr": 0.002, ...}``: scalars kept, lists and tables as JSON text, None left out."""
    return {k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v, sort_keys=True)
            for k, v in flatten_config(d).items() if v is not None}


def _finish_trackers(acc) -> None:
    """Close the trackers (flushing their files), also after a crash. Not ``acc.end_training()``: that
    also destroys the process group, which belongs to whoever launched the processes, not to ``train``."""
    for tracker in acc.trackers:
        tracker.finish()
    acc.trackers = []


def _broadcast(acc, latest: tuple[int, Path] | None) -> tuple[int, Path] | None:
    """The main process's choice of checkpoint, on every process."""
    if acc.num_processes == 1:
        return latest
    from accelerate.utils import broadcast_object_list

    box = [latest]
    broadcast_object_list(box)
    return box[0]


def _train(cfg: TrainConfig, out: Path, ghm, model: torch.nn.Module, acc, latest: tuple[int, Path] | None,
           callback: Callable[[int], None] | None, progress: bool | None) -> TrainResult:
    """The loop of :func:`train`, once ``out`` is locked and the checkpoint to resume from is chosen."""
    train_set, heldout_set = GHMDataset.split(ghm, cfg.data.n_train, cfg.data.n_heldout, seed=cfg.data.data_seed)
    log = JsonlLog(out / "log.jsonl")
    if acc.is_main_process:
        write_run_description(out, cfg, ghm)
        log.truncate_after(latest[0] if latest else 0)  # records past the checkpoint are redone, not duplicated
    acc.wait_for_everyone()

    o, n_proc = cfg.optim, acc.num_processes
    process = get_process(cfg.noise.process, ghm.vocab_size)
    # fused AdamW: one kernel for all parameters (torch's default on CPU is a Python loop over tensors)
    optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                  weight_decay=o.weight_decay, fused=True)
    from diffusers.optimization import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup
    from diffusers.training_utils import EMAModel

    # accelerate steps a prepared scheduler once per process per optimizer step: count in those units
    if o.schedule == "constant":
        lr_scheduler = get_constant_schedule_with_warmup(optimizer, o.warmup_steps * n_proc)
    elif o.schedule == "inverse_sqrt":
        lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, partial(_inverse_sqrt, warmup=o.warmup_steps * n_proc, timescale=o.decay_timescale * n_proc))
    else:
        lr_scheduler = get_cosine_schedule_with_warmup(optimizer, o.warmup_steps * n_proc, o.max_steps * n_proc)
    model, optimizer, lr_scheduler = acc.prepare(model, optimizer, lr_scheduler)
    raw = acc.unwrap_model(model)
    ema = EMAModel(raw.parameters(), decay=o.ema_decay, foreach=True)  # checkpointed by hdiff, as safetensors
    eval_model = copy.deepcopy(raw).eval().requires_grad_(False)  # holds the EMA weights for eval and saving
    if cfg.run.compile:  # opt-in; after unwrapping, so raw / EMA / checkpoints see the plain module
        model = torch.compile(model)

    noise_seed = stream_seed(cfg.run.seed, _NOISE_STREAM + acc.process_index)  # each process its own noise
    noise_rng = torch.Generator(device=acc.device).manual_seed(noise_seed)
    state = {"step": 0, "elapsed": 0.0, "loss_sum": 0.0, "loss_count": 0}
    if latest is not None:
        saved = load_checkpoint(acc, latest[1], ema)
        ema.to(acc.device)  # the EMA is loaded onto the CPU
        rng_state = saved.pop("noise_rng")
        if rng_state is not None:
            noise_rng.set_state(rng_state)
        state.update({k: saved[k] for k in state})
        if saved.get("num_processes") not in (None, n_proc):  # saved by another number of processes
            _move_schedule(lr_scheduler, state["step"] * n_proc)

    step = state["step"]
    saved_step = step if latest is not None else None  # the last checkpoint on disk, for a divergence report
    left = max(0, o.max_steps - step)  # optimizer steps still to run
    if cfg.data.fresh:  # a new batch from the GHM at every step: a pure function of (data_seed, batch index)
        batches = FreshBatchSampler(o.batch_size, start=step * n_proc, count=left * n_proc)
        loader = acc.prepare(DataLoader(FreshGHMDataset(ghm, cfg.data.data_seed), collate_fn=stack_collate,
                                        batch_sampler=batches))
    else:
        sampler = _GlobalBatchShards(len(train_set), o.batch_size, n_proc, seed=cfg.run.seed, start=step,
                                     count=left)
        loader = acc.prepare(DataLoader(train_set, batch_sampler=sampler, collate_fn=identity_collate,
                                        num_workers=cfg.run.num_workers))
    oracle = None  # the soft target of the loss, if any (docs/experiments.md)
    if cfg.noise.target == "oracle":
        oracle = BPDenoiser(ghm.to(acc.device), process)
    elif cfg.noise.target == "empirical":
        oracle = EmpiricalDenoiser(train_set.tokens, process).to(acc.device)
    loss_kw = dict(schedule=get_schedule(cfg.schedule), t_min=cfg.noise.t_min, elbo=cfg.noise.elbo_weight)
    snapshots = set(cfg.run.snapshot_steps)
    stratified = cfg.noise.t_sampling == "stratified"  # training only: evaluation keeps i.i.d. noise levels

    def diverged(what: str, at: int) -> TrainingDiverged:
        kept = f"its last checkpoint (step {saved_step}) is kept" if saved_step else "no checkpoint was saved yet"
        return TrainingDiverged(f"training diverged in {str(out)!r}: {what} at step {at}; nothing of that step "
                                f"was saved and {kept} (lower optim.lr, or keep optim.grad_clip > 0)")

    def evaluate() -> dict[str, float]:
        ema.copy_to(eval_model.parameters())
        # in chunks of the global batch: the evaluation noise depends on the chunking, so P processes log
        # the held-out losses of one process with the same global batch
        kw = dict(process=process, batch_size=o.batch_size * n_proc, seed=stream_seed(cfg.run.seed, _EVAL_STREAM),
                  device=acc.device, **loss_kw)
        raw.eval()
        try:
            return {"heldout_loss": evaluation_loss(eval_model, heldout_set.tokens, **kw),
                    "heldout_loss_raw": evaluation_loss(raw, heldout_set.tokens, **kw),
                    "train_eval_loss": evaluation_loss(eval_model, train_set.tokens[:len(heldout_set)], **kw)}
        finally:
            raw.train()

    show = progress if progress is not None else sys.stderr.isatty()
    bar = tqdm(total=o.max_steps, initial=step, desc="train", dynamic_ncols=True,
               disable=not (show and acc.is_local_main_process))
    t0, last = time.monotonic() - state["elapsed"], {}
    loss_sum = torch.tensor(state["loss_sum"], dtype=torch.float64, device=acc.device)
    model.train()
    try:
        for x0 in loader:
            loss = diffusion_loss(model, x0, process, generator=noise_rng, oracle=oracle, stratified=stratified,
                                  **loss_kw)
            # one scalar host sync per step: a non-finite loss must never reach the weights
            if not _all_finite(acc, loss.detach()):
                value = float(loss.detach())
                raise diverged(f"the training loss is {value}" if not torch.isfinite(loss.detach())
                               else f"the training loss is not finite on another process (here {value})", step + 1)
            acc.backward(loss)
            if o.grad_clip > 0:
                norm = acc.clip_grad_norm_(model.parameters(), o.grad_clip)
                # under fp16 the grad scaler skips an overflowing step itself (and lowers its scale)
                if norm is not None and acc.scaler is None and not _all_finite(acc, norm.detach()):
                    raise diverged(f"the gradient norm is {float(norm)}", step + 1)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            ema.step(raw.parameters())
            step += 1
            loss_sum += loss.detach().double()  # summed on the device: no host sync per step
            state["loss_count"] += 1
            bar.update(1)
            last = _maybe_log(step, cfg, acc, log, loss_sum, state, lr_scheduler, evaluate, t0, bar) or last
            if step % cfg.run.checkpoint_every == 0 or step == o.max_steps:
                if not _weights_finite(raw):  # a finite loss can still have led to infinite weights
                    raise diverged("the weights became NaN or infinite", step)
                state.update(step=step, elapsed=time.monotonic() - t0, loss_sum=float(loss_sum))
                save_checkpoint(acc, out, step, {**state, "noise_rng": noise_rng.get_state()},
                                keep=cfg.run.keep_checkpoints, ema=ema)
                saved_step = step
            if step in snapshots and acc.is_main_process:  # the EMA weights at this step, for the time axis
                ema.copy_to(eval_model.parameters())
                (out / SNAPSHOT_DIR).mkdir(exist_ok=True)
                save_pretrained_atomic(eval_model, out / SNAPSHOT_DIR / f"step_{step:06d}")
            if callback is not None:
                callback(step)
    finally:
        bar.close()
    elapsed = time.monotonic() - t0
    if acc.is_main_process:
        if "heldout_loss" not in last:  # resumed at max_steps: nothing ran; report the final losses anyway
            last = {**(log.read() or [{}])[-1], **evaluate()}
        ema.copy_to(eval_model.parameters())
        if not (_weights_finite(raw) and _weights_finite(eval_model)):
            raise diverged("the weights are NaN or infinite", step)
        meta = {"n_train": cfg.data.n_train, "n_heldout": cfg.data.n_heldout, "data_seed": cfg.data.data_seed,
                "heldout_seed": heldout_set.seed, "steps": step, "num_processes": n_proc,
                "global_batch_size": o.batch_size * n_proc, "model_kind": cfg.model.kind,
                "ghm_sha256": ghm.sha256(),
                "weights": {MODEL_DIR: "EMA", RAW_MODEL_DIR: "raw (last step)"}, "time_s": elapsed,
                **{f"final_{k}": last.get(k) for k in ("loss", "heldout_loss", "heldout_loss_raw", "train_eval_loss")}}
        save_final(out, cfg, ghm, eval_model, raw, meta)
    acc.wait_for_everyone()
    return TrainResult(out, step, last.get("loss"), last.get("heldout_loss"), last.get("heldout_loss_raw"), elapsed)


class _GlobalBatchShards(Sampler[list[int]]):
    """The per-process batches of steps ``start, ..., start + count - 1``, in the order accelerate shards them.

    Global batch ``s`` is batch ``s`` of ``StepBatchSampler(n, batch_size * num_processes, seed=seed)``,
    the batch a one-process run with the global batch size trains on at step ``s``; it is yielded as
    ``num_processes`` consecutive slices of ``batch_size``, and accelerate's ``BatchSamplerShard``
    gives process ``i`` every ``num_processes``-th batch from ``i``: slice ``i`` of every global batch.
    So the shards of one step are disjoint (one permutation), and the data order is the same for any
    number of processes with the same global batch. With one process this is ``StepBatchSampler``
    itself. (Cutting the order of ``StepBatchSampler(n, batch_size)`` into consecutive runs of
    ``num_processes`` batches instead, as before, put an epoch boundary inside a global batch
    whenever ``n mod (batch_size * num_processes) >= batch_size``: its shards came from two
    permutations and could repeat a sample.)
    """

    def __init__(self, n: int, batch_size: int, num_processes: int, *, seed: int, start: int, count: int) -> None:
        self.order = StepBatchSampler(n, batch_size * num_processes, seed=seed, start=start, count=count)
        self.batch_size, self.num_processes = batch_size, num_processes
        self.drop_last = True  # read by accelerate's BatchSamplerShard

    def __iter__(self):
        b = self.batch_size
        for batch in self.order:
            for i in range(self.num_processes):
                yield batch[i * b:(i + 1) * b]

    def __len__(self) -> int:
        return len(self.order) * self.num_processes


def _inverse_sqrt(step: int, *, warmup: int, timescale: int) -> float:
    """The LR factor of ``optim.schedule = "inverse_sqrt"``: linear warmup, then ``sqrt(tau / (tau + step - warmup))``."""
    if step < warmup:
        return (step + 1) / warmup
    return math.sqrt(timescale / (timescale + step - warmup))


def _move_schedule(lr_scheduler, position: int) -> None:
    """Put the learning-rate schedule at ``position`` scheduler steps.

    accelerate steps the schedule once per process per optimizer step, so a checkpoint of ``P``
    processes holds ``P * step`` and the schedule is built in those units; resumed on another number
    of processes, the count is redone in the new units (else the rate ran ahead, or fell behind, of
    the step for the rest of the run).
    """
    sched = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate's wrapper holds torch's LambdaLR
    sched.last_epoch = position
    lrs = [base * lam(position) for base, lam in zip(sched.base_lrs, sched.lr_lambdas)]
    for group, lr in zip(sched.optimizer.param_groups, lrs):
        group["lr"] = lr
    sched._last_lr = lrs


def _all_finite(acc, value: torch.Tensor) -> bool:
    """Whether ``value`` is finite on every process (one all-reduce when there are several, so all stop together).

    Reduces the "not finite" flag with ``max``: accelerate's ``reduce`` knows ``sum``, ``mean`` and
    ``max`` only and sums anything else, so the ``"min"`` of the finite flag used before was a sum,
    nonzero when any process was finite, and a NaN loss on one of several processes went on into
    the all-reduced gradients.
    """
    bad = (~torch.isfinite(value)).any().float()
    if acc.num_processes > 1:
        bad = acc.reduce(bad, "max")
    return not bool(bad > 0)


def _weights_finite(model: torch.nn.Module) -> bool:
    """Whether every parameter of ``model`` is finite."""
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def _maybe_log(step: int, cfg: TrainConfig, acc, log: JsonlLog, loss_sum: torch.Tensor, state: dict,
               lr_scheduler, evaluate: Callable[[], dict], t0: float, bar) -> dict | None:
    """Write a log record at log / eval steps and the last step; reset the loss window. Returns the record."""
    r = cfg.run
    is_eval = step % r.eval_every == 0 or step == cfg.optim.max_steps
    if not (step % r.log_every == 0 or is_eval):
        return None
    window = acc.reduce(loss_sum / state["loss_count"], "mean")  # mean over the window and the processes
    record = {"step": step, "loss": float(window), "lr": lr_scheduler.get_last_lr()[0]}
    loss_sum.zero_()
    state["loss_count"] = 0
    if is_eval and acc.is_main_process:
        record.update(evaluate())
    record["time"] = time.monotonic() - t0
    if acc.is_main_process:
        log.append(record)
        if acc.trackers:  # the same record, under the same names, to TensorBoard & co.
            acc.log({k: v for k, v in record.items() if k != "step"}, step=step)
        bar.set_postfix({k: f"{v:.4f}" for k, v in record.items() if k in ("loss", "heldout_loss")})
    acc.wait_for_everyone()
    return record
