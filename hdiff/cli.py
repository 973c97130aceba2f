"""The ``hdiff`` command line: ``compare`` (the main job), ``demo``, ``sample``, ``train`` and the research probes."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # hdiff never needs a hub; set before diffusers is imported


def _demo(args: argparse.Namespace) -> int:
    from hdiff.experiments.demo import format_summary, run_quicklook

    summary = run_quicklook(args.out)
    print(format_summary(summary))
    print(f"wrote {os.path.join(args.out, 'summary.json')} and {os.path.join(args.out, 'samples.png')}")
    return 0


def _load_ghm(spec: str):
    """A GHM from a saved directory or a TOML config (its ``[ghm]`` table, or the whole file)."""
    from pathlib import Path

    from hdiff.config import GHMConfig, from_dict
    from hdiff.ghm import GHM

    path = Path(spec)
    if path.is_dir():
        return GHM.load(path)
    if path.suffix == ".toml" and path.is_file():
        import tomllib

        data = tomllib.loads(path.read_text())
        return from_dict(GHMConfig, data.get("ghm", data), f"{path.name}:ghm").build()
    raise ValueError(f"--ghm must be a saved GHM directory or a .toml config, got {spec!r}")


def _same_ghm(a, b) -> bool:
    """Whether two GHMs have the same layout, root prior and kernels (exactly)."""
    import torch

    if a.layout != b.layout or a.root_prior.shape != b.root_prior.shape or len(a.kernels) != len(b.kernels):
        return False
    if not torch.equal(a.root_prior.cpu(), b.root_prior.cpu()):
        return False
    for ka, kb in zip(a.kernels, b.kernels):
        sa, sb = ka.state(), kb.state()
        if type(ka) is not type(kb) or sa.keys() != sb.keys():
            return False
        if not all(sa[k].shape == sb[k].shape and torch.equal(sa[k].cpu(), sb[k].cpu()) for k in sa):
            return False
    return True


def _sampling_denoiser(args: argparse.Namespace):
    """``(ghm, process, denoiser, schedule)`` for ``hdiff sample``: the BP oracle, or a trained run directory.

    A run directory brings its own GHM, noise process and schedule; ``--ghm`` / ``--process``, if
    given, must agree with them. Resolves ``args.process`` to the name actually used.
    """
    from hdiff.noise import get_process

    if args.process == "masked":  # the name before the process registry; kept as an alias
        args.process = "masking"
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
    if args.ghm is not None and not _same_ghm(_load_ghm(args.ghm), ghm):
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
    result = train(cfg, out, resume=args.resume)
    from accelerate import PartialState

    if not PartialState().is_main_process:  # under `accelerate launch`: one report, from the main process
        return 0
    print(f"trained {result.step} steps in {result.time_s:.1f} s: loss {result.loss}, "
          f"held-out {result.heldout_loss} (EMA), {result.heldout_loss_raw} (raw) -> {out}")
    return 0


def _sample(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    import numpy as np
    import torch

    from hdiff.experiments.plots import plot_tokens
    from hdiff.metrics import sample_quality
    from hdiff.sampling import HierarchicalDiffusionPipeline
    from hdiff.schedulers.factory import check_pair, make_scheduler, scheduler_options

    ghm, process, denoiser, schedule = _sampling_denoiser(args)
    check_pair(process, args.scheduler)
    scheduler = make_scheduler(args.scheduler, prediction_type=args.prediction_type, unmasking=args.unmasking,
                               schedule=schedule if args.scheduler != "discrete-ddim" else None)
    pipe = HierarchicalDiffusionPipeline(denoiser, scheduler, process)
    gen = torch.Generator().manual_seed(args.seed)
    tokens = pipe(batch_size=args.num, num_inference_steps=args.steps, generator=gen, x0_mode=args.x0_mode,
                  **scheduler_options(args.scheduler)).tokens
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(tokens, out / "tokens.pt")
    np.save(out / "tokens.npy", tokens.numpy())
    metrics = {"ghm": repr(ghm), "denoiser": args.denoiser, "process": args.process, "scheduler": args.scheduler,
               "steps": args.steps, "x0_mode": args.x0_mode, "seed": args.seed, **sample_quality(ghm, tokens)}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    plot_tokens(tokens, ghm.vocab_size, out / "samples.png",
                title=f"{args.denoiser}, {args.process} noise, {args.scheduler} x {args.steps}")
    print(f"valid {100 * metrics['validity']:.1f}%  NLL {metrics['nll_bits_per_leaf']} bits/leaf  -> {out}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    import time

    from hdiff.experiments.compare import run_compare
    from hdiff.experiments.compare_config import load_compare_config
    from hdiff.experiments.report import headline

    cfg = load_compare_config(args.config)
    start = time.monotonic()
    metrics = run_compare(cfg, args.out, progress=None if not args.quiet else False)
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

    metrics = run_classify(load_classify_config(args.config), args.out)
    print(format_classify(metrics))
    print(f"{metrics['wall_seconds']:.0f} s -> {os.path.join(args.out, 'metrics.json')}, accuracy.png")
    return 0


def _probe(args: argparse.Namespace) -> int:
    from hdiff.experiments.probe import format_probe, load_probe_config, run_probe

    metrics = run_probe(load_probe_config(args.config), args.out)
    print(format_probe(metrics))
    print(f"{metrics['wall_seconds']:.0f} s -> {os.path.join(args.out, 'metrics.json')}, probe.png")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``hdiff`` command."""
    parser = argparse.ArgumentParser(prog="hdiff", description="Diffusion on generative hierarchical models with an exact BP oracle.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="sample the default GHM and denoise noisy copies with exact BP")
    demo.add_argument("--out", default="outputs/demo", help="output directory (default: outputs/demo)")
    demo.set_defaults(func=_demo)

    smp = sub.add_parser("sample", help="reverse diffusion with a denoiser through a scheduler")
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
    smp.add_argument("--out", required=True)
    smp.set_defaults(func=_sample)

    cmp = sub.add_parser("compare", help="the main job: the BP oracle vs learned denoisers as the training set grows")
    cmp.add_argument("--config", required=True, help="TOML compare config, e.g. configs/demo.toml")
    cmp.add_argument("--out", required=True, help="output directory; a rerun skips its finished cells")
    cmp.add_argument("--quiet", action="store_true", help="no progress bars")
    cmp.set_defaults(func=_compare)

    trn = sub.add_parser("train", help="train a learned denoiser on n samples of a GHM (accelerate; checkpoints)")
    trn.add_argument("--config", required=True, help="TOML training config, e.g. configs/train_demo.toml")
    trn.add_argument("--n-train", type=int, default=None, help="override data.n_train")
    trn.add_argument("--max-steps", type=int, default=None, help="override optim.max_steps")
    trn.add_argument("--out", default=None, help="run directory (default: outputs/train/<config name>)")
    trn.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    trn.set_defaults(func=_train)

    cls = sub.add_parser("classify", help="root classification vs n: tree ConvNet and MLP beside the Bayes (BP) accuracy")
    cls.add_argument("--config", required=True, help="TOML classify config, e.g. configs/classify.toml")
    cls.add_argument("--out", required=True, help="output directory (a rerun recomputes)")
    cls.set_defaults(func=_classify)

    prb = sub.add_parser("probe", help="forward-backward probe with the exact oracle: class / latent retention vs noise")
    prb.add_argument("--config", required=True, help="TOML probe config, e.g. configs/probe.toml")
    prb.add_argument("--out", required=True, help="output directory (a rerun recomputes)")
    prb.set_defaults(func=_probe)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hdiff`` console script."""
    from hdiff.runtime import keep_freed_memory

    args = build_parser().parse_args(argv)
    keep_freed_memory()  # BP's temporaries are reused instead of page-faulted in on every call
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
