"""The ``hdiff`` command line: ``compare`` (the main job), ``demo``, ``sample``, ``train`` and the research probes.

Errors are one line on stderr, ``hdiff: error: ...``, naming the file or field at fault: exit
status 2 for a usage or config error (a bad argument, a missing or malformed file, a value out of
range, an output directory that belongs to another command), 1 for a failure at run time (a
directory locked by another process, a training run that diverged). ``--debug`` (or
``HDIFF_DEBUG=1``) shows the traceback instead. Every command that writes a directory claims and
locks it first (:mod:`hdiff.runs`), after its arguments and config have been checked.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # hdiff never needs a hub; set before diffusers is imported

#: exceptions that mean "the arguments, a config or an input file are wrong": exit status 2
USAGE_ERRORS: tuple[type[BaseException], ...] = (ValueError, TypeError, FileNotFoundError, NotADirectoryError,
                                                 IsADirectoryError, PermissionError)


class UsageError(ValueError):
    """A command-line argument error (unknown option, missing argument, bad choice).

    Attributes:
        prog: the (sub)command whose arguments are wrong, e.g. ``hdiff train``.
    """

    def __init__(self, message: str, prog: str = "hdiff") -> None:
        super().__init__(message)
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are exceptions (one line, exit status 2), not usage dumps."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message, self.prog)


def _demo(args: argparse.Namespace) -> int:
    from hdiff.experiments.demo import format_summary, run_quicklook
    from hdiff.runs import output_dir

    with output_dir(args.out, "demo"):
        summary = run_quicklook(args.out)
    print(format_summary(summary))
    print(f"wrote {os.path.join(args.out, 'summary.json')} and {os.path.join(args.out, 'samples.png')}")
    return 0


def _load_ghm(spec: str):
    """A GHM from a saved directory or a TOML config (its ``[ghm]`` table, or the whole file)."""
    from pathlib import Path

    from hdiff.config import GHMConfig, from_dict, read_toml
    from hdiff.ghm import GHM

    path = Path(spec)
    if path.is_dir():
        return GHM.load(path)
    if path.suffix == ".toml":
        data = read_toml(path)
        return from_dict(GHMConfig, data.get("ghm", data), f"{path.name}:ghm").build()
    raise ValueError(f"--ghm must be a saved GHM directory or a .toml config, got {spec!r}")


def _process_name(args: argparse.Namespace) -> str:
    """The noise process ``hdiff sample`` will use, without loading any model or GHM.

    ``--process`` (``masked`` is the old name of ``masking``), else a trained run's own (read from
    its ``config.toml``), else masking for the oracle.
    """
    if args.process == "masked":  # the name before the process registry; kept as an alias
        args.process = "masking"
    if args.denoiser == "oracle":
        return args.process or "masking"
    from pathlib import Path

    from hdiff.training.config import load_train_config

    config = Path(args.denoiser) / "config.toml"
    if not config.is_file():
        raise ValueError("--denoiser must be 'oracle' or a trained run directory (hdiff train --out), "
                         f"got {args.denoiser!r}")
    return args.process or load_train_config(config).noise.process


def _sampling_denoiser(args: argparse.Namespace):
    """``(ghm, process, denoiser, schedule)`` for ``hdiff sample``: the BP oracle, or a trained run directory.

    A run directory brings its own GHM, noise process and schedule; ``--ghm`` / ``--process``, if
    given, must agree with them. Resolves ``args.process`` to the name actually used.
    """
    from hdiff.noise import get_process

    if args.denoiser == "oracle":
        from hdiff.denoisers import BPDenoiser

        if args.ghm is None:
            raise ValueError("--ghm is required with --denoiser oracle")
        args.process = args.process or "masking"
        ghm = _load_ghm(args.ghm)
        process = get_process(args.process, ghm.vocab_size)
        return ghm, process, BPDenoiser(ghm, process), None
    from hdiff.training import is_run_dir, load_trained
    from hdiff.training.models import process_of

    if not is_run_dir(args.denoiser):
        raise ValueError("--denoiser must be 'oracle' or a trained run directory (hdiff train --out), "
                         f"got {args.denoiser!r}")
    model, ghm, cfg = load_trained(args.denoiser)
    if args.ghm is not None and _load_ghm(args.ghm).sha256() != ghm.sha256():
        raise ValueError(f"--ghm {args.ghm!r} is not the GHM the model in {args.denoiser!r} was trained on")
    if args.process not in (None, cfg.noise.process):
        raise ValueError(f"--process {args.process}: the model in {args.denoiser!r} was trained with "
                         f"{cfg.noise.process} noise")
    args.process = cfg.noise.process
    model.requires_grad_(False)  # the pipeline runs under no_grad anyway; this also keeps autograd out of hooks
    return ghm, process_of(model, ghm.vocab_size), model, cfg.schedule


def _train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from hdiff.training import load_train_config, train

    cfg = load_train_config(args.config)
    overrides = {"data.n_train": args.n_train, "optim.max_steps": args.max_steps}
    cfg = cfg.replace(**{k: v for k, v in overrides.items() if v is not None})
    out = Path(args.out or Path("outputs") / "train" / Path(args.config).stem)
    result = train(cfg, out, resume=args.resume, overwrite=args.overwrite)
    from accelerate import PartialState

    if not PartialState().is_main_process:  # under `accelerate launch`: one report, from the main process
        return 0
    print(f"trained {result.step} steps in {result.time_s:.1f} s: loss {result.loss}, "
          f"held-out {result.heldout_loss} (EMA), {result.heldout_loss_raw} (raw) -> {out}")
    return 0


def _sample(args: argparse.Namespace) -> int:
    from pathlib import Path

    import numpy as np
    import torch

    from hdiff.io import atomic_write, write_json_atomic
    from hdiff.noise import get_process
    from hdiff.runs import check_output_dir, output_dir
    from hdiff.schedulers.factory import check_pair, check_steps, make_scheduler, scheduler_options

    # the pairing first: a scheduler that cannot sample this noise would give 0% valid samples, with exit 0
    check_pair(get_process(_process_name(args), 2), args.scheduler)
    for name in ("steps", "num"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    check_output_dir(args.out, "sample")
    ghm, process, denoiser, schedule = _sampling_denoiser(args)
    kwargs = {"schedule": schedule} if args.scheduler != "discrete-ddim" else {}
    check_steps(args.scheduler, args.steps, prediction_type=args.prediction_type, unmasking=args.unmasking, **kwargs)
    scheduler = make_scheduler(args.scheduler, prediction_type=args.prediction_type, unmasking=args.unmasking, **kwargs)
    from hdiff.experiments.plots import plot_tokens
    from hdiff.metrics import sample_quality
    from hdiff.sampling import HierarchicalDiffusionPipeline

    pipe = HierarchicalDiffusionPipeline(denoiser, scheduler, process)
    gen = torch.Generator().manual_seed(args.seed)
    with output_dir(args.out, "sample") as out:
        tokens = pipe(batch_size=args.num, num_inference_steps=args.steps, generator=gen, x0_mode=args.x0_mode,
                      **scheduler_options(args.scheduler)).tokens
        atomic_write(out / "tokens.pt", lambda tmp: torch.save(tokens, tmp))
        atomic_write(out / "tokens.npy", lambda tmp: np.save(tmp, tokens.numpy()))
        metrics = {"ghm": repr(ghm), "ghm_sha256": ghm.sha256(), "denoiser": args.denoiser, "process": args.process,
                   "scheduler": args.scheduler, "steps": args.steps, "x0_mode": args.x0_mode, "seed": args.seed,
                   **sample_quality(ghm, tokens)}
        write_json_atomic(out / "metrics.json", metrics)
        plot_tokens(tokens, ghm.vocab_size, out / "samples.png",
                    title=f"{args.denoiser}, {args.process} noise, {args.scheduler} x {args.steps}")
    print(f"valid {100 * metrics['validity']:.1f}%  NLL {metrics['nll_bits_per_leaf']} bits/leaf  -> {Path(args.out)}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    import time

    from hdiff.experiments.compare import run_compare
    from hdiff.experiments.compare_config import load_compare_config
    from hdiff.experiments.executors import make_executor
    from hdiff.experiments.report import headline

    if args.executor != "ray" and (args.cpus_per_task is not None or args.gpus_per_task is not None):
        raise UsageError("--cpus-per-task and --gpus-per-task are Ray's: they need --executor ray", "hdiff compare")
    cfg = load_compare_config(args.config)
    try:
        executor = make_executor(args.executor, workers=cfg.compare.workers, address=args.address,
                                 num_cpus_per_task=1 if args.cpus_per_task is None else args.cpus_per_task,
                                 num_gpus_per_task=0 if args.gpus_per_task is None else args.gpus_per_task)
    except ImportError as e:  # Ray missing: a usage error naming the extra to install
        raise UsageError(f"--executor ray: {e}", "hdiff compare") from None
    start = time.monotonic()
    metrics = run_compare(cfg, args.out, progress=None if not args.quiet else False, overwrite=args.overwrite,
                          executor=executor)
    head, body = headline(metrics)
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(head)]
    for line in [head, *body]:
        print("  ".join(c.rjust(w) for c, w in zip(line, widths)))
    print(f"exact entropy {metrics['entropy_bits_per_leaf']:.4f} bits/leaf; held-out exact NLL "
          f"{metrics['heldout_nll_bits_per_leaf']:.4f} bits/leaf; {time.monotonic() - start:.0f} s "
          f"({metrics['cells_skipped']} finished cells reused) -> {os.path.join(args.out, 'report.html')}")
    return 0


def _classify(args: argparse.Namespace) -> int:
    from hdiff.experiments.classify import format_classify, load_classify_config, run_classify

    from hdiff.runs import output_dir

    cfg = load_classify_config(args.config)
    with output_dir(args.out, "classify"):
        metrics = run_classify(cfg, args.out)
    print(format_classify(metrics))
    print(f"{metrics['wall_seconds']:.0f} s -> {os.path.join(args.out, 'metrics.json')}, accuracy.png")
    return 0


def _probe(args: argparse.Namespace) -> int:
    from hdiff.experiments.probe import format_probe, load_probe_config, run_probe

    from hdiff.runs import output_dir

    cfg = load_probe_config(args.config)
    with output_dir(args.out, "probe"):
        metrics = run_probe(cfg, args.out)
    print(format_probe(metrics))
    print(f"{metrics['wall_seconds']:.0f} s -> {os.path.join(args.out, 'metrics.json')}, probe.png")
    return 0


def _width(args: argparse.Namespace) -> int:
    from hdiff.experiments.width import format_width, load_width_config, run_width
    from hdiff.runs import output_dir

    cfg = load_width_config(args.config)
    with output_dir(args.out, "width"):
        metrics = run_width(cfg, args.out)
    print(format_width(metrics))
    print(f"-> {os.path.join(args.out, 'metrics.json')}, width.png")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``hdiff`` command (its errors raise :class:`UsageError`)."""
    parser = _Parser(prog="hdiff", description="Diffusion on generative hierarchical models with an exact BP oracle.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks (also: HDIFF_DEBUG=1)")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", parents=[common], help="sample the default GHM and denoise noisy copies with exact BP")
    # not outputs/demo: that is `make demo`'s sweep (owned by compare), which `hdiff demo` must not write into
    demo.add_argument("--out", default="outputs/quicklook", help="output directory (default: outputs/quicklook)")
    demo.set_defaults(func=_demo)

    smp = sub.add_parser("sample", parents=[common], help="reverse diffusion with a denoiser through a scheduler")
    smp.add_argument("--ghm", help="saved GHM directory or a TOML config with a [ghm] table "
                     "(required with the oracle; a trained run brings its own)")
    smp.add_argument("--denoiser", default="oracle",
                     help="'oracle' (exact BP) or a trained run directory (hdiff train --out)")
    smp.add_argument("--process", choices=["masking", "uniform", "gaussian", "masked"], default=None,
                     help="noise process (default: masking; a trained run's own; 'masked' = masking)")
    smp.add_argument("--scheduler", default="masked",
                     help="ddpm | ddim | euler | dpmsolver (gaussian); masked (masking); uniform | discrete-ddim (uniform)")
    smp.add_argument("--steps", type=int, default=64)
    smp.add_argument("--num", type=int, default=256, help="number of samples")
    smp.add_argument("--unmasking", choices=["bernoulli", "fixed"], default="bernoulli")
    smp.add_argument("--prediction-type", choices=["epsilon", "sample", "v_prediction"], default="epsilon")
    smp.add_argument("--x0-mode", choices=["marginal", "joint"], default="marginal")
    smp.add_argument("--seed", type=int, default=0)
    smp.add_argument("--out", required=True, help="output directory (new, or an earlier hdiff sample's)")
    smp.set_defaults(func=_sample)

    cmp = sub.add_parser("compare", parents=[common],
                         help="the main job: the BP oracle vs learned denoisers as the training set grows")
    cmp.add_argument("--config", required=True, help="TOML compare config, e.g. configs/demo.toml")
    cmp.add_argument("--out", required=True, help="output directory; a rerun skips its finished cells")
    cmp.add_argument("--quiet", action="store_true", help="no progress bars")
    cmp.add_argument("--overwrite", action="store_true",
                     help="delete and retrain a cell's run directory that holds another config's run")
    cmp.add_argument("--executor", choices=["local", "ray"], default="local",
                     help="where the learned cells train: local (compare.workers processes; the default) or ray "
                          "(one Ray task per cell; needs pip install 'hdiff[ray]')")
    cmp.add_argument("--address", default=None,
                     help="with --executor ray: the Ray cluster to join (ray.init(address=...), e.g. auto or "
                          "HOST:PORT; its nodes must see --out at the same path); default: RAY_ADDRESS, else a "
                          "local Ray")
    cmp.add_argument("--cpus-per-task", type=float, default=None,
                     help="with --executor ray: CPUs per training task, also its torch threads (default 1)")
    cmp.add_argument("--gpus-per-task", type=float, default=None,
                     help="with --executor ray: GPUs per training task (default 0; a fraction shares one GPU)")
    cmp.set_defaults(func=_compare)

    trn = sub.add_parser("train", parents=[common],
                         help="train a learned denoiser on n samples of a GHM (accelerate; checkpoints)")
    trn.add_argument("--config", required=True, help="TOML training config, e.g. configs/train_demo.toml")
    trn.add_argument("--n-train", type=int, default=None, help="override data.n_train")
    trn.add_argument("--max-steps", type=int, default=None, help="override optim.max_steps")
    trn.add_argument("--out", default=None, help="run directory (default: outputs/train/<config name>)")
    trn.add_argument("--resume", action="store_true", help="continue from the latest intact checkpoint in --out")
    trn.add_argument("--overwrite", action="store_true", help="delete the run in --out and start over")
    trn.set_defaults(func=_train)

    cls = sub.add_parser("classify", parents=[common],
                         help="root classification vs n: tree ConvNet and MLP beside the Bayes (BP) accuracy")
    cls.add_argument("--config", required=True, help="TOML classify config, e.g. configs/classify.toml")
    cls.add_argument("--out", required=True, help="output directory (a rerun recomputes)")
    cls.set_defaults(func=_classify)

    prb = sub.add_parser("probe", parents=[common],
                         help="forward-backward probe with the exact oracle: class / latent retention vs noise")
    prb.add_argument("--config", required=True, help="TOML probe config, e.g. configs/probe.toml")
    prb.add_argument("--out", required=True, help="output directory (a rerun recomputes)")
    prb.set_defaults(func=_probe)

    wid = sub.add_parser("width", parents=[common],
                         help="how wide must a U-Net be to be within epsilon of BP: KL(oracle || BPUNet_W) vs W")
    wid.add_argument("--config", required=True, help="TOML width config, e.g. configs/width.toml")
    wid.add_argument("--out", required=True, help="output directory (a rerun recomputes)")
    wid.set_defaults(func=_width)
    return parser


def _one_line(e: BaseException) -> str:
    """The exception as one line: its message with line breaks folded (and its type when it is not hdiff's)."""
    text = " ".join(line.strip() for line in str(e).strip().splitlines() if line.strip()) or type(e).__name__
    from hdiff.runs import DirectoryLocked

    known = (*USAGE_ERRORS, DirectoryLocked) + _runtime_errors()
    return text if isinstance(e, known) else f"{type(e).__name__}: {text} (run with --debug for the traceback)"


def _runtime_errors() -> tuple[type[BaseException], ...]:
    """hdiff's own run-time failures, if the modules defining them are loaded (never imported just for this)."""
    rundir = sys.modules.get("hdiff.training.rundir")
    return (rundir.TrainingDiverged,) if rundir is not None else ()


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    text = " ".join(part.strip() for part in str(message).splitlines() if part.strip())
    print(f"hdiff: warning: {text}", file=sys.stderr if file is None else file)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hdiff`` console script; returns the exit status (see the module docstring)."""
    from hdiff.runtime import configure_threads, keep_freed_memory

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("HDIFF_DEBUG", "").strip() not in ("", "0") or "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
    except UsageError as e:
        if debug:
            raise
        print(f"{e.prog}: error: {_one_line(e)} (see {e.prog} --help)", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return int(e.code or 0) if isinstance(e.code, (int, type(None))) else 2
    keep_freed_memory()  # BP's temporaries are reused instead of page-faulted in on every call
    try:
        # threads = idle cores less a spare, OMP_WAIT_POLICY=PASSIVE, unless the user set them (docs/performance.md);
        # before any torch work, so that the thread pool starts with the chosen size
        configure_threads()
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning  # one line each, like the errors
            return args.func(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print("hdiff: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - every failure becomes one line and an exit status
        if debug:
            raise
        print(f"hdiff: error: {_one_line(e)}", file=sys.stderr)
        return 2 if isinstance(e, USAGE_ERRORS) else 1


if __name__ == "__main__":
    sys.exit(main())
