"""The ``hdiff`` command line: ``demo`` and ``sample`` (more arrive with training and evaluation)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # hdiff never needs a hub; set before diffusers is imported


def _demo(args: argparse.Namespace) -> int:
    from hdiff.evaluation.quicklook import format_summary, run_quicklook

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


def _sample(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    import numpy as np
    import torch

    from hdiff.denoisers import BPDenoiser
    from hdiff.evaluation.plots import plot_tokens
    from hdiff.evaluation.samples import sample_metrics
    from hdiff.noise import GaussianProcess, MaskingProcess, UniformProcess
    from hdiff.sampling import HierarchicalDiffusionPipeline
    from hdiff.schedulers.factory import make_scheduler, scheduler_options

    ghm = _load_ghm(args.ghm)
    process = {"gaussian": GaussianProcess, "masked": MaskingProcess, "uniform": UniformProcess}[args.process](ghm.vocab_size)
    if args.denoiser != "oracle":
        raise ValueError("--denoiser: only 'oracle' is available (learned denoisers arrive with training)")
    denoiser = BPDenoiser(ghm, process)
    scheduler = make_scheduler(args.scheduler, prediction_type=args.prediction_type, unmasking=args.unmasking)
    pipe = HierarchicalDiffusionPipeline(denoiser, scheduler, process)
    gen = torch.Generator().manual_seed(args.seed)
    tokens = pipe(batch_size=args.num, num_inference_steps=args.steps, generator=gen, x0_mode=args.x0_mode,
                  **scheduler_options(args.scheduler)).tokens
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(tokens, out / "tokens.pt")
    np.save(out / "tokens.npy", tokens.numpy())
    metrics = {"ghm": repr(ghm), "process": args.process, "scheduler": args.scheduler, "steps": args.steps,
               "x0_mode": args.x0_mode, "seed": args.seed, **sample_metrics(ghm, tokens)}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    plot_tokens(tokens, ghm.vocab_size, out / "samples.png",
                title=f"{args.denoiser}, {args.process} noise, {args.scheduler} x {args.steps}")
    print(f"valid {100 * metrics['valid_fraction']:.1f}%  log p {metrics['log_prob_bits_per_leaf']} bits/leaf  -> {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``hdiff`` command."""
    parser = argparse.ArgumentParser(prog="hdiff", description="Diffusion on generative hierarchical models with an exact BP oracle.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="sample the default GHM and denoise noisy copies with exact BP")
    demo.add_argument("--out", default="outputs/demo", help="output directory (default: outputs/demo)")
    demo.set_defaults(func=_demo)

    smp = sub.add_parser("sample", help="reverse diffusion with a denoiser through a scheduler")
    smp.add_argument("--ghm", required=True, help="saved GHM directory or a TOML config with a [ghm] table")
    smp.add_argument("--denoiser", default="oracle", help="'oracle' (exact BP)")
    smp.add_argument("--process", choices=["masked", "uniform", "gaussian"], default="masked")
    smp.add_argument("--scheduler", default="masked",
                     help="ddpm | ddim | euler | dpmsolver (gaussian); masked (masked); uniform | discrete-ddim (uniform)")
    smp.add_argument("--steps", type=int, default=64)
    smp.add_argument("--num", type=int, default=256, help="number of samples")
    smp.add_argument("--unmasking", choices=["bernoulli", "fixed"], default="bernoulli")
    smp.add_argument("--prediction-type", choices=["epsilon", "sample", "v_prediction"], default="epsilon")
    smp.add_argument("--x0-mode", choices=["marginal", "joint"], default="marginal")
    smp.add_argument("--seed", type=int, default=0)
    smp.add_argument("--out", required=True)
    smp.set_defaults(func=_sample)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hdiff`` console script."""
    from hdiff.runtime import keep_freed_memory

    args = build_parser().parse_args(argv)
    keep_freed_memory()  # BP's temporaries are reused instead of page-faulted in on every call
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
